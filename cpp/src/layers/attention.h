// Multi-head self-attention over a batch of sequences, optionally with RoPE, grouped-query heads,
// a causal mask and a KV cache. Precision lives in the Linears, kernels in the backend: this layer
// only wires them.
#pragma once
#include <vector>

#include "layers/linear.h"
#include "models/config.h"

namespace finequant {

// Keys and values of one layer for every sequence: [B, KVH, capacity, D] on the model's device.
struct LayerKV {
  Tensor k, v;
};

// Rotary position embedding, Hugging Face "rotate_half" layout: for each head, element i is paired
// with i + D/2. Frequencies as transformers' modeling_rope_utils makes them for the config's
// rope_type (docs/DESIGN.md section 10).
struct Rope {
  int64_t head_dim = 0;
  RopeConfig config;
  Tensor inv_freq;            // F32 [D / 2] on the model's device (dynamic: up to original_max_positions)
  Rope() = default;
  Rope(int64_t head_dim, const RopeConfig& config, Device device);
  // The frequencies of a call whose largest position is seq_len - 1 (transformers' dynamic NTK
  // recomputes them from that length at each forward; every other type: inv_freq).
  Tensor inv_freq_for(int64_t seq_len, Device device) const;
  // yarn scales cos and sin by this: q and k by it, so the attention scores by its square.
  float attention_factor() const { return static_cast<float>(config.attention_factor); }
  // F32 [D / 2] on the host for a sequence of seq_len (dynamic NTK only).
  static Tensor frequencies(int64_t head_dim, const RopeConfig& config, int64_t seq_len);
};

// What attention needs to know about the current chunk of tokens ([B, T], token-major rows).
// Tensors live on the context's device.
struct AttentionContext {
  int64_t B = 0, T = 0;
  int64_t past = 0;         // tokens already in the cache (absolute index of chunk token 0)
  Tensor positions;         // I64 [B * T] positions of the chunk's tokens (RoPE, sliding windows)
  Tensor key_valid;         // U8 [B, key_valid_stride]: keys 0 .. past + T - 1
  int64_t key_valid_stride = 0;
  bool causal = false;
  Tensor key_positions;     // I64 [B, key_valid_stride]: the position of every key (sliding windows)
  Tensor rope_inv_freq;     // this call's RoPE frequencies (SelfAttention::rope set)
};

// An encoder's attention over a chunk [B, T] with host mask (0/1): every real key, no cache, no causal mask.
// Padded keys are masked; padded queries still get (unused) outputs.
AttentionContext bidirectional_attention(const ExecContext& ctx, const uint8_t* mask, int64_t B, int64_t T);

class SelfAttention {
 public:
  // The q, k, v projections: one Linear whose output rows are [q | k | v] (GPT-2's c_attn, or
  // separate modules merged at load), or three Linears.
  std::vector<Linear> qkv;
  Linear o;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  const Rope* rope = nullptr;  // null: no rotary embedding
  float scale = 0.f;           // scores times this (0: 1 / sqrt(head_dim))
  int64_t window = 0;          // > 0: a query sees only keys less than `window` positions before it
  float softcap = 0.f;         // > 0: scores <- softcap * tanh(scores / softcap) before the softmax

  // x: [B * T, C] rows (normalized on the way in with x.norm) -> [B * T, C]. With `cache`, the
  // chunk's keys/values are stored at [past, past + T) and attention reads the whole cache prefix.
  Tensor forward(const ExecContext& ctx, const kernels::GemmInput& x, const AttentionContext& actx,
                 LayerKV* cache) const;
};

// Encoder-decoder cross-attention: queries from the decoder's rows, keys and values projected once
// from the encoder's output (the memory) per call and kept for every decoder step.
struct CrossKV {
  LayerKV kv;         // [B, H, Tm, D]: k_proj / v_proj of the memory, computed by CrossAttention::project
  int64_t Tm = 0;     // memory tokens per sequence
  Tensor key_valid;   // U8 [B, Tm] on the device: the encoder's attention mask
};

class CrossAttention {
 public:
  Linear q;
  std::vector<Linear> kv;  // [k | v] merged at load when they quantize alike, else two
  Linear o;
  int64_t heads = 0, head_dim = 0;

  // memory: [B * Tm, C] encoder rows -> keys and values of every sequence. key_valid: U8 [B, Tm].
  CrossKV project(const ExecContext& ctx, const Tensor& memory, int64_t B, int64_t Tm, Tensor key_valid) const;
  // x: [B * T, C] decoder rows -> [B * T, C]; every query sees every valid memory token.
  Tensor forward(const ExecContext& ctx, const kernels::GemmInput& x, int64_t B, int64_t T, const CrossKV& mem) const;
};

}  // namespace finequant
