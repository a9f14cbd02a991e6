#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/act_math.h"
#include "kernels/cpu/aligned_vector.h"
#include "kernels/cpu/multiversion.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FQ_ATTN_AVX512 1
#include "kernels/cpu/act_math_avx512.h"
#define FQ_AVX512 FQ_VNNI
#else
#define FQ_ATTN_AVX512 0
#endif

namespace finequant {
namespace kernels {

// The portable forms (target clones; external linkage as target_clones needs).
FQ_MULTIVERSION bool attention_softmax_ref(float* p, const uint8_t* valid, int64_t n, float scale) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  float mx = kNone;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = valid[j] ? p[j] * scale : kNone;
    mx = std::max(mx, p[j]);
  }
  if (mx == kNone) {
    std::fill(p, p + n, 0.f);
    return false;
  }
  float denom = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = valid[j] ? actmath::exp(p[j] - mx) : 0.f;
    denom += p[j];
  }
  const float inv = 1.f / denom;
  for (int64_t j = 0; j < n; ++j) p[j] *= inv;
  return true;
}

FQ_MULTIVERSION void attention_scores_ref(const float* const* q, int nq, const float* kt, int64_t ld_kt, int64_t nkeys,
                                          int64_t D, float* scores, int64_t ld) {
  for (int i = 0; i < nq; ++i) {
    float* s = scores + i * ld;
    std::fill(s, s + nkeys, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[i][d];
      const float* kr = kt + d * ld_kt;
#pragma omp simd
      for (int64_t j = 0; j < nkeys; ++j) s[j] += qd * kr[j];
    }
  }
}

// q . k in 16 independent partial sums (then added in a fixed order): a plain loop that every clone
// vectorizes without reassociating, where a single running sum was a scalar FMA chain (4 cycles per
// element: 6-8% of a SmolLM2 decode step).
FQ_MULTIVERSION void attention_key_scores_ref(const float* q, const float* k, int64_t k_stride, int64_t n, int64_t D,
                                              float* scores) {
  constexpr int kLanes = 16;
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = k + j * k_stride;
    float part[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes)
      for (int l = 0; l < kLanes; ++l) part[l] += q[d + l] * kr[d + l];
    for (int l = 0; d + l < D; ++l) part[l] += q[d + l] * kr[d + l];
    float sum = 0.f;
    for (int l = 0; l < kLanes; ++l) sum += part[l];
    scores[j] = sum;
  }
}

FQ_MULTIVERSION void attention_values_ref(const float* p, int64_t ld, int nq, const float* v, int64_t v_stride,
                                          int64_t n, int64_t D, float* const* out) {
  for (int i = 0; i < nq; ++i) {
    float* o = out[i];
    std::fill(o, o + D, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[i * ld + j];
      const float* vv = v + j * v_stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += pj * vv[d];
    }
  }
}

FQ_MULTIVERSION void attention_transpose_ref(const float* k, int64_t k_stride, int64_t n, int64_t D, float* kt,
                                             int64_t ld) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * ld + j] = k[j * k_stride + d];
}

AttentionKernel attention_ref() {
  return {CpuIsa::Ref, attention_scores_ref, attention_key_scores_ref, attention_values_ref, attention_softmax_ref,
          attention_transpose_ref};
}

#if FQ_ATTN_AVX512

namespace {

// NQ queries x 64 keys: 4 * NQ accumulators; per d, 4 K^T loads shared by the NQ queries. Up to 6
// (24 accumulators): 4 queries left the loads (4 K^T + 4 broadcasts per 16 FMAs) at the ports' limit.
template <int NQ>
FQ_AVX512 void scores_tile(const float* const* q, const float* kt, int64_t ld_kt, int64_t j0, int64_t D, float* scores,
                           int64_t ld) {
  __m512 acc[NQ][4];
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* kr = kt + d * ld_kt + j0;
    const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16), k2 = _mm512_loadu_ps(kr + 32),
                 k3 = _mm512_loadu_ps(kr + 48);
#pragma GCC unroll 6
    for (int i = 0; i < NQ; ++i) {
      const __m512 qb = _mm512_set1_ps(q[i][d]);
      acc[i][0] = _mm512_fmadd_ps(qb, k0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(qb, k1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(qb, k2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(qb, k3, acc[i][3]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(scores + i * ld + j0 + 16 * c, acc[i][c]);
}

// NQ queries x 64 output values (masked past D): per key, 4 V loads shared by the NQ queries. (Every
// loop unrolled: otherwise GCC 12 stored all the accumulators to the stack on every key.)
template <int NQ>
FQ_AVX512 void values_tile(const float* p, int64_t ld, const float* v, int64_t v_stride, int64_t n, int64_t d0,
                           int64_t D, float* const* out) {
  __m512 acc[NQ][4];
#pragma GCC unroll 8
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
  __mmask16 mask[4];
  for (int c = 0; c < 4; ++c) {
    const int64_t w = std::clamp<int64_t>(D - d0 - 16 * c, 0, 16);
    mask[c] = w == 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << w) - 1);
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = v + j * v_stride + d0;
    const __m512 v0 = _mm512_maskz_loadu_ps(mask[0], vr), v1 = _mm512_maskz_loadu_ps(mask[1], vr + 16),
                 v2 = _mm512_maskz_loadu_ps(mask[2], vr + 32), v3 = _mm512_maskz_loadu_ps(mask[3], vr + 48);
#pragma GCC unroll 6
    for (int i = 0; i < NQ; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * ld + j]);
      acc[i][0] = _mm512_fmadd_ps(pb, v0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(pb, v1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(pb, v2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(pb, v3, acc[i][3]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(out[i] + d0 + 16 * c, mask[c], acc[i][c]);
}

// 16 keys at a time: key l's products in one vector (lane L sums q[d] k[d] over d = L mod 16, chunk by
// chunk), then one reduction tree for the 16 vectors in which every key takes the same path (lanes L and
// L + 8 added, then L and L + 4, L + 2, L + 1), so a key's score does not depend on its slot. Against the
// portable per-key sums: one decode attention of 9 heads over 64 keys, cache hot, one thread (Zen 4)
// 5.45 -> 3.48 us (DESIGN 5.4).
FQ_AVX512 void attention_key_scores_avx512(const float* q, const float* k, int64_t k_stride, int64_t n, int64_t D,
                                           float* scores) {
  const __m512i key_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t keys = std::min<int64_t>(16, n - j0);
    __m512 p[16];
#pragma GCC unroll 16
    for (int l = 0; l < 16; ++l) p[l] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (D - d)) - 1);
      const __m512 qd = _mm512_maskz_loadu_ps(m, q + d);
      const float* kd = k + j0 * k_stride + d;
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l)
        if (l < keys) p[l] = _mm512_fmadd_ps(qd, _mm512_maskz_loadu_ps(m, kd + l * k_stride), p[l]);
    }
    __m512 r[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)  // quarters: key 2i (q0 + q2, q1 + q3), key 2i + 1 (the same)
      r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xEE));
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)  // quarter t: key 4i + t, 4 lanes
      r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0xDD));
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)  // quarter t: keys 8i + t and 8i + 4 + t, 2 lanes each
      r[i] = _mm512_add_ps(_mm512_shuffle_ps(r[2 * i], r[2 * i + 1], 0x44), _mm512_shuffle_ps(r[2 * i], r[2 * i + 1], 0xEE));
    // lane 4t + u: key 4u + t
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], 0x88), _mm512_shuffle_ps(r[0], r[1], 0xDD));
    _mm512_mask_storeu_ps(scores + j0, static_cast<__mmask16>((1u << keys) - 1), _mm512_permutexvar_ps(key_order, s));
  }
}

FQ_AVX512 bool attention_softmax_avx512(float* p, const uint8_t* valid, int64_t n, float scale) {
  const __m512 none = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vscale = _mm512_set1_ps(scale);
  auto mask_at = [&](int64_t j) FQ_AVX512 {  // lanes that exist and hold a valid key
    const __mmask16 in = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    return _mm_mask_cmpneq_epi8_mask(in, _mm_maskz_loadu_epi8(in, valid + j), _mm_setzero_si128());
  };
  __m512 vmax = none;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask_at(j);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), vscale));
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  if (mx == -std::numeric_limits<float>::infinity()) {
    std::fill(p, p + n, 0.f);
    return false;
  }
  const __m512 vmx = _mm512_set1_ps(mx);
  // The denominator sums the valid keys' exponentials in key order, 16 at a time, wherever the keys
  // sit: masked slots between them (padding, another request's turn in a shared cache, DESIGN section
  // 11) do not shift the lanes, so a sequence gets the same bits with or without gaps.
  __m512 sum = _mm512_setzero_ps();
  alignas(64) float packed[32];
  int filled = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask_at(j);
    const __mmask16 in = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 x = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), vscale), vmx);
    const __m512 e = _mm512_maskz_mov_ps(m, exp_v(x));
    _mm512_storeu_ps(packed + filled, _mm512_maskz_compress_ps(m, e));  // register compress: fast everywhere
    filled += __builtin_popcount(m);
    if (filled >= 16) {
      sum = _mm512_add_ps(sum, _mm512_load_ps(packed));
      _mm512_store_ps(packed, _mm512_load_ps(packed + 16));
      filled -= 16;
    }
    _mm512_mask_storeu_ps(p + j, in, e);
  }
  sum = _mm512_add_ps(sum, _mm512_maskz_load_ps(static_cast<__mmask16>((1u << filled) - 1), packed));
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(p + j, in, _mm512_mul_ps(_mm512_maskz_loadu_ps(in, p + j), inv));
  }
  return true;
}

// 16 x 16 blocks in registers: rows = keys, columns = d. The scalar loop (a store every 4 * ld bytes)
// was ~95% of attention_head's time, 5% of a BERT-base w8a8 8 x 128 forward (perf, Xeon with AMX).
FQ_AVX512 void transpose_block(const float* src, int64_t ss, int rows, int cols, float* dst, int64_t ds) {
  const __mmask16 cm = static_cast<__mmask16>((1u << cols) - 1), rm = static_cast<__mmask16>((1u << rows) - 1);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * ss) : _mm512_setzero_ps();
  // Per 128-bit lane L: t[2i] / t[2i + 1] interleave rows 2i, 2i + 1 at columns 4L, 4L + 1 / 4L + 2, 4L + 3.
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4g + c], lane L: rows 4g..4g + 3 of column 4L + c.
#pragma GCC unroll 4
  for (int g = 0; g < 16; g += 4) {
    r[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
    r[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
    r[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    r[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  // Column 4L + c gathers lane L of r[c], r[4 + c], r[8 + c], r[12 + c]: a 4 x 4 transpose of lanes.
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88),
                 v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    t[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    if (i < cols) _mm512_mask_storeu_ps(dst + i * ds, rm, t[i]);
}

void attention_transpose_avx512(const float* k, int64_t k_stride, int64_t n, int64_t D, float* kt, int64_t ld) {
  for (int64_t j = 0; j < n; j += 16)
    for (int64_t d = 0; d < D; d += 16)
      transpose_block(k + j * k_stride + d, k_stride, static_cast<int>(std::min<int64_t>(16, n - j)),
                      static_cast<int>(std::min<int64_t>(16, D - d)), kt + d * ld + j, ld);
}

void attention_scores_avx512(const float* const* q, int nq, const float* kt, int64_t ld_kt, int64_t nkeys, int64_t D,
                             float* scores, int64_t ld) {
  for (int64_t j0 = 0; j0 < nkeys; j0 += kAttnKeys) {
    switch (nq) {
      case 1: scores_tile<1>(q, kt, ld_kt, j0, D, scores, ld); break;
      case 2: scores_tile<2>(q, kt, ld_kt, j0, D, scores, ld); break;
      case 3: scores_tile<3>(q, kt, ld_kt, j0, D, scores, ld); break;
      case 4: scores_tile<4>(q, kt, ld_kt, j0, D, scores, ld); break;
      case 5: scores_tile<5>(q, kt, ld_kt, j0, D, scores, ld); break;
      default: scores_tile<6>(q, kt, ld_kt, j0, D, scores, ld); break;
    }
  }
}

void attention_values_avx512(const float* p, int64_t ld, int nq, const float* v, int64_t v_stride, int64_t n,
                             int64_t D, float* const* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    switch (nq) {
      case 1: values_tile<1>(p, ld, v, v_stride, n, d0, D, out); break;
      case 2: values_tile<2>(p, ld, v, v_stride, n, d0, D, out); break;
      case 3: values_tile<3>(p, ld, v, v_stride, n, d0, D, out); break;
      case 4: values_tile<4>(p, ld, v, v_stride, n, d0, D, out); break;
      case 5: values_tile<5>(p, ld, v, v_stride, n, d0, D, out); break;
      default: values_tile<6>(p, ld, v, v_stride, n, d0, D, out); break;
    }
  }
}

}  // namespace

AttentionKernel attention_avx512() {
  return {CpuIsa::Avx512Vnni, attention_scores_avx512, attention_key_scores_avx512, attention_values_avx512,
          attention_softmax_avx512, attention_transpose_avx512};
}

#else

AttentionKernel attention_avx512() { return {CpuIsa::Avx512Vnni, nullptr, nullptr, nullptr, nullptr, nullptr}; }

#endif

// The loops around the inner products: masking, softmax, GQA head mapping, decode without K^T.
// One (sequence, head) pair.
FQ_MULTIVERSION void attention_head(const AttentionArgs& a, const AttentionKernel& kernel, int64_t b, int64_t h) {
  const HeadView &q = a.q, &k = a.k, &v = a.v;
  float* out = a.out;
  const int64_t H = a.H, KVH = a.KVH, Tq = a.Tq, Tk = a.Tk, D = a.D;
  const uint8_t* key_valid = a.key_valid;
  const int64_t key_valid_stride = a.key_valid_stride, causal_offset = a.causal_offset;
  const float scale = a.scale;
  const int64_t group = H / KVH;
  const AttnScoresFn scores_fn = kernel.scores;
  const AttnValuesFn values_fn = kernel.values;
  const AttnSoftmaxFn softmax_fn = kernel.softmax;
  const AttnTransposeFn transpose_fn = kernel.transpose;
  // Keys seen by query t: causal ones stop at their own position.
  auto seen = [&](int64_t t) { return (causal_offset >= 0 ? std::min(Tk - 1, causal_offset + t) : Tk - 1) + 1; };
  // Sliding window: the first key query t may see (key positions never decrease along the cache).
  const int64_t* key_pos = a.window > 0 ? a.key_positions + b * key_valid_stride : nullptr;
  auto window_start = [&](int64_t t, int64_t n) -> int64_t {
    if (!key_pos) return 0;
    const int64_t oldest = a.query_positions[b * Tq + t] - a.window + 1;
    return std::lower_bound(key_pos, key_pos + n, oldest) - key_pos;
  };
  const int64_t Tkp = (Tk + kAttnKeys - 1) / kAttnKeys * kAttnKeys;
  const int64_t kvh = h / group;
  const uint8_t* valid = key_valid + b * key_valid_stride;
  // K^T of this head ([D, Tkp], zeros past the keys) and the probabilities of a query block.
  // Decode (fewer queries than a block): a dot product per cached key beats transposing the
  // whole cache every step.
  const bool transposed = Tq >= kAttnTransposeQueries;
  thread_local AlignedVector<float> kt, vc, probs;  // reused by the thread's next heads
  probs.resize(static_cast<size_t>(kAttnQueries * Tkp));
  if (transposed) {
    kt.resize(static_cast<size_t>(D * Tkp));
    const int64_t keys = seen(Tq - 1);
    transpose_fn(k.at(b, kvh, 0), k.st, keys, D, kt.data(), Tkp);
    for (int64_t d = 0; d < D; ++d) std::fill(kt.data() + d * Tkp + keys, kt.data() + (d + 1) * Tkp, 0.f);
    // The values too, contiguous: rows of a fused QKV output lie 3 H D floats apart, so one head's
    // values fall into a few L1 sets (16 of 64 for BERT-base) and every query block re-read them from L2.
    vc.resize(static_cast<size_t>(keys * D));
    for (int64_t j = 0; j < keys; ++j) std::copy(v.at(b, kvh, j), v.at(b, kvh, j) + D, vc.data() + j * D);
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
      for (int i = 0; i < nq; ++i) kernel.key_scores(qs[i], k.at(b, kvh, 0), k.st, n_block, D, probs.data() + i * Tkp);
    }
    for (int i = 0; i < nq; ++i) {
      // Softmax over the visible keys; exact zeros elsewhere (masked, outside a sliding window, or
      // after a causal query).
      float* p = probs.data() + i * Tkp;
      const int64_t n = seen(t0 + i);
      const int64_t first = window_start(t0 + i, n);
      float s = scale;
      if (a.softcap > 0.f) {  // cap * tanh(scale * q.k / cap), then the softmax of those
        for (int64_t j = first; j < n; ++j) p[j] = std::tanh(p[j] * scale / a.softcap) * a.softcap;
        s = 1.f;
      }
      softmax_fn(p + first, valid + first, n - first, s);
      std::fill(p, p + first, 0.f);
      std::fill(p + n, p + n_block, 0.f);
    }
    values_fn(probs.data(), Tkp, nq, transposed ? vc.data() : v.at(b, kvh, 0), transposed ? D : v.st, n_block, D, os);
  }
}

void attention(const ExecContext& ctx, const AttentionArgs& args, const AttentionKernel& kernel) {
  // Guided runs of consecutive (sequence, head) pairs: the heads of a GQA group mostly share a thread,
  // which fetches the group's cached keys and values once (decode reads them from DRAM; a task per head
  // had both threads fetch every group: SmolLM2 decode attention 11.8 -> 9.5 us a layer, DESIGN 5.5).
  ThreadPool& pool = ctx.threads();
  const WorkRuns runs = guided_runs(args.B * args.H, pool.size());
  pool.run(runs.count, [&](int64_t r) {
    for (int64_t t = runs.begin(r); t < runs.end(r); ++t) attention_head(args, kernel, t / args.H, t % args.H);
  });
}

}  // namespace kernels
}  // namespace finequant
