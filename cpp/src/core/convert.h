// dtype conversion of model tensors.
#pragma once
#include "finequant/tensor.h"

namespace finequant {

// F32 copy of an F32 / BF16 / F16 host tensor (F32 input is returned as is, sharing storage);
// throws ModelFormat for any other dtype.
Tensor to_f32(const Tensor& t);

uint16_t float_to_bf16(float v);  // round to nearest even, NaN kept (a quiet NaN)
float bf16_to_float(uint16_t v);   // exact
float half_to_float(uint16_t h);   // IEEE binary16 -> float, exact
uint16_t float_to_half(float v);   // round to nearest even (overflow to inf), NaN kept
// The IEEE binary16 bits of v when v is exactly a half (sign, zero and subnormals included); false otherwise.
bool float_to_half_exact(float v, uint16_t& bits);
// Whether every one of v[0..n) is exactly a half (kernels then hold them in 2 bytes).
bool all_exact_halves(const float* v, int64_t n);

}  // namespace finequant
