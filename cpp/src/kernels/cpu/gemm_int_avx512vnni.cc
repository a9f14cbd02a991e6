// AVX512-VNNI integer GEMM (vpdpbusd: u8 x s8 -> int32), bit-identical to gemm_int_ref.
//
// vpdpbusd multiplies unsigned activations by signed weights, so both operands are shifted into
// those ranges and the shifts are undone exactly in int32 (DESIGN section 2, "Accumulation"):
//   x' = x + xshift (u8; xshift = 128 for I8 activations, 0 for U8)
//   w' = w - wshift (s8; wshift = 128 for U8 weights,     0 for I8; applied once at load)
//   sum_k x w = sum_k x' w' - xshift colsum(w') + wshift rowsum(x)
// Every intermediate is computed with wrap-around int32 arithmetic, which equals the true value
// modulo 2^32; the true per-block value fits int32 whenever the reference's own int32 accumulator
// does (|x w| <= 255 * 255, K-blocks up to ~33000), so the results are identical. Then the
// reference epilogue, in the reference's order and without FMA contraction (this file and
// gemm_ref.cc are compiled with -ffp-contract=off):
//   out = 0; for each block: out += (sx * sw) * float(corrected); out += bias; y = act(out).
//
// Layout: see IntWeight::Vnni. The activation rows are copied per call into the same padded,
// shifted u8 layout (M x Kp bytes) along with their per-block row sums.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "kernels/cpu/gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FQ_VNNI_BUILD 1
#include <immintrin.h>
#define FQ_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 false positive inside _mm512_cvtepi32_ps (_mm512_undefined_ps initialises itself).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define FQ_VNNI_BUILD 0
#endif

namespace finequant {
namespace kernels {

// ---- dispatch ---------------------------------------------------------------------------------
namespace {
Isa g_forced = Isa::Auto;
}

void force_isa(Isa isa) { g_forced = isa; }

bool cpu_has_avx512vnni() {
#if FQ_VNNI_BUILD
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

Isa active_isa() {
  Isa want = g_forced;
  if (want == Isa::Auto) {
    const char* env = std::getenv("FINEQUANT_ISA");
    if (env && std::strcmp(env, "avx512vnni") == 0) want = Isa::Avx512Vnni;
    else want = Isa::Ref;  // see gemm.h: VNNI is opt-in until verified on AVX-512 hardware
  }
  if (want == Isa::Ref) return Isa::Ref;
  return cpu_has_avx512vnni() ? Isa::Avx512Vnni : Isa::Ref;
}

#if FQ_VNNI_BUILD

namespace {

constexpr int64_t kPanel = 16;  // output channels per zmm of int32 accumulators

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Ctx {
  int64_t M, N, K, nb, bk, Kp, Npad, bkp;  // bkp: padded full-block length (multiple of 4)
  const uint8_t* xp;                       // [M, Kp] shifted activations
  const int32_t* rowsum;                   // [M, nb] sum of the original x over each block
  const float* sx;                         // [M]
  const uint8_t* zx;                       // [M] or null
  int32_t xshift, wshift;
  const IntWeight::Vnni* v;
  const float* bias;
  float* y;
  Epilogue epilogue;
};

inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// MR activation rows x NP panels of 16 output channels, over the whole K.
template <int MR, int NP>
FQ_VNNI void micro_kernel(const Ctx& c, int64_t m0, int64_t panel0) {
  __m512 out[MR][NP];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) out[i][j] = _mm512_setzero_ps();

  const int64_t Kp4 = c.Kp / 4;
  const int8_t* wbase = c.v->packed.data();
  for (int64_t b = 0; b < c.nb; ++b) {
    const int64_t k0 = b * c.bk, kb = std::min(c.K, k0 + c.bk) - k0;  // real block length
    const int64_t q0 = b * c.bkp / 4, q1 = q0 + (kb + 3) / 4;          // k4 steps of the block
    __m512i acc[MR][NP];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_si512();
    const int8_t* wp[NP];
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) wp[j] = wbase + ((panel0 + j) * Kp4 + q0) * 64;
    const uint8_t* xr[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) xr[i] = c.xp + (m0 + i) * c.Kp + q0 * 4;
    for (int64_t t = 0; t < q1 - q0; ++t) {
      __m512i wv[NP];
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) wv[j] = _mm512_loadu_si512(wp[j] + t * 64);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const __m512i xb = _mm512_set1_epi32(load_u32(xr[i] + t * 4));
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xb, wv[j]);
      }
    }
    // Block epilogue: corrected = acc' - xshift cs' - zx cs + wshift rx - zw (rx - kb zx)
    //   (= acc - zx colsum - zw rowsum + kb zx zw with acc the true sum), then out += sx sw c.
    const __m512i vxs = _mm512_set1_epi32(c.xshift);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      const int32_t zxm = c.zx ? c.zx[m] : 0;
      const int32_t rx = c.rowsum[m * c.nb + b];
      const __m512i vzx = _mm512_set1_epi32(zxm);
      const __m512i vrx = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(rx) * static_cast<uint32_t>(c.wshift)));
      const __m512i vr2 = _mm512_set1_epi32(
          static_cast<int32_t>(static_cast<uint32_t>(rx) - static_cast<uint32_t>(kb) * static_cast<uint32_t>(zxm)));
      const __m512 vsx = _mm512_set1_ps(c.sx[m]);
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) {
        const int64_t col = b * c.Npad + (panel0 + j) * kPanel;
        const __m512i cs1 = _mm512_loadu_si512(c.v->colsum_shifted.data() + col);
        const __m512i cs = _mm512_loadu_si512(c.v->colsum.data() + col);
        const __m512i zw = _mm512_loadu_si512(c.v->zero_point.data() + col);
        const __m512 sw = _mm512_loadu_ps(c.v->scale.data() + col);
        __m512i corr = _mm512_sub_epi32(acc[i][j], _mm512_mullo_epi32(vxs, cs1));
        corr = _mm512_sub_epi32(corr, _mm512_mullo_epi32(vzx, cs));
        corr = _mm512_add_epi32(corr, vrx);
        corr = _mm512_sub_epi32(corr, _mm512_mullo_epi32(zw, vr2));
        const __m512 scale = _mm512_mul_ps(vsx, sw);
        out[i][j] = _mm512_add_ps(out[i][j], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(corr)));
      }
    }
  }

  // Bias, store, activation.
#pragma GCC unroll 4
  for (int j = 0; j < NP; ++j) {
    const int64_t n0 = (panel0 + j) * kPanel;
    const int64_t cols = std::min<int64_t>(kPanel, c.N - n0);
    const __mmask16 mask = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
    const __m512 bv = c.bias ? _mm512_maskz_loadu_ps(mask, c.bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      __m512 o = out[i][j];
      if (c.bias) o = _mm512_add_ps(o, bv);
      float* yr = c.y + (m0 + i) * c.N + n0;
      _mm512_mask_storeu_ps(yr, mask, o);
      if (c.epilogue != Epilogue::None)
        for (int64_t t = 0; t < cols; ++t) yr[t] = apply_epilogue(c.epilogue, yr[t]);
    }
  }
}

using MicroFn = void (*)(const Ctx&, int64_t, int64_t);

MicroFn pick(int mr, int np) {
  switch (mr * 8 + np) {
    case 1 * 8 + 1: return micro_kernel<1, 1>;
    case 1 * 8 + 2: return micro_kernel<1, 2>;
    case 1 * 8 + 3: return micro_kernel<1, 3>;
    case 1 * 8 + 4: return micro_kernel<1, 4>;
    case 2 * 8 + 1: return micro_kernel<2, 1>;
    case 2 * 8 + 2: return micro_kernel<2, 2>;
    case 3 * 8 + 1: return micro_kernel<3, 1>;
    case 3 * 8 + 2: return micro_kernel<3, 2>;
    case 4 * 8 + 1: return micro_kernel<4, 1>;
    case 4 * 8 + 2: return micro_kernel<4, 2>;
  }
  return nullptr;
}

// Copies the activation rows into the padded u8 layout and computes the per-block row sums.
template <class TX>
void pack_rows(const QuantizedTensor& x, const Ctx& c, uint8_t* xp, int32_t* rowsum) {
  const TX* xq = static_cast<const TX*>(x.q.raw());
  const uint8_t flip = c.xshift ? 0x80 : 0x00;  // x + 128 as u8 == bit pattern of x xor 0x80
#pragma omp for schedule(static)
  for (int64_t m = 0; m < c.M; ++m) {
    const TX* src = xq + m * c.K;
    uint8_t* dst = xp + m * c.Kp;
    for (int64_t b = 0; b < c.nb; ++b) {
      const int64_t k0 = b * c.bk, kb = std::min(c.K, k0 + c.bk) - k0;
      uint8_t* d = dst + b * c.bkp;
      int32_t s = 0;
      for (int64_t k = 0; k < kb; ++k) {
        s += static_cast<int32_t>(src[k0 + k]);
        d[k] = static_cast<uint8_t>(static_cast<uint8_t>(src[k0 + k]) ^ flip);
      }
      for (int64_t k = kb; k < round_up(kb, 4); ++k) d[k] = 0;
      rowsum[m * c.nb + b] = s;
    }
  }
}

}  // namespace

void prepare_int_weight_avx512vnni(IntWeight& w) {
  if (!cpu_has_avx512vnni()) return;
  IntWeight::Vnni& v = w.vnni;
  const int64_t N = w.N, K = w.K, nb = w.num_blocks, bk = w.tile_cols;
  const bool is_signed = w.q.dtype() == DType::I8;
  v.wshift = is_signed ? 0 : 128;
  v.block_padded = round_up(bk, 4);
  v.Kp = (nb - 1) * v.block_padded + round_up(K - (nb - 1) * bk, 4);
  v.Npad = round_up(N, kPanel);
  const int64_t Kp4 = v.Kp / 4;
  v.packed.assign(static_cast<size_t>(v.Npad * v.Kp), 0);
  v.colsum_shifted.assign(static_cast<size_t>(nb * v.Npad), 0);
  v.colsum.assign(static_cast<size_t>(nb * v.Npad), 0);
  v.zero_point.assign(static_cast<size_t>(nb * v.Npad), 0);
  v.scale.assign(static_cast<size_t>(nb * v.Npad), 0.f);
  const float* sw = w.scale.data<float>();
  const uint8_t* zw = w.zero_point.defined() ? w.zero_point.data<uint8_t>() : nullptr;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t panel = n / kPanel, j = n % kPanel, g = n / w.tile_rows;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * bk, kb = std::min(K, k0 + bk) - k0;
      int32_t cs1 = 0;
      for (int64_t k = 0; k < kb; ++k) {
        const int32_t q = is_signed ? w.q.data<int8_t>()[n * K + k0 + k] : w.q.data<uint8_t>()[n * K + k0 + k];
        const int32_t qs = q - v.wshift;  // in [-128, 127]
        cs1 += qs;
        const int64_t kk = b * v.block_padded + k;  // position in the padded K
        v.packed[static_cast<size_t>(((panel * Kp4 + kk / 4) * 64) + j * 4 + kk % 4)] = static_cast<int8_t>(qs);
      }
      const size_t col = static_cast<size_t>(b * v.Npad + n);
      v.colsum_shifted[col] = cs1;
      v.colsum[col] = w.colsum[n * nb + b];
      v.zero_point[col] = zw ? zw[g * nb + b] : 0;
      v.scale[col] = sw[g * nb + b];
    }
  }
  v.ready = true;
}

void gemm_int_avx512vnni(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                         Epilogue epilogue) {
  if (!w.vnni.ready || !cpu_has_avx512vnni()) {
    gemm_int_ref(x, w, bias, y, epilogue);
    return;
  }
  const IntWeight::Vnni& v = w.vnni;
  Ctx c;
  c.M = x.q.dim(0);
  c.N = w.N;
  c.K = w.K;
  c.nb = w.num_blocks;
  c.bk = w.tile_cols;
  c.Kp = v.Kp;
  c.Npad = v.Npad;
  c.bkp = v.block_padded;
  c.sx = x.scale.data<float>();
  c.zx = x.zero_point.defined() ? x.zero_point.data<uint8_t>() : nullptr;
  const bool x_signed = x.q.dtype() == DType::I8;
  c.xshift = x_signed ? 128 : 0;
  c.wshift = v.wshift;
  c.v = &v;
  c.bias = bias;
  c.y = y;
  c.epilogue = epilogue;
  std::vector<uint8_t> xp(static_cast<size_t>(c.M * c.Kp));
  std::vector<int32_t> rowsum(static_cast<size_t>(c.M * c.nb));
  c.xp = xp.data();
  c.rowsum = rowsum.data();

  // Tasks: chunks of MC rows x NC panels; inside, panel groups outer (the weight slice stays in
  // L1) and MR-row groups inner. M = 1 (decode) reads every weight panel exactly once.
  constexpr int64_t MC = 64, NC = 4;
  const int64_t panels = c.Npad / kPanel;
  const int64_t mchunks = (c.M + MC - 1) / MC, nchunks = (panels + NC - 1) / NC;
  const int64_t tasks = mchunks * nchunks;
#pragma omp parallel
  {
    if (x_signed) pack_rows<int8_t>(x, c, xp.data(), rowsum.data());
    else pack_rows<uint8_t>(x, c, xp.data(), rowsum.data());
    // (implicit barrier of the omp for above)
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t mc = task / nchunks, ncnk = task % nchunks;
      const int64_t m0 = mc * MC, m1 = std::min(c.M, m0 + MC);
      const int64_t p0 = ncnk * NC, p1 = std::min(panels, p0 + NC);
      const bool single_row = (m1 - m0) == 1;
      const int64_t np_max = single_row ? 4 : 2;
      for (int64_t p = p0; p < p1; p += np_max) {
        const int np = static_cast<int>(std::min(np_max, p1 - p));
        for (int64_t m = m0; m < m1; m += 4) {
          const int mr = static_cast<int>(std::min<int64_t>(4, m1 - m));
          pick(mr, np)(c, m, p);
        }
      }
    }
  }
}

#else  // no x86 AVX-512 build: the reference

void prepare_int_weight_avx512vnni(IntWeight&) {}
void gemm_int_avx512vnni(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                         Epilogue epilogue) {
  gemm_int_ref(x, w, bias, y, epilogue);
}

#endif

}  // namespace kernels
}  // namespace finequant
