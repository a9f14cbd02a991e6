// dtype conversion of model tensors.
#pragma once
#include "finequant/tensor.h"

namespace finequant {

// F32 copy of an F32 / BF16 / F16 host tensor (F32 input is returned as is, sharing storage);
// throws ModelFormat for any other dtype.
Tensor to_f32(const Tensor& t);

}  // namespace finequant
