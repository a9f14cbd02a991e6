// Precision-independent building blocks of the transformer graph (norms, embeddings, RoPE,
// attention). They work on F32 activations laid out as rows of [tokens, features].
#pragma once
#include <cstdint>
#include <vector>

#include "finequant/tensor.h"
#include "kernels/cpu/gemm.h"

namespace finequant {

// LayerNorm (weight, bias) or RMSNorm (weight only, bias undefined) over the rows of x [M, C].
struct Norm {
  enum class Kind { LayerNorm, RMSNorm };
  Kind kind = Kind::LayerNorm;
  Tensor weight, bias;  // F32 [C]
  float eps = 1e-5f;
  Tensor forward(const Tensor& x) const;
  // The normalized rows of x, computed when a consumer asks for them (fused into the next GEMM).
  struct Rows final : kernels::RowSource {
    const Norm& norm;
    const float* x;
    Rows(const Norm& n, const Tensor& t) : norm(n), x(t.data<float>()) { rows = t.dim(0); cols = t.dim(1); }
    const float* row(int64_t m, float* scratch) const override {
      norm.normalize_row(x + m * cols, scratch);
      return scratch;
    }
  };
  Rows rows(const Tensor& x) const { return Rows(*this, x); }
  void normalize_row(const float* x, float* y) const;  // one row of C values
};

// x += y, elementwise (same shape).
void add_inplace(Tensor& x, const Tensor& y);
// SwiGLU: out[m, i] = silu(gate[m, i]) * up[m, i] over M rows of I values (rows `*_stride` apart).
void silu_mul(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride, float* out, int64_t M,
              int64_t I);

// Rotary position embedding, Hugging Face "rotate_half" layout: for each head, element i is paired
// with i + D/2. x: [tokens, heads * D]; positions: one per token.
struct Rope {
  int64_t head_dim = 0;
  std::vector<float> inv_freq;  // [D / 2]
  Rope() = default;
  Rope(int64_t head_dim, double theta);
  // x: M rows `row_stride` floats apart, each starting with heads * D values.
  void apply(float* x, int64_t row_stride, int64_t M, int64_t heads, const std::vector<int64_t>& positions) const;
};

// A strided view of a 4-D F32 array [B, heads, T, D]: element (b, h, t, d) is at
// data[b * sb + h * sh + t * st + d]. Lets attention read Q/K/V straight from projection outputs
// or from a KV cache without copies.
struct HeadView {
  const float* data = nullptr;
  int64_t sb = 0, sh = 0, st = 0;
  const float* at(int64_t b, int64_t h, int64_t t) const { return data + b * sb + h * sh + t * st; }
};

// Scaled dot-product attention with grouped-query heads (q head h reads kv head h / (H / KVH)).
//   q: [B, H, Tq, D], k/v: [B, KVH, Tk, D]; out: F32 [B * Tq, H * D] (token-major, ready for o_proj).
//   key_valid[b * key_valid_stride + j] != 0 when key j of sequence b may be attended to.
//   causal_offset >= 0: query t sits at absolute key index causal_offset + t and sees keys <= that;
//   causal_offset < 0: no causal mask (encoder).
// A query with no visible key gets a zero output (only happens at padded positions).
void attention(const HeadView& q, const HeadView& k, const HeadView& v, float* out, int64_t B, int64_t H,
               int64_t KVH, int64_t Tq, int64_t Tk, int64_t D, const uint8_t* key_valid, int64_t key_valid_stride,
               int64_t causal_offset, float scale);

// Rows of `table` [V, C] selected by ids, written to out rows (out must be [ids.size(), C]);
// add = true accumulates instead of overwriting.
void gather_rows(const Tensor& table, const int64_t* ids, int64_t n, Tensor& out, bool add);

}  // namespace finequant
