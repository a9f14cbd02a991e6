#include "kernels/cpu/elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/act_math.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {
namespace kernels {

namespace {

FQ_MULTIVERSION void add_range(float* a, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

FQ_MULTIVERSION void silu_mul_rows(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride, float* out,
                                   int64_t m0, int64_t m1, int64_t I) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* g = gate + m * gate_stride;
    const float* u = up + m * up_stride;
    float* o = out + m * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + actmath::exp(-g[i])) * u[i];
  }
}

FQ_MULTIVERSION void gelu_tanh_mul_rows(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride,
                                        float* out, int64_t m0, int64_t m1, int64_t I) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* g = gate + m * gate_stride;
    const float* u = up + m * up_stride;
    float* o = out + m * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) o[i] = actmath::gelu_tanh(g[i]) * u[i];
  }
}

}  // namespace

void add_inplace(float* a, const float* b, int64_t n, ThreadPool& pool) {
  parallel_for(pool, n, kParallelElements, [&](int64_t i0, int64_t i1) { add_range(a + i0, b + i0, i1 - i0); });
}

void gated_mul(GateActivation act, const float* gate, int64_t gate_stride, const float* up, int64_t up_stride,
               float* out, int64_t M, int64_t I, ThreadPool& pool) {
  parallel_for(pool, M, parallel_rows_grain(I), [&](int64_t m0, int64_t m1) {
    if (act == GateActivation::Silu) silu_mul_rows(gate, gate_stride, up, up_stride, out, m0, m1, I);
    else gelu_tanh_mul_rows(gate, gate_stride, up, up_stride, out, m0, m1, I);
  });
}

void softcap(float* x, int64_t n, float cap, ThreadPool& pool) {
  parallel_for(pool, n, kParallelElements, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) x[i] = std::tanh(x[i] / cap) * cap;
  });
}

namespace {

// The cos and sin of one position's angles, kept for the thread's next row: a decode step rotates the
// q and k of every layer at the same position with the same frequencies (2 x layers calls a token,
// each recomputing them was ~1% of a SmolLM2 decode step). Keyed by the values, not the pointer, as
// a frequency table may be freed and another one allocated at its address.
struct RopeAngles {
  int64_t position = -1;
  std::vector<float> freq, cs, sn;

  void compute(int64_t pos, const float* inv_freq, int64_t half) {
    if (pos == position && freq.size() == static_cast<size_t>(half) &&
        std::memcmp(freq.data(), inv_freq, static_cast<size_t>(half) * sizeof(float)) == 0)
      return;
    freq.assign(inv_freq, inv_freq + half);
    cs.resize(static_cast<size_t>(half));
    sn.resize(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos) * inv_freq[i];
      cs[i] = std::cos(angle);
      sn[i] = std::sin(angle);
    }
    position = pos;
  }
};

}  // namespace

void rope(float* xs, int64_t row, int64_t M, int64_t heads, const float* inv_freq, int64_t half,
          const int64_t* positions, ThreadPool& pool) {
  const int64_t head_dim = 2 * half;
  parallel_for(pool, M, parallel_rows_grain(row), [&](int64_t m0, int64_t m1) {
    thread_local RopeAngles angles;
    for (int64_t m = m0; m < m1; ++m) {
      angles.compute(positions[m], inv_freq, half);
      const float* cs = angles.cs.data();
      const float* sn = angles.sn.data();
      for (int64_t h = 0; h < heads; ++h) {
        float* v = xs + m * row + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cs[i] - b * sn[i];
          v[i + half] = b * cs[i] + a * sn[i];
        }
      }
    }
  });
}

void gather_rows(const float* src, int64_t C, const int64_t* ids, int64_t n, float* dst, bool add) {
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

void kv_append(const HeadView& k, const HeadView& v, float* kc, float* vc, int64_t B, int64_t KVH, int64_t cap,
               int64_t past, int64_t T, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const size_t off = static_cast<size_t>(((b * KVH + h) * cap + past + t) * D);
        std::memcpy(kc + off, k.at(b, h, t), static_cast<size_t>(D) * sizeof(float));
        std::memcpy(vc + off, v.at(b, h, t), static_cast<size_t>(D) * sizeof(float));
      }
}

}  // namespace kernels
}  // namespace finequant
