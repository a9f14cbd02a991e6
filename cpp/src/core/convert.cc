#include "core/convert.h"

#include <cstring>

namespace finequant {

namespace {

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

}  // namespace

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
