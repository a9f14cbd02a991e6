// Reference quantization (the math contract) on hand-computed cases, plus Tensor basics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "finequant/quant.h"
#include "core/convert.h"

using namespace finequant;

namespace {

Tensor make_f32(int64_t rows, int64_t cols, std::vector<float> values) {
  Tensor t = Tensor::empty(DType::F32, {rows, cols});
  std::memcpy(t.raw(), values.data(), values.size() * sizeof(float));
  return t;
}

template <class T> std::vector<int> ints(const Tensor& t) {
  std::vector<int> v;
  for (int64_t i = 0; i < t.numel(); ++i) v.push_back(t.data<T>()[i]);
  return v;
}

const QuantSpec kSym8{8, true}, kAsym8{8, false}, kSym4{4, true}, kAsym4{4, false};

}  // namespace

TEST(tensor_basics) {
  Tensor t = Tensor::zeros(DType::F32, {2, 3});
  CHECK(reinterpret_cast<uintptr_t>(t.raw()) % 64 == 0);
  CHECK_EQ(t.numel(), 6);
  CHECK_EQ(t.dim(-1), 3);
  CHECK_EQ(t.dim(0), 2);
  CHECK_EQ(t.data<float>()[5], 0.0f);
  CHECK_THROWS_KIND_MSG(t.dim(2), ErrorKind::InvalidArgument, "out of range");
  CHECK_THROWS_KIND(t.dim(-3), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND_MSG(t.data<int8_t>(), ErrorKind::InvalidArgument, "expected a tensor of dtype I8, got F32");
  CHECK(t.reshape({3, 2}).raw() == t.raw());
  CHECK_THROWS_KIND(t.reshape({4, 2}), ErrorKind::InvalidArgument);
  Tensor c = t.clone();
  CHECK(c.raw() != t.raw() && c.shape() == t.shape());
  CHECK(Tensor::empty(DType::U8, {0, 4}).defined());
  CHECK(shape_str({2, 3}) == "[2, 3]");
  CHECK(std::string(dtype_name(DType::BF16)) == "BF16");
  CHECK_EQ(dtype_size(DType::I64), size_t(8));
}

TEST(quant_max_values) {
  CHECK_EQ(quant_max(kSym8), 127);
  CHECK_EQ(quant_max(kAsym8), 255);
  CHECK_EQ(quant_max(kSym4), 7);
  CHECK_EQ(quant_max(kAsym4), 15);
  CHECK_THROWS_KIND(quant_max(QuantSpec{3, true}), ErrorKind::InvalidArgument);
}

TEST(symmetric_int8_round_half_even) {
  // max|x| = 127 -> s = 1 exactly, so x / s are the ties themselves.
  Tensor x = make_f32(1, 7, {127, -2.5f, 2.5f, 3.5f, 0.5f, -0.5f, 1.5f});
  QuantizedTensor qt = quantize(x, kSym8, Tile{1, 7});
  CHECK(qt.q.dtype() == DType::I8);
  CHECK(qt.scale.shape() == Shape({1, 1}));
  CHECK_EQ(qt.scale.data<float>()[0], 1.0f);
  CHECK(!qt.zero_point.defined());
  CHECK((ints<int8_t>(qt.q) == std::vector<int>{127, -2, 2, 4, 0, 0, 2}));
}

TEST(symmetric_int4) {
  Tensor x = make_f32(1, 4, {7, 1.5f, 2.5f, -7});
  QuantizedTensor qt = quantize(x, kSym4, Tile{1, 4});
  CHECK_EQ(qt.scale.data<float>()[0], 1.0f);
  CHECK((ints<int8_t>(qt.q) == std::vector<int>{7, 2, 2, -7}));
  // s = 14 / 7 = 2: -13 / 2 = -6.5 -> -6 (half to even)
  Tensor y = make_f32(1, 3, {14, -13, 3});
  QuantizedTensor qy = quantize(y, kSym4, Tile{1, 3});
  CHECK_EQ(qy.scale.data<float>()[0], 2.0f);
  CHECK((ints<int8_t>(qy.q) == std::vector<int>{7, -6, 2}));
}

TEST(asymmetric_int8) {
  // lo = -2, hi = 253 -> s = 1, z = 2; ties: 2.5 -> 2 (+2 = 4), -0.5 -> 0 (+2 = 2)
  Tensor x = make_f32(1, 4, {-2, 2.5f, 253, -0.5f});
  QuantizedTensor qt = quantize(x, kAsym8, Tile{1, 4});
  CHECK(qt.q.dtype() == DType::U8);
  CHECK_EQ(qt.scale.data<float>()[0], 1.0f);
  CHECK_EQ(int(qt.zero_point.data<uint8_t>()[0]), 2);
  CHECK((ints<uint8_t>(qt.q) == std::vector<int>{0, 4, 255, 2}));
  // Positive-only values: the range still includes zero, so z = 0.
  Tensor p = make_f32(1, 2, {51, 255});
  QuantizedTensor qp = quantize(p, kAsym8, Tile{1, 2});
  CHECK_EQ(qp.scale.data<float>()[0], 1.0f);
  CHECK_EQ(int(qp.zero_point.data<uint8_t>()[0]), 0);
  CHECK((ints<uint8_t>(qp.q) == std::vector<int>{51, 255}));
  // Negative-only values: hi = 0, z = 255.
  Tensor n = make_f32(1, 2, {-255, -1});
  QuantizedTensor qn = quantize(n, kAsym8, Tile{1, 2});
  CHECK_EQ(int(qn.zero_point.data<uint8_t>()[0]), 255);
  CHECK((ints<uint8_t>(qn.q) == std::vector<int>{0, 254}));
}

TEST(asymmetric_int4_dequantize) {
  Tensor x = make_f32(1, 3, {-5, 10, 2});
  QuantizedTensor qt = quantize(x, kAsym4, Tile{1, 3});
  CHECK_EQ(qt.scale.data<float>()[0], 1.0f);
  CHECK_EQ(int(qt.zero_point.data<uint8_t>()[0]), 5);
  CHECK((ints<uint8_t>(qt.q) == std::vector<int>{0, 15, 7}));
  Tensor d = dequantize(qt);
  CHECK_EQ(d.data<float>()[0], -5.0f);
  CHECK_EQ(d.data<float>()[1], 10.0f);
  CHECK_EQ(d.data<float>()[2], 2.0f);
}

TEST(all_zero_tile_gets_scale_one) {
  Tensor x = make_f32(2, 2, {0, 0, 0, 0});
  for (QuantSpec spec : {kSym8, kAsym8, kSym4, kAsym4}) {
    QuantizedTensor qt = quantize(x, spec, Tile{1, 2});
    CHECK_EQ(qt.scale.data<float>()[0], 1.0f);
    CHECK_EQ(qt.scale.data<float>()[1], 1.0f);
    for (int64_t i = 0; i < 4; ++i) CHECK_EQ(int(static_cast<const uint8_t*>(qt.q.raw())[i]), 0);
    if (!spec.symmetric) CHECK_EQ(int(qt.zero_point.data<uint8_t>()[0]), 0);
    Tensor d = dequantize(qt);
    for (int64_t i = 0; i < 4; ++i) CHECK_EQ(d.data<float>()[i], 0.0f);
  }
}

TEST(partial_k_block) {
  // C = 5 in blocks of 2: grid [1, 3], the last block holds one column.
  Tensor x = make_f32(1, 5, {254, 5, -127, 1, 3});
  QuantizedTensor qt = quantize(x, kSym8, Tile{1, 2});
  CHECK(qt.scale.shape() == Shape({1, 3}));
  CHECK_EQ(qt.scale.data<float>()[0], 2.0f);
  CHECK_EQ(qt.scale.data<float>()[1], 1.0f);
  CHECK_EQ(qt.scale.data<float>()[2], 3.0f / 127.0f);
  CHECK((ints<int8_t>(qt.q) == std::vector<int>{127, 2, -127, 1, 127}));
}

TEST(row_groups) {
  // Tile {2, 2} over [4, 2]: one scale per pair of rows.
  Tensor x = make_f32(4, 2, {127, 1, -3, 2, 0, 254, 1, 1});
  QuantizedTensor qt = quantize(x, kSym8, Tile{2, 2});
  CHECK(qt.scale.shape() == Shape({2, 1}));
  CHECK_EQ(qt.scale.data<float>()[0], 1.0f);
  CHECK_EQ(qt.scale.data<float>()[1], 2.0f);
  CHECK((ints<int8_t>(qt.q) == std::vector<int>{127, 1, -3, 2, 0, 127, 0, 0}));  // 0.5 -> 0 twice
}

TEST(quantize_rows_is_per_row) {
  Tensor x = make_f32(2, 3, {127, 1, 2, -254, 4, 5});
  QuantizedTensor a = quantize_rows(x, kSym8);
  QuantizedTensor b = quantize(x, kSym8, Tile{1, 3});
  CHECK(a.scale.shape() == Shape({2, 1}));
  CHECK_EQ(a.scale.data<float>()[1], 2.0f);
  CHECK(ints<int8_t>(a.q) == ints<int8_t>(b.q));
}

TEST(dequantize_error_bound) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const int64_t R = 8, C = 40;
  std::vector<float> v(R * C);
  for (float& f : v) f = dist(rng);
  Tensor x = make_f32(R, C, v);
  for (QuantSpec spec : {kSym8, kAsym8, kSym4, kAsym4})
    for (Tile tile : {Tile{1, C}, Tile{2, 16}, Tile{R, C}}) {
      QuantizedTensor qt = quantize(x, spec, tile);
      Tensor d = dequantize(qt);
      const int64_t gc = qt.scale.dim(1);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; ++c) {
          float s = qt.scale.data<float>()[(r / tile.rows) * gc + c / tile.cols];
          CHECK(std::fabs(d.data<float>()[r * C + c] - v[r * C + c]) <= 0.5f * s * 1.001f);
        }
    }
}

TEST(quantize_errors) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  CHECK_THROWS_KIND_MSG(quantize(make_f32(2, 2, {0, 1, nan, 2}), kSym8, Tile{1, 2}), ErrorKind::InvalidArgument,
                        "NaN or Inf at [1, 0]");
  CHECK_THROWS_KIND_MSG(quantize(make_f32(1, 2, {0, -inf}), kAsym8, Tile{1, 2}), ErrorKind::InvalidArgument,
                        "NaN or Inf at [0, 1]");
  Tensor x = make_f32(3, 4, std::vector<float>(12, 1.0f));
  CHECK_THROWS_KIND_MSG(quantize(x, kSym8, Tile{2, 4}), ErrorKind::InvalidArgument, "group of 2 rows does not divide");
  CHECK_THROWS_KIND(quantize(x, kSym8, Tile{0, 4}), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND(quantize(x, kSym8, Tile{1, 5}), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND(quantize(x, kSym8, Tile{1, 0}), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND_MSG(quantize(x, QuantSpec{3, true}, Tile{1, 4}), ErrorKind::InvalidArgument, "bits");
  CHECK_THROWS_KIND(quantize(Tensor::zeros(DType::F32, {4}), kSym8, Tile{1, 4}), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND(quantize(Tensor::zeros(DType::I8, {2, 2}), kSym8, Tile{1, 2}), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND_MSG(quantize(make_f32(1, 2, {-3e38f, 3e38f}), kAsym8, Tile{1, 2}), ErrorKind::InvalidArgument,
                        "overflows float32");
  // Symmetric handles the same extremes without overflow.
  QuantizedTensor big = quantize(make_f32(1, 2, {-3e38f, 3e38f}), kSym8, Tile{1, 2});
  CHECK((ints<int8_t>(big.q) == std::vector<int>{-127, 127}));
}

TEST(pack_unpack_int4) {
  Tensor q = Tensor::empty(DType::I8, {2, 16});
  for (int i = 0; i < 32; ++i) q.data<int8_t>()[i] = static_cast<int8_t>(i % 16 - 8);
  Tensor p = pack_int4(q);
  CHECK(p.dtype() == DType::U8 && p.shape() == Shape({2, 8}));
  CHECK_EQ(int(p.data<uint8_t>()[0]), 0x98);  // -8 -> 0x8 low, -7 -> 0x9 high
  Tensor back = unpack_int4(p, true);
  CHECK(back.dtype() == DType::I8 && back.shape() == q.shape());
  CHECK(ints<int8_t>(back) == ints<int8_t>(q));

  Tensor one = Tensor::empty(DType::I8, {1, 2});
  one.data<int8_t>()[0] = 1;
  one.data<int8_t>()[1] = -1;
  CHECK_EQ(int(pack_int4(one).data<uint8_t>()[0]), 0xF1);

  Tensor u = Tensor::empty(DType::U8, {1, 4});
  const uint8_t uv[4] = {0, 15, 3, 12};
  std::memcpy(u.raw(), uv, 4);
  Tensor pu = pack_int4(u);
  CHECK_EQ(int(pu.data<uint8_t>()[0]), 0xF0);
  CHECK_EQ(int(pu.data<uint8_t>()[1]), 0xC3);
  CHECK(ints<uint8_t>(unpack_int4(pu, false)) == ints<uint8_t>(u));

  CHECK_THROWS_KIND_MSG(pack_int4(Tensor::zeros(DType::I8, {2, 3})), ErrorKind::InvalidArgument,
                        "INT4 packing needs an even number of columns");
  one.data<int8_t>()[1] = 8;
  CHECK_THROWS_KIND(pack_int4(one), ErrorKind::InvalidArgument);
  one.data<int8_t>()[1] = -9;
  CHECK_THROWS_KIND(pack_int4(one), ErrorKind::InvalidArgument);
  u.data<uint8_t>()[2] = 16;
  CHECK_THROWS_KIND(pack_int4(u), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND(pack_int4(Tensor::zeros(DType::F32, {1, 2})), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND(unpack_int4(Tensor::zeros(DType::I8, {1, 2}), true), ErrorKind::InvalidArgument);
}

int main() { return RUN_ALL_TESTS(); }

// scale_dtype fp16 (DESIGN.md section 2): the half rounding itself, then quantize's use of it.
TEST(float_to_half_rounds_to_nearest_even) {
  CHECK_EQ(int(float_to_half(1.0f)), 0x3c00);
  CHECK_EQ(int(float_to_half(-2.0f)), 0xc000);
  CHECK_EQ(int(float_to_half(65504.0f)), 0x7bff);
  CHECK_EQ(int(float_to_half(65519.0f)), 0x7bff);
  CHECK_EQ(int(float_to_half(65520.0f)), 0x7c00);  // the tie above the largest half rounds to inf
  CHECK_EQ(int(float_to_half(1.0f + 0x1p-11f)), 0x3c00);  // tie, to even
  CHECK_EQ(int(float_to_half(1.0f + 3 * 0x1p-11f)), 0x3c02);  // tie, to even (up)
  CHECK_EQ(int(float_to_half(0x1p-24f)), 0x0001);
  CHECK_EQ(int(float_to_half(0x1p-25f)), 0x0000);  // tie between 0 and the smallest subnormal
  CHECK_EQ(int(float_to_half(3 * 0x1p-25f)), 0x0002);
  CHECK_EQ(int(float_to_half(0x1p-14f - 0x1p-26f)), 0x0400);  // rounds up into the smallest normal
  // Every half round-trips, and exactness is recognised; odd floats between halves are not exact.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00u) == 0x7c00u) continue;  // inf / NaN
    const float f = half_to_float(static_cast<uint16_t>(h));
    uint16_t bits = 0;
    CHECK(float_to_half_exact(f, bits));
    CHECK_EQ(int(bits), int(h == 0x8000u ? 0x8000u : h));
    CHECK_EQ(int(float_to_half(f)), int(h));
    if (h & 0x7fffu) {
      const float next = std::nextafter(f, 2.0f * f);
      CHECK(!float_to_half_exact(next, bits) || half_to_float(bits) == next);
    }
  }
  // Against the reference formula on random floats: the nearest half, ties to the even one.
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> expo(-30.0f, 17.0f), mant(1.0f, 2.0f);
  for (int i = 0; i < 100000; ++i) {
    const float v = std::ldexp(mant(rng), static_cast<int>(expo(rng)));
    const uint16_t h = float_to_half(v);
    if ((h & 0x7c00u) == 0x7c00u) {
      CHECK(v >= 65520.0f);
      continue;
    }
    const float r = half_to_float(h);
    const float below = half_to_float(static_cast<uint16_t>(h - (h ? 1 : 0))), above = half_to_float(static_cast<uint16_t>(h + 1));
    CHECK(std::fabs(r - v) <= std::fabs(below - v) && std::fabs(r - v) <= std::fabs(above - v));
    if (std::fabs(r - v) == std::fabs(above - v) && r != above) CHECK((h & 1) == 0);
  }
}

TEST(quantize_with_half_scales) {
  std::mt19937 rng(9);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  Tensor x = Tensor::empty(DType::F32, {6, 70});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = dist(rng);
  for (int64_t c = 0; c < 32; ++c) x.data<float>()[c] = 1e-9f * static_cast<float>(c % 3);  // a tiny first block
  for (QuantSpec spec : {kSym8, kAsym8, kSym4, kAsym4}) {
    const QuantizedTensor plain = quantize(x, spec, Tile{1, 32});
    const QuantizedTensor half = quantize(x, spec, Tile{1, 32}, true);
    const float qmax = static_cast<float>(quant_max(spec));
    for (int64_t i = 0; i < half.scale.numel(); ++i) {
      const float s = half.scale.data<float>()[i];
      uint16_t bits;
      CHECK(float_to_half_exact(s, bits));
      CHECK_EQ(s, round_scale_to_half(plain.scale.data<float>()[i]));
    }
    CHECK_EQ(half.scale.data<float>()[0], 0x1p-24f);  // 2e-9 / qmax rounds to zero as a half
    // The integers come from the rounded scale: requantizing with it gives the same codes.
    const Tensor d = dequantize(half);
    const int64_t C = 70;
    for (int64_t r = 0; r < 6; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const float s = half.scale.data<float>()[r * 3 + c / 32];
        const float z = spec.symmetric ? 0.0f : static_cast<float>(half.zero_point.data<uint8_t>()[r * 3 + c / 32]);
        const float v = x.data<float>()[r * C + c];
        const float lo = spec.symmetric ? -qmax : 0.0f;
        const float want = std::clamp(std::nearbyint(v / s) + z, lo, qmax);
        const float got = spec.symmetric ? float(half.q.data<int8_t>()[r * C + c]) : float(half.q.data<uint8_t>()[r * C + c]);
        CHECK_EQ(got, want);
        CHECK_EQ(d.data<float>()[r * C + c], s * (got - z));
      }
  }
  // A scale beyond the largest half (65504) is refused: 1e7 / 127 and 1e6 / 7; 1e6 / 127 fits.
  CHECK_THROWS_KIND(quantize(make_f32(1, 2, {1e7f, -3.0f}), kSym8, Tile{1, 2}, true), ErrorKind::InvalidArgument);
  CHECK_THROWS_KIND(quantize(make_f32(1, 2, {1e6f, -3.0f}), kSym4, Tile{1, 2}, true), ErrorKind::InvalidArgument);
  CHECK_EQ(quantize(make_f32(1, 2, {1e6f, -3.0f}), kSym8, Tile{1, 2}, true).scale.data<float>()[0], 7876.0f);  // 7874.02 -> the nearest half
}
