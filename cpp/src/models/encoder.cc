// BERT-family encoder: word + position + segment embeddings, LayerNorm, post-LN blocks.
#include "models/model.h"
#include "models/weights.h"

namespace finequant {

Encoder::Encoder(const ModelFile& file, ModelConfig config, const kernels::Backend& backend, ThreadPool& pool,
                 kernels::FloatPrecision precision, const StrategyTable* strategy) {
  config_ = std::move(config);
  backend_ = &backend;
  const ModelConfig& c = config_;
  const Weights w{file, Weights::find_prefix(file, "embeddings.word_embeddings.weight", {"", "bert."}), backend, pool,
                  precision, strategy};
  const int64_t C = c.hidden_size, I = c.intermediate_size;
  using Kind = kernels::NormParams::Kind;
  word_ = w.tensor("embeddings.word_embeddings.weight", {c.vocab_size, C});
  position_ = w.tensor("embeddings.position_embeddings.weight", {c.max_positions, C});
  token_type_ = w.tensor("embeddings.token_type_embeddings.weight", {c.type_vocab_size, C});
  embed_norm_ = w.norm("embeddings.LayerNorm", C, Kind::LayerNorm, c.norm_eps);
  const kernels::Epilogue act = activation_epilogue(c.hidden_act);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "encoder.layer." + std::to_string(i) + ".";
    Block b;
    b.pre_norm = false;
    b.attn.heads = b.attn.kv_heads = c.num_heads;
    b.attn.head_dim = c.head_dim;
    const int64_t HD = c.num_heads * c.head_dim;
    b.attn.qkv = w.linears({p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"},
                           {HD, HD, HD}, C);
    b.attn.o = w.linear(p + "attention.output.dense", C, HD);
    b.norm1 = w.norm(p + "attention.output.LayerNorm", C, Kind::LayerNorm, c.norm_eps);
    b.mlp.fc1 = w.linear(p + "intermediate.dense", I, C, act);
    b.mlp.fc2 = w.linear(p + "output.dense", C, I);
    b.norm2 = w.norm(p + "output.LayerNorm", C, Kind::LayerNorm, c.norm_eps);
    blocks_.push_back(std::move(b));
  }
}

Tensor Encoder::forward(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T) const {
  const kernels::Backend& be = *ctx.backend;
  const int64_t C = config_.hidden_size, M = B * T;
  // BERT positions are 0..T-1 regardless of padding (as in transformers); segment id 0 everywhere.
  Tensor positions = Tensor::empty(DType::I64, {M}), segments = Tensor::zeros(DType::I64, {M});
  for (int64_t i = 0; i < M; ++i) positions.data<int64_t>()[i] = i % T;
  const Tensor ids_host = Tensor::borrow(const_cast<int64_t*>(ids), DType::I64, {M});
  Tensor x = Tensor::empty(DType::F32, {M, C}, ctx.device);
  be.gather_rows(ctx, word_, ids_host.to(ctx.device), x, false);
  be.gather_rows(ctx, position_, positions.to(ctx.device), x, true);
  be.gather_rows(ctx, token_type_, segments.to(ctx.device), x, true);
  x = embed_norm_.forward(ctx, x);

  const AttentionContext actx = bidirectional_attention(ctx, mask, B, T);
  for (const Block& b : blocks_) x = b.forward(ctx, x, actx, nullptr);
  return x.reshape({B, T, C});
}

}  // namespace finequant
