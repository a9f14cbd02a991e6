#include "layers/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/act_math.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {

FQ_MULTIVERSION void Norm::normalize_row(const float* xr, float* yr) const {
  const int64_t C = weight.numel();
  const float* w = weight.data<float>();
  const float* b = bias.defined() ? bias.data<float>() : nullptr;
  // Statistics in double: cheap here, and keeps us within fp32 rounding of PyTorch.
  double mean = 0.0;
  if (kind == Kind::LayerNorm) {
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < C; ++c) mean += xr[c];
    mean /= static_cast<double>(C);
  }
  double var = 0.0;
#pragma omp simd reduction(+ : var)
  for (int64_t c = 0; c < C; ++c) {
    const double d = xr[c] - mean;
    var += d * d;
  }
  var /= static_cast<double>(C);
  const float inv = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
  const float mu = static_cast<float>(mean);
  for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mu) * inv * w[c] + (b ? b[c] : 0.f);
}

Tensor Norm::forward(const Tensor& x) const { return rows(x).materialize(); }

FQ_MULTIVERSION void add_inplace(Tensor& x, const Tensor& y) {
  float* a = x.data<float>();
  const float* b = y.data<float>();
  const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

FQ_MULTIVERSION void silu_mul(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride, float* out, int64_t M,
              int64_t I) {
#pragma omp parallel for schedule(static) if (M * I > 65536)
  for (int64_t m = 0; m < M; ++m) {
    const float* g = gate + m * gate_stride;
    const float* u = up + m * up_stride;
    float* o = out + m * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + kernels::actmath::exp(-g[i])) * u[i];
  }
}

Rope::Rope(int64_t head_dim_, double theta) : head_dim(head_dim_) {
  // Same as transformers: inv_freq = 1 / theta^(2i / D), computed in fp32.
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const float expo = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq.push_back(1.0f / std::pow(static_cast<float>(theta), expo));
  }
}

void Rope::apply(float* xs, int64_t row, int64_t M, int64_t heads, const std::vector<int64_t>& positions) const {
  const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (M * row > 65536)
  for (int64_t m = 0; m < M; ++m) {
    std::vector<float> cs(half), sn(half);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[m]) * inv_freq[i];
      cs[i] = std::cos(angle);
      sn[i] = std::sin(angle);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = xs + m * row + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

FQ_MULTIVERSION void attention(const HeadView& q, const HeadView& k, const HeadView& v, float* out, int64_t B, int64_t H,
               int64_t KVH, int64_t Tq, int64_t Tk, int64_t D, const uint8_t* key_valid, int64_t key_valid_stride,
               int64_t causal_offset, float scale) {
  using namespace kernels;
  const int64_t group = H / KVH;
  const AttnScoresFn scores_fn = select_attention_scores();
  const AttnValuesFn values_fn = select_attention_values();
  const AttnSoftmaxFn softmax_fn = select_attention_softmax();
  // Keys seen by query t: causal ones stop at their own position.
  auto seen = [&](int64_t t) { return (causal_offset >= 0 ? std::min(Tk - 1, causal_offset + t) : Tk - 1) + 1; };
  const int64_t Tkp = (Tk + kAttnKeys - 1) / kAttnKeys * kAttnKeys;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / group;
      const uint8_t* valid = key_valid + b * key_valid_stride;
      // K^T of this head ([D, Tkp], zeros past the keys) and the probabilities of a query block.
      // Decode (fewer queries than a block): a dot product per cached key beats transposing the
      // whole cache every step.
      const bool transposed = Tq >= kAttnQueries;
      std::vector<float> kt(transposed ? static_cast<size_t>(D * Tkp) : 0, 0.f),
          probs(static_cast<size_t>(kAttnQueries * Tkp));
      const int64_t keys = transposed ? seen(Tq - 1) : 0;
      for (int64_t j = 0; j < keys; ++j) {
        const float* kv = k.at(b, kvh, j);
        for (int64_t d = 0; d < D; ++d) kt[d * Tkp + j] = kv[d];
      }
      for (int64_t t0 = 0; t0 < Tq; t0 += kAttnQueries) {
        const int nq = static_cast<int>(std::min<int64_t>(kAttnQueries, Tq - t0));
        const float* qs[kAttnQueries];
        float* os[kAttnQueries];
        for (int i = 0; i < nq; ++i) {
          qs[i] = q.at(b, h, t0 + i);
          os[i] = out + (b * Tq + t0 + i) * H * D + h * D;
        }
        const int64_t n_block = seen(t0 + nq - 1);
        if (transposed) {
          scores_fn(qs, nq, kt.data(), Tkp, (n_block + kAttnKeys - 1) / kAttnKeys * kAttnKeys, D, probs.data(), Tkp);
        } else {
          for (int i = 0; i < nq; ++i)
            for (int64_t j = 0; j < n_block; ++j) {
              const float* kv = k.at(b, kvh, j);
              float s = 0.f;
#pragma omp simd reduction(+ : s)
              for (int64_t d = 0; d < D; ++d) s += qs[i][d] * kv[d];
              probs[i * Tkp + j] = s;
            }
        }
        for (int i = 0; i < nq; ++i) {
          // Softmax over the visible keys; exact zeros elsewhere (masked, or after a causal query).
          float* p = probs.data() + i * Tkp;
          const int64_t n = seen(t0 + i);
          softmax_fn(p, valid, n, scale);
          std::fill(p + n, p + n_block, 0.f);
        }
        values_fn(probs.data(), Tkp, nq, v.at(b, kvh, 0), v.st, n_block, D, os);
      }
    }
  }
}

void gather_rows(const Tensor& table, const int64_t* ids, int64_t n, Tensor& out, bool add) {
  const int64_t C = table.dim(1);
  const float* src = table.data<float>();
  float* dst = out.data<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float* r = src + ids[i] * C;
    float* o = dst + i * C;
    if (add) {
      for (int64_t c = 0; c < C; ++c) o[c] += r[c];
    } else {
      std::memcpy(o, r, static_cast<size_t>(C) * sizeof(float));
    }
  }
}

}  // namespace finequant
