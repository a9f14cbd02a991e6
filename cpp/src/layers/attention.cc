#include "layers/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

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

namespace {
// 1 / theta^(2i / D) in fp32, as transformers computes it (base ** (arange(0, D, 2).float() / D)).
std::vector<float> base_frequencies(int64_t head_dim, float theta) {
  std::vector<float> f(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i)
    f[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
  return f;
}
}  // namespace

// The rope_type formulas of transformers' modeling_rope_utils, in its fp32 / double split.
Tensor Rope::frequencies(int64_t head_dim, const RopeConfig& r, int64_t seq_len) {
  const int64_t half = head_dim / 2;
  std::vector<float> f;
  if (r.type == "dynamic") {
    // base * ((factor * seq_len / max_positions) - (factor - 1)) ** (D / (D - 2)), fp32 tensor math
    const int64_t max_positions = r.original_max_positions;
    const float len = static_cast<float>(std::max(seq_len, max_positions));
    const float grow = static_cast<float>(r.factor) * len / static_cast<float>(max_positions) -
                       static_cast<float>(r.factor - 1);
    const float base = static_cast<float>(r.theta) *
                       std::pow(grow, static_cast<float>(static_cast<double>(head_dim) / (head_dim - 2)));
    f = base_frequencies(head_dim, base);
  } else if (r.type == "yarn") {
    const double pi = 3.14159265358979323846, base = r.theta, dim = static_cast<double>(head_dim);
    auto correction_dim = [&](double rotations) {
      const double positions = static_cast<double>(r.original_max_positions);
      return dim * std::log(positions / (rotations * 2 * pi)) / (2 * std::log(base));
    };
    double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
    if (r.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, dim - 1);
    if (low == high) high += 0.001;  // transformers: prevent a singular ramp
    f.resize(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
      const float pf = std::pow(static_cast<float>(r.theta), static_cast<float>(2 * i) / static_cast<float>(head_dim));
      const float extrapolation = 1.0f / pf, interpolation = 1.0f / (static_cast<float>(r.factor) * pf);
      const float ramp = std::clamp((static_cast<float>(i) - static_cast<float>(low)) /
                                        static_cast<float>(high - low), 0.0f, 1.0f);
      const float keep = 1.0f - ramp;  // the extrapolation share
      f[i] = interpolation * (1.0f - keep) + extrapolation * keep;
    }
  } else {
    f = base_frequencies(head_dim, static_cast<float>(r.theta));
    if (r.type == "linear") {
      for (float& v : f) v /= static_cast<float>(r.factor);
    } else if (r.type == "llama3") {
      const double pi = 3.14159265358979323846, old_len = static_cast<double>(r.original_max_positions);
      const float low_wavelen = static_cast<float>(old_len / r.low_freq_factor);
      const float high_wavelen = static_cast<float>(old_len / r.high_freq_factor);
      const float factor = static_cast<float>(r.factor);
      for (float& v : f) {
        const float wavelen = static_cast<float>(2 * pi) / v;
        const float scaled = wavelen > low_wavelen ? v / factor : v;
        const float smooth = (static_cast<float>(old_len) / wavelen - static_cast<float>(r.low_freq_factor)) /
                             static_cast<float>(r.high_freq_factor - r.low_freq_factor);
        const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
        v = medium ? (1.0f - smooth) * scaled / factor + smooth * scaled : scaled;
      }
    }
  }
  Tensor t = Tensor::empty(DType::F32, {half});
  std::copy(f.begin(), f.end(), t.data<float>());
  return t;
}

Rope::Rope(int64_t head_dim_, const RopeConfig& config_, Device device) : head_dim(head_dim_), config(config_) {
  inv_freq = frequencies(head_dim, config, 0).to(device);
}

Tensor Rope::inv_freq_for(int64_t seq_len, Device device) const {
  if (config.type != "dynamic" || seq_len <= config.original_max_positions) return inv_freq;
  return frequencies(head_dim, config, seq_len).to(device);
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
    const Tensor& inv_freq = actx.rope_inv_freq.defined() ? actx.rope_inv_freq : rope->inv_freq;
    be.rope(ctx, qp, qs, B * T, H, inv_freq, actx.positions);
    be.rope(ctx, kp, ks, B * T, KVH, inv_freq, actx.positions);
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
  a.scale = scale > 0.f ? scale : 1.0f / std::sqrt(static_cast<float>(D));
  if (rope) a.scale *= rope->attention_factor() * rope->attention_factor();  // yarn's cos/sin scaling
  if (window > 0) {
    FQ_CHECK_ARG(actx.key_positions.defined(), "sliding-window attention needs the keys' positions");
    a.window = window;
    a.query_positions = actx.positions.data<int64_t>();
    a.key_positions = actx.key_positions.data<int64_t>();
  }
  a.softcap = softcap;
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
