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

Tensor to_f32(const Tensor& t) {
  if (t.dtype() == DType::F32) return t;
  FQ_CHECK(t.dtype() == DType::BF16 || t.dtype() == DType::F16, ErrorKind::ModelFormat,
           std::string("expected a floating-point tensor, got ") + dtype_name(t.dtype()));
  Tensor out = Tensor::empty(DType::F32, t.shape());
  const uint16_t* src = static_cast<const uint16_t*>(t.raw());
  float* dst = out.data<float>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    if (t.dtype() == DType::BF16) {
      const uint32_t bits = uint32_t{src[i]} << 16;
      std::memcpy(&dst[i], &bits, 4);
    } else {
      dst[i] = half_to_float(src[i]);
    }
  }
  return out;
}

}  // namespace finequant
