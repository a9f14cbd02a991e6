// The CUTLASS epilogue functors of the CUDA backend (cuda/src/evt_functors.h), run on the host on
// cutlass::Array fragments: bit-identical to the scalar helpers of kernels/epilogue.h, and to a
// plainly written int64 reference on unshifted int8/uint8/int4 data (which checks the operand-shift
// identity of the signed layout, docs/DESIGN.md section 5). Built with -ffp-contract=off, like the
// CPU reference; needs no GPU.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "cuda/src/evt_functors.h"
#include "kernels/epilogue.h"

using finequant::cuda::evt::CorrectBlock;
using finequant::cuda::evt::FinishOutput;
using finequant::cuda::evt::ScaleBlock;
using finequant::kernels::Epilogue;
namespace kernels = finequant::kernels;

namespace {

constexpr Epilogue kEpilogues[] = {Epilogue::None, Epilogue::GeluErf, Epilogue::GeluTanh};

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

std::string describe(float got, float want) {
  char text[128];
  std::snprintf(text, sizeof(text), "%.9g (0x%08x) vs %.9g (0x%08x)", got, bits(got), want, bits(want));
  return text;
}

#define CHECK_SAME_FLOAT(got, want)                                                                 \
  do {                                                                                              \
    float fq_g_ = (got), fq_w_ = (want);                                                            \
    if (bits(fq_g_) != bits(fq_w_))                                                                 \
      ::fqtest::report(__FILE__, __LINE__, "bits differ: " #got " vs " #want ": " + describe(fq_g_, fq_w_)); \
  } while (0)

int32_t random_int32(std::mt19937& rng) {
  static const int32_t extremes[] = {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(), 0, -1, 1,
                                     std::numeric_limits<int32_t>::min() + 1, 1 << 24, (1 << 24) + 1, -(1 << 24) - 1};
  if (rng() % 4 == 0) return extremes[rng() % (sizeof(extremes) / sizeof(extremes[0]))];
  return static_cast<int32_t>(rng());
}

// Scales as the quantizer makes them: positive, spread over orders of magnitude (sometimes 0).
float random_scale(std::mt19937& rng) {
  if (rng() % 16 == 0) return 0.f;
  std::uniform_real_distribution<float> e(-9.f, 2.f), m(1.f, 10.f);
  return m(rng) * std::pow(10.f, e(rng));
}

float random_bias(std::mt19937& rng) {
  std::uniform_real_distribution<float> b(-4.f, 4.f);
  return b(rng);
}

// (i) the functors on N-element fragments against the scalar helpers, on arbitrary int32 values.
template <int N>
void functors_match_scalar_helpers(std::mt19937& rng, int rounds) {
  for (int round = 0; round < rounds; ++round) {
    cutlass::Array<int32_t, N> acc, zx, cm, zw, rs;
    cutlass::Array<float, N> sx, sw, bias;
    for (int i = 0; i < N; ++i) {
      acc[i] = random_int32(rng);
      zx[i] = random_int32(rng);
      cm[i] = random_int32(rng);
      zw[i] = random_int32(rng);
      rs[i] = random_int32(rng);
      sx[i] = random_scale(rng);
      sw[i] = random_scale(rng);
      bias[i] = random_bias(rng);
    }
    const cutlass::Array<int32_t, N> corrected = CorrectBlock{}(acc, zx, cm, zw, rs);
    const cutlass::Array<float, N> out = ScaleBlock{}(sx, sw, corrected);
    for (int i = 0; i < N; ++i) {
      CHECK_EQ(corrected[i], kernels::correct_block(acc[i], zx[i], cm[i], zw[i], rs[i]));
      CHECK_SAME_FLOAT(out[i], kernels::dequantize_sum(sx[i], kernels::accumulate_block(0.f, sw[i], corrected[i])));
    }
    for (Epilogue e : kEpilogues) {
      for (bool has_bias : {false, true}) {
        const cutlass::Array<float, N> y = FinishOutput{e, has_bias}(out, bias);
        for (int i = 0; i < N; ++i) CHECK_SAME_FLOAT(y[i], kernels::finish_output(out[i], has_bias, bias[i], e));
      }
    }
  }
}

// One output of a K-block of length kb on unshifted data, in the stored (signed) layout and by the
// int64 reference.
struct Case {
  int x_bits, w_bits;
  bool x_sym, w_sym;
  int kb;
};

int32_t shift_of(int bits, bool sym) { return sym ? 0 : (bits == 8 ? 128 : 8); }

int32_t random_value(std::mt19937& rng, int bits, bool sym) {
  const int32_t q = bits == 8 ? (sym ? 127 : 255) : (sym ? 7 : 15);
  if (sym) return static_cast<int32_t>(rng() % (2 * q + 1)) - q;
  return static_cast<int32_t>(rng() % (q + 1));
}

// N outputs (rows m of x against one weight row each), checked through the whole functor chain.
template <int N>
void chain_matches_int64_reference(std::mt19937& rng, const Case& c, bool extreme) {
  cutlass::Array<int32_t, N> acc, zx, cm, zw, rs;
  cutlass::Array<float, N> sx, sw, bias;
  int64_t acc_true[N];
  for (int i = 0; i < N; ++i) {
    const int32_t sxh = shift_of(c.x_bits, c.x_sym), swh = shift_of(c.w_bits, c.w_sym);
    // Zero points in the unshifted range (0 when symmetric); extreme: the largest |x - zx|.
    const int32_t zx_raw = c.x_sym ? 0 : (extreme ? 0 : random_value(rng, c.x_bits, false));
    const int32_t zw_raw = c.w_sym ? 0 : (extreme ? 0 : random_value(rng, c.w_bits, false));
    int64_t truth = 0;
    uint32_t a = 0, r = 0, colsum = 0;  // wrap-around sums, as the device accumulates
    for (int k = 0; k < c.kb; ++k) {
      int32_t x = random_value(rng, c.x_bits, c.x_sym), w = random_value(rng, c.w_bits, c.w_sym);
      if (extreme) {
        x = c.x_sym ? -(c.x_bits == 8 ? 127 : 7) : 0;
        w = c.w_sym ? -(c.w_bits == 8 ? 127 : 7) : 0;
      }
      truth += static_cast<int64_t>(x - zx_raw) * static_cast<int64_t>(w - zw_raw);
      const int32_t xs = x - sxh, ws = w - swh;  // the stored signed operands
      a += static_cast<uint32_t>(xs) * static_cast<uint32_t>(ws);
      r += static_cast<uint32_t>(xs);
      colsum += static_cast<uint32_t>(ws);
    }
    acc[i] = static_cast<int32_t>(a);
    rs[i] = static_cast<int32_t>(r);
    zx[i] = zx_raw - sxh;
    zw[i] = zw_raw - swh;
    cm[i] = static_cast<int32_t>(colsum - static_cast<uint32_t>(c.kb) * static_cast<uint32_t>(zw[i]));
    acc_true[i] = truth;
    sx[i] = random_scale(rng);
    sw[i] = random_scale(rng);
    bias[i] = random_bias(rng);
  }
  const cutlass::Array<int32_t, N> corrected = CorrectBlock{}(acc, zx, cm, zw, rs);
  const cutlass::Array<float, N> out = ScaleBlock{}(sx, sw, corrected);
  for (int i = 0; i < N; ++i) CHECK_EQ(static_cast<int64_t>(corrected[i]), acc_true[i]);
  for (Epilogue e : kEpilogues) {
    for (bool has_bias : {false, true}) {
      const cutlass::Array<float, N> y = FinishOutput{e, has_bias}(out, bias);
      for (int i = 0; i < N; ++i) {
        float ref = sx[i] * std::fma(sw[i], static_cast<float>(acc_true[i]), 0.f);
        if (has_bias) ref += bias[i];
        ref = kernels::apply_epilogue(e, ref);
        CHECK_SAME_FLOAT(y[i], ref);
      }
    }
  }
}

const Case kCases[] = {
    {8, 8, true, true, 32},    {8, 8, false, false, 96},  {8, 8, true, false, 4096}, {8, 8, false, true, 64},
    {8, 4, true, true, 128},   {8, 4, false, false, 32},  {8, 4, false, true, 2048}, {4, 4, true, true, 64},
    {4, 4, false, false, 256}, {4, 4, true, false, 1024}, {8, 8, false, false, 1},   {8, 8, false, false, 32768},
};

}  // namespace

TEST(functors_match_scalar_helpers_on_fragments) {
  std::mt19937 rng(12345);
  functors_match_scalar_helpers<1>(rng, 2000);
  functors_match_scalar_helpers<4>(rng, 2000);
  functors_match_scalar_helpers<8>(rng, 1000);
}

TEST(functor_chain_matches_int64_reference) {
  std::mt19937 rng(777);
  for (const Case& c : kCases) {
    const int reps = c.kb > 10000 ? 2 : 20;
    for (int rep = 0; rep < reps; ++rep) {
      chain_matches_int64_reference<4>(rng, c, false);
      chain_matches_int64_reference<1>(rng, c, false);
    }
    chain_matches_int64_reference<4>(rng, c, true);
  }
}

// x = w = 0 with zero points 0, asymmetric 8-bit, K = 2^17: the shifted dot product is 2^31 and
// wraps in int32, the row sum is -2^24; the correction still gives the true 0.
TEST(correction_is_exact_through_int32_wraparound) {
  const int32_t kb = 1 << 17;
  cutlass::Array<int32_t, 4> acc, zx, cm, zw, rs;
  for (int i = 0; i < 4; ++i) {
    acc[i] = static_cast<int32_t>(static_cast<uint32_t>(kb) * 128u * 128u);  // wraps to INT32_MIN
    rs[i] = -128 * kb;
    zx[i] = -128;
    zw[i] = -128;
    cm[i] = static_cast<int32_t>(static_cast<uint32_t>(-128 * kb) - static_cast<uint32_t>(kb) * static_cast<uint32_t>(-128));
  }
  CHECK_EQ(acc[0], std::numeric_limits<int32_t>::min());
  const cutlass::Array<int32_t, 4> corrected = CorrectBlock{}(acc, zx, cm, zw, rs);
  for (int i = 0; i < 4; ++i) CHECK_EQ(corrected[i], 0);
}

// fma(sw, float(c), +0.f), as the reference starts its sum: a -0.f product becomes +0.f before sx.
TEST(scale_block_adds_to_positive_zero) {
  cutlass::Array<float, 2> sx, sw;
  cutlass::Array<int32_t, 2> c;
  sx[0] = 1.f, sw[0] = -2.f, c[0] = 0;  // -2 * 0 = -0
  sx[1] = 1.f, sw[1] = 1.f, c[1] = -3;
  const cutlass::Array<float, 2> out = ScaleBlock{}(sx, sw, c);
  CHECK_EQ(bits(out[0]), bits(0.f));
  CHECK_SAME_FLOAT(out[1], -3.f);
  cutlass::Array<float, 2> bias;
  bias[0] = bias[1] = 0.5f;
  const cutlass::Array<float, 2> y = FinishOutput{Epilogue::None, false}(out, bias);
  CHECK_SAME_FLOAT(y[1], -3.f);  // no bias: out unchanged
}

int main() { return RUN_ALL_TESTS(); }
