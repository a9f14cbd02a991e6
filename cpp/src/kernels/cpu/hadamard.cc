// The CPU block-Hadamard rotation y = x H (kernels/backend.h `hadamard`, docs/DESIGN.md section 2):
// the butterfly stages run over the whole row at once (each stage's pairs stay inside their block,
// since 2h divides b), in the defined order, then one multiply by float(1 / sqrt(b)). Only adds,
// subtracts and one multiply per value: nothing an FMA could contract, and the file is built with
// -ffp-contract=off all the same (CMakeLists.txt), so every ISA clone is bit-identical.
// With AVX-512 a block of up to 256 values is rotated in registers, all stages in one load and
// store (hadamard_block_avx512); the order of each value's operations is the definition's.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/cpu_isa.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/multiversion.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FQ_HADAMARD_AVX512 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 false positives inside the intrinsics (_mm512_undefined_* initialise themselves).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#define FQ_AVX512F __attribute__((target("avx512f")))
#else
#define FQ_HADAMARD_AVX512 0
#endif

namespace finequant {
namespace kernels {

namespace {

// One stage with a compile-time h (1, 2, 4): pairs (i, i + h) for i with bit h clear.
template <int H>
inline void stage_small(float* y, int64_t K) {
  for (int64_t base = 0; base < K; base += 2 * H)
    for (int i = 0; i < H; ++i) {
      const float a = y[base + i], c = y[base + H + i];
      y[base + i] = a + c;
      y[base + H + i] = a - c;
    }
}

FQ_MULTIVERSION void hadamard_row(const float* x, float* y, int64_t K, int64_t b, float scale) {
  if (x != y) std::memcpy(y, x, static_cast<size_t>(K) * sizeof(float));
  if (b >= 2) stage_small<1>(y, K);
  if (b >= 4) stage_small<2>(y, K);
  if (b >= 8) stage_small<4>(y, K);
  for (int64_t h = 8; h < b; h *= 2)  // contiguous runs of h: vector adds and subtracts
    for (int64_t base = 0; base < K; base += 2 * h) {
      float* p = y + base;
      float* q = p + h;
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) {
        const float a = p[i], c = q[i];
        p[i] = a + c;
        q[i] = a - c;
      }
    }
#pragma omp simd
  for (int64_t i = 0; i < K; ++i) y[i] = y[i] * scale;
}

#if FQ_HADAMARD_AVX512
// Stages h = 1, 2, 4, 8 (those below b) inside one vector of 16 values. The pair partner of every
// lane is the swapped lane c; lanes with bit h clear take v + c (= a + c), the others c - v (= a - c).
FQ_AVX512F inline __m512 stages_in_vector(__m512 v, int64_t b) {
  if (b >= 2) {
    const __m512 c = _mm512_permute_ps(v, 0xB1);  // lanes 1 0 3 2
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, c), 0xAAAA, c, v);
  }
  if (b >= 4) {
    const __m512 c = _mm512_permute_ps(v, 0x4E);  // lanes 2 3 0 1
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, c), 0xCCCC, c, v);
  }
  if (b >= 8) {
    const __m512 c = _mm512_shuffle_f32x4(v, v, 0xB1);  // 128-bit quarters 1 0 3 2
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, c), 0xF0F0, c, v);
  }
  if (b >= 16) {
    const __m512 c = _mm512_shuffle_f32x4(v, v, 0x4E);  // 256-bit halves swapped
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, c), 0xFF00, c, v);
  }
  return v;
}

// One block of NV * 16 values (NV = b / 16 > 0), from x to y, in registers.
template <int NV>
FQ_AVX512F inline void hadamard_block_avx512(const float* x, float* y, __m512 scale) {
  __m512 v[NV];
  for (int j = 0; j < NV; ++j) v[j] = stages_in_vector(_mm512_loadu_ps(x + 16 * j), 16);
  for (int h = 1; h < NV; h *= 2)  // stage 16 h: vectors j and j + h
    for (int j = 0; j < NV; ++j)
      if (!(j & h)) {
        const __m512 a = v[j], c = v[j + h];
        v[j] = _mm512_add_ps(a, c);
        v[j + h] = _mm512_sub_ps(a, c);
      }
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(y + 16 * j, _mm512_mul_ps(v[j], scale));
}

// A row with K a multiple of 16 (b divides K or 16 divides b).
FQ_AVX512F void hadamard_row_avx512(const float* x, float* y, int64_t K, int64_t b, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  switch (b) {
    case 32: for (int64_t i = 0; i < K; i += 32) hadamard_block_avx512<2>(x + i, y + i, s); return;
    case 64: for (int64_t i = 0; i < K; i += 64) hadamard_block_avx512<4>(x + i, y + i, s); return;
    case 128: for (int64_t i = 0; i < K; i += 128) hadamard_block_avx512<8>(x + i, y + i, s); return;
    case 256: for (int64_t i = 0; i < K; i += 256) hadamard_block_avx512<16>(x + i, y + i, s); return;
    default: break;
  }
  // b <= 16: whole blocks inside each vector. b > 256: the in-vector stages, then the rest as
  // passes over the row like the portable form.
  for (int64_t i = 0; i < K; i += 16) {
    const __m512 v = stages_in_vector(_mm512_loadu_ps(x + i), b);
    _mm512_storeu_ps(y + i, b <= 16 ? _mm512_mul_ps(v, s) : v);
  }
  if (b <= 16) return;
  for (int64_t h = 16; h < b; h *= 2)
    for (int64_t base = 0; base < K; base += 2 * h)
      for (int64_t i = base; i < base + h; i += 16) {
        const __m512 a = _mm512_loadu_ps(y + i), c = _mm512_loadu_ps(y + i + h);
        _mm512_storeu_ps(y + i, _mm512_add_ps(a, c));
        _mm512_storeu_ps(y + i + h, _mm512_sub_ps(a, c));
      }
  for (int64_t i = 0; i < K; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(y + i), s));
}
#endif

}  // namespace

RowRotation row_rotation(int64_t block, int64_t K) {
  if (block <= 0) return {};
  RowRotation r{block, static_cast<float>(1.0 / std::sqrt(static_cast<double>(block))), hadamard_row};
#if FQ_HADAMARD_AVX512
  // The AVX-512 level's kernel (its integer GEMMs' level: only avx512f is used here).
  if (K % 16 == 0 && kernel_eligible(CpuIsa::Avx512Vnni, active_isa())) r.kernel = hadamard_row_avx512;
#endif
  return r;
}

void hadamard_rows(const float* x, float* y, int64_t rows, int64_t K, int64_t block, ThreadPool& pool) {
  if (rows <= 0 || K <= 0) return;
  const RowRotation rotation = row_rotation(block, K);
  int64_t stages = 1;  // passes over a row: log2(b) butterflies + the scaling
  for (int64_t h = 1; h < block; h *= 2) ++stages;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K * stages, 1));
  parallel_for(pool, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rotation.apply(x + r * K, y + r * K, K);
  });
}

}  // namespace kernels
}  // namespace finequant
