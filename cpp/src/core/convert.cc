#include "core/convert.h"

#include <cmath>
#include <cstring>

namespace finequant {

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      uint32_t m = mant;
      do { ++e; m <<= 1; } while ((m & 0x400) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float v) {
  uint32_t x;
  std::memcpy(&x, &v, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN: a quiet NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (1024 x 2^-24 carries into the smallest normal)
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 0x1p24f)));
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u) - (112u << 23);  // round at bit 13, rebias 127 -> 15
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

bool all_exact_halves(const float* v, int64_t n) {
  uint16_t bits;
  for (int64_t i = 0; i < n; ++i)
    if (!float_to_half_exact(v[i], bits)) return false;
  return true;
}

bool float_to_half_exact(float v, uint16_t& bits) {
  if (!std::isfinite(v)) return false;
  const uint16_t sign = std::signbit(v) ? 0x8000u : 0u;
  const float a = std::fabs(v);
  uint16_t h;
  if (a >= 0x1p-14f) {  // a normal half, if the exponent fits and the low 13 mantissa bits are zero
    uint32_t fb;
    std::memcpy(&fb, &a, 4);
    const int exp = static_cast<int>(fb >> 23) - 127 + 15;
    if (exp >= 31 || (fb & 0x1fffu) != 0) return false;
    h = static_cast<uint16_t>((exp << 10) | ((fb >> 13) & 0x3ffu));
  } else {  // zero or a subnormal half: a multiple of 2^-24 below 2^-14
    const float m = a * 0x1p24f;  // exact (a power-of-two scaling of a float well inside the range)
    if (m != std::floor(m)) return false;
    h = static_cast<uint16_t>(m);
  }
  bits = static_cast<uint16_t>(sign | h);
  return half_to_float(bits) == v;
}

uint16_t float_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

Tensor to_f32(const Tensor& t) {
  if (t.dtype() == DType::F32) return t;
  FQ_CHECK(t.dtype() == DType::BF16 || t.dtype() == DType::F16, ErrorKind::ModelFormat,
           std::string("expected a floating-point tensor, got ") + dtype_name(t.dtype()));
  Tensor out = Tensor::empty(DType::F32, t.shape());
  const uint16_t* src = static_cast<const uint16_t*>(t.raw());
  float* dst = out.data<float>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = t.dtype() == DType::BF16 ? bf16_to_float(src[i]) : half_to_float(src[i]);
  }
  return out;
}

}  // namespace finequant
