// dtype conversion of model tensors.
#pragma once
#include "finequant/tensor.h"

namespace finequant {

// F32 copy of an F32 / BF16 / F16 host tensor (F32 input is returned as is, sharing storage);
// throws ModelFormat for any other dtype.
Tensor to_f32(const Tensor& t);

uint16_t float_to_bf16(float v);  // round to nearest even, NaN kept (a quiet NaN)
float bf16_to_float(uint16_t v);   // exact

}  // namespace finequant
