// Multi-head self-attention over a batch of sequences, optionally with RoPE, grouped-query heads,
// a causal mask and a KV cache. Precision lives in the Linears, kernels in the backend: this layer
// only wires them.
#pragma once
#include <vector>

#include "layers/linear.h"

namespace finequant {

// Keys and values of one layer for every sequence: [B, KVH, capacity, D] on the model's device.
struct LayerKV {
  Tensor k, v;
};

// Rotary position embedding, Hugging Face "rotate_half" layout: for each head, element i is paired
// with i + D/2.
struct Rope {
  int64_t head_dim = 0;
  Tensor inv_freq;  // F32 [D / 2] on the model's device
  Rope() = default;
  Rope(int64_t head_dim, double theta, Device device);
};

// What attention needs to know about the current chunk of tokens ([B, T], token-major rows).
// Tensors live on the context's device.
struct AttentionContext {
  int64_t B = 0, T = 0;
  int64_t past = 0;         // tokens already in the cache (absolute index of chunk token 0)
  Tensor positions;         // I64 [B * T] RoPE positions (unused without RoPE)
  Tensor key_valid;         // U8 [B, key_valid_stride]: keys 0 .. past + T - 1
  int64_t key_valid_stride = 0;
  bool causal = false;
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
