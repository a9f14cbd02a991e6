#include "layers/attention.h"

#include <cmath>
#include <cstring>

namespace finequant {

namespace {

// Columns [c0, c0 + width) of x [M, W] as a new [M, width] tensor.
Tensor slice_cols(const Tensor& x, int64_t c0, int64_t width) {
  const int64_t M = x.dim(0), W = x.dim(1);
  Tensor out = Tensor::empty(DType::F32, {M, width});
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(out.data<float>() + m * width, x.data<float>() + m * W + c0, static_cast<size_t>(width) * sizeof(float));
  return out;
}

}  // namespace

Tensor SelfAttention::forward(const Tensor& x, const AttentionContext& ctx, LayerKV* cache) const {
  const int64_t B = ctx.B, T = ctx.T, D = head_dim, H = heads, KVH = kv_heads;
  Tensor qt, kt, vt;
  if (fused_qkv) {
    const Tensor all = qkv.forward(x);
    qt = slice_cols(all, 0, H * D);
    kt = slice_cols(all, H * D, KVH * D);
    vt = slice_cols(all, H * D + KVH * D, KVH * D);
  } else {
    qt = q.forward(x);
    kt = k.forward(x);
    vt = v.forward(x);
  }
  if (rope) {
    rope->apply(qt, H, *ctx.positions);
    rope->apply(kt, KVH, *ctx.positions);
  }
  // Token-major projections viewed as [B, heads, T, D].
  HeadView qv{qt.data<float>(), T * H * D, D, H * D};
  HeadView kv{kt.data<float>(), T * KVH * D, D, KVH * D};
  HeadView vv{vt.data<float>(), T * KVH * D, D, KVH * D};
  int64_t Tk = T;
  if (cache) {
    const int64_t cap = cache->k.dim(2);
    float* kc = cache->k.data<float>();
    float* vc = cache->v.data<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < KVH; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const size_t off = static_cast<size_t>(((b * KVH + h) * cap + ctx.past + t) * D);
          std::memcpy(kc + off, kv.at(b, h, t), static_cast<size_t>(D) * sizeof(float));
          std::memcpy(vc + off, vv.at(b, h, t), static_cast<size_t>(D) * sizeof(float));
        }
    kv = HeadView{kc, KVH * cap * D, cap * D, D};
    vv = HeadView{vc, KVH * cap * D, cap * D, D};
    Tk = ctx.past + T;
  }
  Tensor out = Tensor::empty(DType::F32, {B * T, H * D});
  attention(qv, kv, vv, out.data<float>(), B, H, KVH, T, Tk, D, ctx.key_valid, ctx.key_valid_stride,
            ctx.causal ? ctx.past : -1, 1.0f / std::sqrt(static_cast<float>(D)));
  return o.forward(out);
}

}  // namespace finequant
