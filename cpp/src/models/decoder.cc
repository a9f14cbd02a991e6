// Decoder-only language models: GPT-2 (learned positions, fused QKV, LayerNorm, GeLU-tanh MLP)
// and the Llama family (RoPE, grouped-query attention, RMSNorm, gated MLP), both pre-LN. Mistral,
// Qwen2, Phi-3, Gemma and Gemma 2 are Llama-family variants: config flags (biases, sliding windows,
// rope scaling, soft-capping, sandwich norms, GeGLU), not decoder classes.
#include <algorithm>

#include "models/model.h"
#include "models/weights.h"

namespace finequant {

Decoder::Decoder(const ModelFile& file, ModelConfig config, const kernels::Backend& backend, ThreadPool& pool,
                 kernels::FloatPrecision precision, const StrategyTable* strategy) {
  config_ = std::move(config);
  backend_ = &backend;
  const ModelConfig& c = config_;
  gpt2_ = c.architecture == "gpt2";
  has_window_ = std::any_of(c.layer_window.begin(), c.layer_window.end(), [](int64_t w) { return w > 0; });
  const int64_t C = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t HD = c.num_heads * c.head_dim, KVD = c.num_kv_heads * c.head_dim;
  using Kind = kernels::NormParams::Kind;
  Tensor embed_host;
  if (gpt2_) {
    const Weights w{file, Weights::find_prefix(file, "wte.weight", {"", "transformer."}), backend, pool, precision, strategy};
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
    // The Llama family; its variants are the config's flags (docs/DESIGN.md section 10).
    const Weights w{file, Weights::find_prefix(file, "embed_tokens.weight", {"model.", ""}), backend, pool, precision, strategy};
    embed_host = w.host_tensor("embed_tokens.weight", {V, C});
    rope_ = Rope(c.head_dim, c.rope, backend.device());
    const float offset = c.norm_offset;
    auto has = [&](const std::string& name) { return file.file.has(w.prefix + name); };
    auto require_bias = [&](bool expected, const std::string& module) {
      FQ_CHECK(!expected || has(module + ".bias"), ErrorKind::ModelFormat,
               c.model_type + ": the config gives '" + module + "' a bias, the file has no " + w.prefix + module +
                   ".bias");
    };
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      Block b;
      b.pre_norm = true;
      b.norm1 = w.norm(p + "input_layernorm", C, Kind::RMSNorm, c.norm_eps, offset);
      if (c.sandwich_norms) {  // Gemma 2: post_attention_layernorm is the attention branch's output norm
        b.sandwich = true;
        b.post_attn_norm = w.norm(p + "post_attention_layernorm", C, Kind::RMSNorm, c.norm_eps, offset);
        b.norm2 = w.norm(p + "pre_feedforward_layernorm", C, Kind::RMSNorm, c.norm_eps, offset);
        b.post_mlp_norm = w.norm(p + "post_feedforward_layernorm", C, Kind::RMSNorm, c.norm_eps, offset);
      } else {
        b.norm2 = w.norm(p + "post_attention_layernorm", C, Kind::RMSNorm, c.norm_eps, offset);
      }
      b.attn.heads = c.num_heads;
      b.attn.kv_heads = c.num_kv_heads;
      b.attn.head_dim = c.head_dim;
      b.attn.rope = &rope_;  // Decoder is not copied or moved after construction (held by unique_ptr)
      b.attn.scale = c.query_scale;
      b.attn.window = c.layer_window[static_cast<size_t>(i)];
      b.attn.softcap = c.attn_softcap;
      if (has(p + "self_attn.qkv_proj.weight")) {  // Phi-3: one fused projection, rows [q | k | v]
        b.attn.qkv.push_back(w.linear(p + "self_attn.qkv_proj", HD + 2 * KVD, C));
      } else {
        for (const char* proj : {"q_proj", "k_proj", "v_proj"}) require_bias(c.qkv_bias, p + "self_attn." + proj);
        b.attn.qkv =
            w.linears({p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"}, {HD, KVD, KVD}, C);
      }
      require_bias(c.o_bias, p + "self_attn.o_proj");
      b.attn.o = w.linear(p + "self_attn.o_proj", C, HD);
      b.mlp.gated = true;
      b.mlp.gate_act = c.mlp_act == "silu" ? kernels::GateActivation::Silu : kernels::GateActivation::GeluTanh;
      if (has(p + "mlp.gate_up_proj.weight")) {  // Phi-3: rows [gate | up]
        b.mlp.gate_up.push_back(w.linear(p + "mlp.gate_up_proj", 2 * I, C));
      } else {
        for (const char* proj : {"gate_proj", "up_proj"}) require_bias(c.mlp_bias, p + "mlp." + proj);
        b.mlp.gate_up = w.linears({p + "mlp.gate_proj", p + "mlp.up_proj"}, {I, I}, C);
      }
      require_bias(c.mlp_bias, p + "mlp.down_proj");
      b.mlp.down = w.linear(p + "mlp.down_proj", C, I);
      blocks_.push_back(std::move(b));
    }
    final_norm_ = w.norm("norm", C, Kind::RMSNorm, c.norm_eps, offset);
  }
  if (c.embed_scale != 1.f) {  // Gemma: the gathered rows times sqrt(hidden) in fp32, folded into the table
    Tensor scaled = Tensor::empty(DType::F32, {V, C});
    const float* src = embed_host.data<float>();
    float* dst = scaled.data<float>();
    for (int64_t i = 0; i < V * C; ++i) dst[i] = src[i] * c.embed_scale;
    embed_ = scaled.to(backend.device());
  } else {
    embed_ = embed_host.to(backend.device());
  }
  // LM head: its own weight when the file has one (untied Llama), else tied to the embedding.
  if (file.file.has("lm_head.weight")) {
    head_ = Weights{file, "", backend, pool, precision, strategy}.linear("lm_head", V, C);
  } else {
    kernels::LinearWeights tied;
    tied.weight_f32 = embed_host;
    tied.precision = precision;
    head_ = Linear::create(backend, tied, pool);
  }
  link_step_order(blocks_, head_);
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
  cache.key_position.assign(static_cast<size_t>(B * capacity), 0);
  cache.next_position.assign(static_cast<size_t>(B), 0);
  return cache;
}

Tensor Decoder::step(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T,
                     KVCache& cache, bool all_logits) const {
  FQ_CHECK_ARG(B == cache.B && cache.length + T <= cache.capacity, "KV cache is full or has the wrong batch size");
  // Sliding windows read each slot's position: a cache built by hand must keep key_position too.
  FQ_CHECK_ARG(!has_window_ || cache.key_position.size() == cache.key_valid.size(),
               "a sliding-window model's KV cache needs key_position for every slot");
  const kernels::Backend& be = *ctx.backend;
  const int64_t C = config_.hidden_size, M = B * T, V = config_.vocab_size;
  Tensor positions = Tensor::zeros(DType::I64, {M});
  int64_t* pos = positions.data<int64_t>();
  int64_t longest = 0;  // the largest position in the chunk, plus one
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const bool real = mask[b * T + t] != 0;
      const int64_t slot = b * cache.capacity + cache.length + t;
      cache.key_valid[slot] = real ? 1 : 0;
      // a padding slot holds the next real token's position: positions never decrease along the cache
      if (has_window_) cache.key_position[slot] = cache.next_position[b];
      if (real) pos[b * T + t] = cache.next_position[b]++;
      longest = std::max(longest, pos[b * T + t] + 1);
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
  if (has_window_)
    actx.key_positions = Tensor::borrow(cache.key_position.data(), DType::I64, {B, cache.capacity}).to(ctx.device);
  if (!gpt2_) actx.rope_inv_freq = rope_.inv_freq_for(longest, ctx.device);
  for (size_t l = 0; l < blocks_.size(); ++l) x = blocks_[l].forward(ctx, x, actx, &cache.layers[l]);
  cache.length += T;

  // all_logits: every row; else only the rows that predict the next token: the last real token of
  // each sequence in the chunk.
  Tensor logits = head_.forward(ctx, final_norm_.forward(ctx, all_logits ? x : last_real_rows(ctx, x, mask, B, T)));
  if (config_.final_softcap > 0.f) be.softcap(ctx, logits, config_.final_softcap);
  return all_logits ? logits.reshape({B, T, V}) : logits;
}

Tensor Decoder::forward(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T) const {
  KVCache cache = new_cache(B, T);
  return step(ctx, ids, mask, B, T, cache, true);
}

}  // namespace finequant
