#include "layers/attention.h"

#include <cmath>
#include <cstring>

namespace finequant {

Tensor SelfAttention::forward(const kernels::RowSource& x, const AttentionContext& ctx, LayerKV* cache) const {
  const int64_t B = ctx.B, T = ctx.T, D = head_dim, H = heads, KVH = kv_heads;
  std::vector<Tensor> outs = Linear::forward_each(qkv, x);
  // q, k, v in place: (data, row stride) inside the merged output or their own tensors.
  const bool merged = outs.size() == 1;
  auto part = [&](int i, int64_t first_col) {
    Tensor& t = outs[merged ? 0 : i];
    return std::pair<float*, int64_t>{t.data<float>() + (merged ? first_col : 0), t.dim(1)};
  };
  const auto [qp, qs] = part(0, 0);
  const auto [kp, ks] = part(1, H * D);
  const auto [vp, vs] = part(2, H * D + KVH * D);
  if (rope) {
    rope->apply(qp, qs, B * T, H, *ctx.positions);
    rope->apply(kp, ks, B * T, KVH, *ctx.positions);
  }
  // Token-major projections viewed as [B, heads, T, D].
  HeadView qv{qp, T * qs, D, qs};
  HeadView kv{kp, T * ks, D, ks};
  HeadView vv{vp, T * vs, D, vs};
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
