#include "layers/attention.h"

#include <cmath>

namespace finequant {

AttentionContext bidirectional_attention(const ExecContext& ctx, const uint8_t* mask, int64_t B, int64_t T) {
  AttentionContext a;
  a.B = B;
  a.T = T;
  a.key_valid = Tensor::borrow(const_cast<uint8_t*>(mask), DType::U8, {B, T}).to(ctx.device);
  a.key_valid_stride = T;
  a.causal = false;
  return a;
}

Rope::Rope(int64_t head_dim_, double theta, Device device) : head_dim(head_dim_) {
  // Same as transformers: inv_freq = 1 / theta^(2i / D), computed in fp32.
  Tensor f = Tensor::empty(DType::F32, {head_dim / 2});
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const float expo = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    f.data<float>()[i] = 1.0f / std::pow(static_cast<float>(theta), expo);
  }
  inv_freq = f.to(device);
}

Tensor SelfAttention::forward(const ExecContext& ctx, const kernels::GemmInput& x, const AttentionContext& actx,
                              LayerKV* cache) const {
  const kernels::Backend& be = *ctx.backend;
  const int64_t B = actx.B, T = actx.T, D = head_dim, H = heads, KVH = kv_heads;
  std::vector<Tensor> outs = Linear::forward_each(ctx, qkv, x);
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
    be.rope(ctx, qp, qs, B * T, H, rope->inv_freq, actx.positions);
    be.rope(ctx, kp, ks, B * T, KVH, rope->inv_freq, actx.positions);
  }
  // Token-major projections viewed as [B, heads, T, D].
  kernels::HeadView qv{qp, T * qs, D, qs};
  kernels::HeadView kv{kp, T * ks, D, ks};
  kernels::HeadView vv{vp, T * vs, D, vs};
  int64_t Tk = T;
  if (cache) {
    be.kv_append(ctx, kv, vv, cache->k, cache->v, actx.past, T);
    const int64_t cap = cache->k.dim(2);
    kv = kernels::HeadView{cache->k.data<float>(), KVH * cap * D, cap * D, D};
    vv = kernels::HeadView{cache->v.data<float>(), KVH * cap * D, cap * D, D};
    Tk = actx.past + T;
  }
  Tensor out = Tensor::empty(DType::F32, {B * T, H * D}, ctx.device);
  kernels::AttentionArgs a;
  a.q = qv;
  a.k = kv;
  a.v = vv;
  a.out = out.data<float>();
  a.B = B;
  a.H = H;
  a.KVH = KVH;
  a.Tq = T;
  a.Tk = Tk;
  a.D = D;
  a.key_valid = actx.key_valid.data<uint8_t>();
  a.key_valid_stride = actx.key_valid_stride;
  a.causal_offset = actx.causal ? actx.past : -1;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  be.attention(ctx, a);
  return o.forward(ctx, out);
}

CrossKV CrossAttention::project(const ExecContext& ctx, const Tensor& memory, int64_t B, int64_t Tm,
                                Tensor key_valid) const {
  const kernels::Backend& be = *ctx.backend;
  const int64_t H = heads, D = head_dim;
  const std::vector<Tensor> outs = Linear::forward_each(ctx, kv, kernels::GemmInput{memory});
  const bool merged = outs.size() == 1;
  const float* kp = outs[0].data<float>();
  const float* vp = merged ? outs[0].data<float>() + H * D : outs[1].data<float>();
  const int64_t ks = outs[0].dim(1), vs = outs[merged ? 0 : 1].dim(1);
  CrossKV m;
  m.Tm = Tm;
  m.key_valid = std::move(key_valid);
  const Shape s{B, H, Tm, D};
  m.kv = LayerKV{Tensor::empty(DType::F32, s, ctx.device), Tensor::empty(DType::F32, s, ctx.device)};
  // Token-major projections viewed as [B, H, Tm, D], stored head-major like a KV cache.
  be.kv_append(ctx, kernels::HeadView{kp, Tm * ks, D, ks}, kernels::HeadView{vp, Tm * vs, D, vs}, m.kv.k, m.kv.v, 0,
               Tm);
  return m;
}

Tensor CrossAttention::forward(const ExecContext& ctx, const kernels::GemmInput& x, int64_t B, int64_t T,
                               const CrossKV& mem) const {
  const int64_t H = heads, D = head_dim, Tm = mem.Tm;
  const Tensor qt = q.forward(ctx, x);
  Tensor out = Tensor::empty(DType::F32, {B * T, H * D}, ctx.device);
  kernels::AttentionArgs a;
  a.q = kernels::HeadView{qt.data<float>(), T * H * D, D, H * D};
  a.k = kernels::HeadView{mem.kv.k.data<float>(), H * Tm * D, Tm * D, D};
  a.v = kernels::HeadView{mem.kv.v.data<float>(), H * Tm * D, Tm * D, D};
  a.out = out.data<float>();
  a.B = B;
  a.H = a.KVH = H;
  a.Tq = T;
  a.Tk = Tm;
  a.D = D;
  a.key_valid = mem.key_valid.data<uint8_t>();
  a.key_valid_stride = Tm;
  a.causal_offset = -1;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  ctx.backend->attention(ctx, a);
  return o.forward(ctx, out);
}

}  // namespace finequant
