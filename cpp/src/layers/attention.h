// Multi-head self-attention over a batch of sequences, optionally with RoPE, grouped-query heads,
// a causal mask and a KV cache. Precision lives in the Linears, not here.
#pragma once
#include <vector>

#include "layers/linear.h"
#include "layers/ops.h"

namespace finequant {

// Keys and values of one layer for every sequence: [B, KVH, capacity, D].
struct LayerKV {
  Tensor k, v;
};

// What attention needs to know about the current chunk of tokens ([B, T], token-major rows).
struct AttentionContext {
  int64_t B = 0, T = 0;
  int64_t past = 0;                       // tokens already in the cache (absolute index of chunk token 0)
  const std::vector<int64_t>* positions;  // [B * T] RoPE positions (unused without RoPE)
  const uint8_t* key_valid = nullptr;     // [B, key_valid_stride]: keys 0 .. past + T - 1
  int64_t key_valid_stride = 0;
  bool causal = false;
};

class SelfAttention {
 public:
  // The q, k, v projections: one Linear whose output rows are [q | k | v] (GPT-2's c_attn, or
  // separate modules merged at load), or three Linears.
  std::vector<Linear> qkv;
  Linear o;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  const Rope* rope = nullptr;  // null: no rotary embedding

  // x: [B * T, C] rows (stored, or made by a fused producer such as the block's norm) -> [B * T, C].
  // With `cache`, the chunk's keys/values are stored at [past, past + T) and attention reads the
  // whole cache prefix.
  Tensor forward(const kernels::RowSource& x, const AttentionContext& ctx, LayerKV* cache) const;
};

}  // namespace finequant
