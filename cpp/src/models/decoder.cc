// Decoder-only language models: GPT-2 (learned positions, fused QKV, LayerNorm, GeLU-tanh MLP)
// and the Llama family (RoPE, grouped-query attention, RMSNorm, SwiGLU), both pre-LN.
#include "models/model.h"
#include "models/weights.h"

namespace finequant {

Decoder::Decoder(const ModelFile& file, ModelConfig config, const kernels::Backend& backend, ThreadPool& pool,
                 kernels::FloatPrecision precision) {
  config_ = std::move(config);
  backend_ = &backend;
  const ModelConfig& c = config_;
  gpt2_ = c.architecture == "gpt2";
  const int64_t C = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t HD = c.num_heads * c.head_dim, KVD = c.num_kv_heads * c.head_dim;
  using Kind = kernels::NormParams::Kind;
  Tensor embed_host;
  if (gpt2_) {
    const Weights w{file, Weights::find_prefix(file, "wte.weight", {"", "transformer."}), backend, pool, precision};
    embed_host = w.host_tensor("wte.weight", {V, C});
    position_ = w.tensor("wpe.weight", {c.max_positions, C});
    const kernels::Epilogue act = activation_epilogue(c.hidden_act);
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const std::string p = "h." + std::to_string(i) + ".";
      Block b;
      b.pre_norm = true;
      b.norm1 = w.norm(p + "ln_1", C, Kind::LayerNorm, c.norm_eps);
      b.norm2 = w.norm(p + "ln_2", C, Kind::LayerNorm, c.norm_eps);
      b.attn.heads = b.attn.kv_heads = c.num_heads;
      b.attn.head_dim = c.head_dim;
      b.attn.qkv.push_back(w.linear(p + "attn.c_attn", 3 * HD, C));
      b.attn.o = w.linear(p + "attn.c_proj", C, HD);
      b.mlp.fc1 = w.linear(p + "mlp.c_fc", I, C, act);
      b.mlp.fc2 = w.linear(p + "mlp.c_proj", C, I);
      blocks_.push_back(std::move(b));
    }
    final_norm_ = w.norm("ln_f", C, Kind::LayerNorm, c.norm_eps);
  } else {
    const Weights w{file, Weights::find_prefix(file, "embed_tokens.weight", {"model.", ""}), backend, pool, precision};
    embed_host = w.host_tensor("embed_tokens.weight", {V, C});
    rope_ = Rope(c.head_dim, c.rope_theta, backend.device());
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      Block b;
      b.pre_norm = true;
      b.norm1 = w.norm(p + "input_layernorm", C, Kind::RMSNorm, c.norm_eps);
      b.norm2 = w.norm(p + "post_attention_layernorm", C, Kind::RMSNorm, c.norm_eps);
      b.attn.heads = c.num_heads;
      b.attn.kv_heads = c.num_kv_heads;
      b.attn.head_dim = c.head_dim;
      b.attn.rope = &rope_;  // Decoder is not copied or moved after construction (held by unique_ptr)
      b.attn.qkv = w.linears({p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"}, {HD, KVD, KVD}, C);
      b.attn.o = w.linear(p + "self_attn.o_proj", C, HD);
      b.mlp.swiglu = true;
      b.mlp.gate_up = w.linears({p + "mlp.gate_proj", p + "mlp.up_proj"}, {I, I}, C);
      b.mlp.down = w.linear(p + "mlp.down_proj", C, I);
      blocks_.push_back(std::move(b));
    }
    final_norm_ = w.norm("norm", C, Kind::RMSNorm, c.norm_eps);
  }
  embed_ = embed_host.to(backend.device());
  // LM head: its own weight when the file has one (untied Llama), else tied to the embedding.
  if (file.file.has("lm_head.weight")) {
    head_ = Weights{file, "", backend, pool, precision}.linear("lm_head", V, C);
  } else {
    kernels::LinearWeights tied;
    tied.weight_f32 = embed_host;
    tied.precision = precision;
    head_ = Linear::create(backend, tied, pool);
  }
}

KVCache Decoder::new_cache(int64_t B, int64_t capacity) const {
  KVCache cache;
  cache.B = B;
  cache.capacity = capacity;
  for (int64_t i = 0; i < config_.num_layers; ++i) {
    const Shape s{B, config_.num_kv_heads, capacity, config_.head_dim};
    cache.layers.push_back(LayerKV{Tensor::empty(DType::F32, s, backend_->device()),
                                   Tensor::empty(DType::F32, s, backend_->device())});
  }
  cache.key_valid.assign(static_cast<size_t>(B * capacity), 0);
  cache.next_position.assign(static_cast<size_t>(B), 0);
  return cache;
}

Tensor Decoder::step(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T,
                     KVCache& cache, bool all_logits) const {
  FQ_CHECK_ARG(B == cache.B && cache.length + T <= cache.capacity, "KV cache is full or has the wrong batch size");
  const kernels::Backend& be = *ctx.backend;
  const int64_t C = config_.hidden_size, M = B * T, V = config_.vocab_size;
  Tensor positions = Tensor::zeros(DType::I64, {M});
  int64_t* pos = positions.data<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const bool real = mask[b * T + t] != 0;
      cache.key_valid[b * cache.capacity + cache.length + t] = real ? 1 : 0;
      if (real) pos[b * T + t] = cache.next_position[b]++;
    }
  }
  const Tensor positions_dev = positions.to(ctx.device);
  const Tensor ids_host = Tensor::borrow(const_cast<int64_t*>(ids), DType::I64, {M});
  Tensor x = Tensor::empty(DType::F32, {M, C}, ctx.device);
  be.gather_rows(ctx, embed_, ids_host.to(ctx.device), x, false);
  if (gpt2_) be.gather_rows(ctx, position_, positions_dev, x, true);

  AttentionContext actx;
  actx.B = B;
  actx.T = T;
  actx.past = cache.length;
  actx.positions = positions_dev;
  actx.key_valid = Tensor::borrow(cache.key_valid.data(), DType::U8, {B, cache.capacity}).to(ctx.device);
  actx.key_valid_stride = cache.capacity;
  actx.causal = true;
  for (size_t l = 0; l < blocks_.size(); ++l) x = blocks_[l].forward(ctx, x, actx, &cache.layers[l]);
  cache.length += T;

  if (all_logits) return head_.forward(ctx, final_norm_.forward(ctx, x)).reshape({B, T, V});
  // Only the rows that predict the next token: the last real token of each sequence in the chunk.
  return head_.forward(ctx, final_norm_.forward(ctx, last_real_rows(ctx, x, mask, B, T)));
}

Tensor Decoder::forward(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T) const {
  KVCache cache = new_cache(B, T);
  return step(ctx, ids, mask, B, T, cache, true);
}

}  // namespace finequant
