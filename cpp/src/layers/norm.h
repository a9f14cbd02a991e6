// LayerNorm (weight, bias) or RMSNorm (weight only) with its parameters on the model's device.
#pragma once
#include "core/context.h"
#include "finequant/tensor.h"
#include "kernels/backend.h"

namespace finequant {

struct Norm {
  kernels::NormParams::Kind kind = kernels::NormParams::Kind::LayerNorm;
  Tensor weight, bias;  // F32 [C]; bias undefined for RMSNorm
  float eps = 1e-5f;

  // The kernels' view (pointers into weight and bias).
  kernels::NormParams params() const {
    return kernels::NormParams{kind, weight.data<float>(), bias.defined() ? bias.data<float>() : nullptr, eps,
                               weight.numel()};
  }
  Tensor forward(const ExecContext& ctx, const Tensor& x) const {
    Tensor y = Tensor::empty(DType::F32, x.shape(), ctx.device);
    ctx.backend->norm(ctx, x, params(), y);
    return y;
  }
};

}  // namespace finequant
