// Encoder-decoder models: BART (post-LN blocks, learned positions with an offset of 2, a LayerNorm
// after the embeddings of each stack, GeLU MLPs, LM head tied to the shared embedding plus
// final_logits_bias). The encoder is a stack of the shared Block; the decoder's blocks add a
// cross-attention whose keys and values are projected from the encoder output once per call.
#include <cmath>

#include "models/model.h"
#include "models/weights.h"

namespace finequant {

namespace {

// One BART attention (q_proj, k_proj, v_proj, out_proj under `p`) as a self-attention.
void self_attention(const Weights& w, const std::string& p, int64_t heads, int64_t C, SelfAttention& a) {
  a.heads = a.kv_heads = heads;
  a.head_dim = C / heads;
  a.qkv = w.linears({p + "q_proj", p + "k_proj", p + "v_proj"}, {C, C, C}, C);
  a.o = w.linear(p + "out_proj", C, C);
}

}  // namespace

Seq2Seq::Seq2Seq(const ModelFile& file, ModelConfig config, const kernels::Backend& backend, ThreadPool& pool,
                 kernels::FloatPrecision precision, const StrategyTable* strategy) {
  config_ = std::move(config);
  backend_ = &backend;
  const ModelConfig& c = config_;
  const Weights w{file, Weights::find_prefix(file, "shared.weight", {"model.", ""}), backend, pool, precision, strategy};
  const int64_t C = c.hidden_size, V = c.vocab_size, P = c.max_positions + 2;
  using Kind = kernels::NormParams::Kind;
  const Tensor shared = w.host_tensor("shared.weight", {V, C});
  // transformers: embedding(ids) * sqrt(d_model), one fp32 product per value
  const float scale = c.scale_embedding ? static_cast<float>(std::sqrt(static_cast<double>(C))) : 1.0f;
  auto token_table = [&](const std::string& stack) {
    const std::string own = stack + ".embed_tokens.weight";
    // a copy: the file's F32 tensors borrow its read-only mapping
    Tensor t = (file.file.has(w.prefix + own) ? w.host_tensor(own, {V, C}) : shared).clone();
    if (c.scale_embedding) {
      float* values = t.data<float>();
      for (int64_t i = 0, n = t.numel(); i < n; ++i) values[i] *= scale;
    }
    return t.to(backend.device());
  };
  enc_embed_ = token_table("encoder");
  dec_embed_ = token_table("decoder");
  enc_pos_ = w.tensor("encoder.embed_positions.weight", {P, C});
  dec_pos_ = w.tensor("decoder.embed_positions.weight", {P, C});
  enc_embed_norm_ = w.norm("encoder.layernorm_embedding", C, Kind::LayerNorm, c.norm_eps);
  dec_embed_norm_ = w.norm("decoder.layernorm_embedding", C, Kind::LayerNorm, c.norm_eps);
  const kernels::Epilogue act = activation_epilogue(c.hidden_act);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "encoder.layers." + std::to_string(i) + ".";
    Block b;
    b.pre_norm = false;
    self_attention(w, p + "self_attn.", c.num_heads, C, b.attn);
    b.norm1 = w.norm(p + "self_attn_layer_norm", C, Kind::LayerNorm, c.norm_eps);
    b.mlp.fc1 = w.linear(p + "fc1", c.intermediate_size, C, act);
    b.mlp.fc2 = w.linear(p + "fc2", C, c.intermediate_size);
    b.norm2 = w.norm(p + "final_layer_norm", C, Kind::LayerNorm, c.norm_eps);
    blocks_.push_back(std::move(b));
  }
  for (int64_t i = 0; i < c.decoder_layers; ++i) {
    const std::string p = "decoder.layers." + std::to_string(i) + ".";
    Block b;
    b.pre_norm = false;
    self_attention(w, p + "self_attn.", c.decoder_heads, C, b.attn);
    b.norm1 = w.norm(p + "self_attn_layer_norm", C, Kind::LayerNorm, c.norm_eps);
    b.has_cross = true;
    b.cross.heads = c.decoder_heads;
    b.cross.head_dim = C / c.decoder_heads;
    b.cross.q = w.linear(p + "encoder_attn.q_proj", C, C);
    b.cross.kv = w.linears({p + "encoder_attn.k_proj", p + "encoder_attn.v_proj"}, {C, C}, C);
    b.cross.o = w.linear(p + "encoder_attn.out_proj", C, C);
    b.norm_cross = w.norm(p + "encoder_attn_layer_norm", C, Kind::LayerNorm, c.norm_eps);
    b.mlp.fc1 = w.linear(p + "fc1", c.decoder_intermediate_size, C, act);
    b.mlp.fc2 = w.linear(p + "fc2", C, c.decoder_intermediate_size);
    b.norm2 = w.norm(p + "final_layer_norm", C, Kind::LayerNorm, c.norm_eps);
    dec_blocks_.push_back(std::move(b));
  }
  // LM head: a stored lm_head (untied, or quantized with "head" in the scheme's parts), else the
  // shared embedding; final_logits_bias [1, V] is its bias.
  kernels::LinearWeights head;
  if (file.file.has("lm_head.weight")) {
    head = Weights{file, "", backend, pool, precision, strategy}.linear_weights("lm_head", kernels::Epilogue::None);
    FQ_CHECK(head.out_features() == V && head.in_features() == C, ErrorKind::ModelFormat,
             "lm_head has the wrong shape for vocab_size " + std::to_string(V) + " and d_model " + std::to_string(C));
  } else {
    FQ_CHECK(c.tie_word_embeddings, ErrorKind::ModelFormat,
             "bart: tie_word_embeddings is false but the file has no lm_head.weight");
    head.weight_f32 = shared;
    head.precision = precision;
  }
  if (file.file.has("final_logits_bias"))
    head.bias = Weights{file, "", backend, pool, precision, strategy}.host_tensor("final_logits_bias", {1, V}).reshape({V});
  head_ = Linear::create(backend, head, pool);
  link_step_order(dec_blocks_, head_);
}

Tensor Seq2Seq::embed_rows(const ExecContext& ctx, const Tensor& table, const Tensor& table_pos, const int64_t* ids,
                           const Tensor& positions, int64_t M) const {
  const kernels::Backend& be = *ctx.backend;
  const Tensor ids_host = Tensor::borrow(const_cast<int64_t*>(ids), DType::I64, {M});
  Tensor x = Tensor::empty(DType::F32, {M, config_.hidden_size}, ctx.device);
  be.gather_rows(ctx, table, ids_host.to(ctx.device), x, false);
  be.gather_rows(ctx, table_pos, positions.to(ctx.device), x, true);
  return x;
}

Tensor Seq2Seq::forward(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T) const {
  const int64_t M = B * T;
  Tensor positions = Tensor::empty(DType::I64, {M});
  for (int64_t i = 0; i < M; ++i) positions.data<int64_t>()[i] = i % T + 2;  // BART's offset
  Tensor x = enc_embed_norm_.forward(ctx, embed_rows(ctx, enc_embed_, enc_pos_, ids, positions, M));
  const AttentionContext actx = bidirectional_attention(ctx, mask, B, T);
  for (const Block& b : blocks_) x = b.forward(ctx, x, actx, nullptr);
  return x.reshape({B, T, config_.hidden_size});
}

Seq2SeqCache Seq2Seq::start(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T,
                            int64_t capacity) const {
  const ModelConfig& c = config_;
  const Tensor memory = forward(ctx, ids, mask, B, T).reshape({B * T, c.hidden_size});
  const Tensor key_valid = Tensor::borrow(const_cast<uint8_t*>(mask), DType::U8, {B, T}).to(ctx.device);
  Seq2SeqCache cache;
  for (const Block& b : dec_blocks_) cache.cross.push_back(b.cross.project(ctx, memory, B, T, key_valid));
  KVCache& s = cache.self;
  s.B = B;
  s.capacity = capacity;
  const int64_t D = c.hidden_size / c.decoder_heads;
  for (int64_t i = 0; i < c.decoder_layers; ++i) {
    const Shape shape{B, c.decoder_heads, capacity, D};
    s.layers.push_back(LayerKV{Tensor::empty(DType::F32, shape, ctx.device), Tensor::empty(DType::F32, shape, ctx.device)});
  }
  s.key_valid.assign(static_cast<size_t>(B * capacity), 0);
  s.next_position.assign(static_cast<size_t>(B), 0);
  return cache;
}

Tensor Seq2Seq::step(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T,
                     Seq2SeqCache& cache, bool all_logits) const {
  KVCache& s = cache.self;
  FQ_CHECK_ARG(B == s.B && s.length + T <= s.capacity, "decoder cache is full or has the wrong batch size");
  const int64_t M = B * T, V = config_.vocab_size;
  // transformers' BART decoder: position past + t for every token, padded or not.
  Tensor positions = Tensor::empty(DType::I64, {M});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      positions.data<int64_t>()[b * T + t] = s.length + t + 2;
      s.key_valid[b * s.capacity + s.length + t] = mask[b * T + t] ? 1 : 0;
    }
  Tensor x = dec_embed_norm_.forward(ctx, embed_rows(ctx, dec_embed_, dec_pos_, ids, positions, M));
  AttentionContext actx;
  actx.B = B;
  actx.T = T;
  actx.past = s.length;
  actx.key_valid = Tensor::borrow(s.key_valid.data(), DType::U8, {B, s.capacity}).to(ctx.device);
  actx.key_valid_stride = s.capacity;
  actx.causal = true;
  for (size_t l = 0; l < dec_blocks_.size(); ++l) x = dec_blocks_[l].forward(ctx, x, actx, &s.layers[l], &cache.cross[l]);
  s.length += T;
  if (all_logits) return head_.forward(ctx, x).reshape({B, T, V});
  return head_.forward(ctx, last_real_rows(ctx, x, mask, B, T));
}

}  // namespace finequant
