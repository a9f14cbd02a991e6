// Linear: the one class for every precision (DESIGN "one graph, many kernels"). It owns its weight
// in the form its kernel wants, chosen at load from the file's quantization record:
//   weight_bits 0             -> FP32 GEMM
//   weight_bits 8/4, act 0    -> weight dequantized once to FP32 at load (W8A16 / W4A16)
//   weight_bits 8/4, act 8/4  -> activations quantized per row at run time, integer GEMM with a
//                                fused dequantization epilogue (+ bias, + activation)
#pragma once
#include <string>
#include <vector>

#include "finequant/model_file.h"
#include "finequant/quant.h"
#include "kernels/cpu/gemm.h"

namespace finequant {

class Linear {
 public:
  Linear() = default;
  // Loads module `name` (tensors `<name>.weight`, `.bias`, `.weight_scale`, `.weight_zero_point`).
  // A module without a quantization record is a floating-point Linear.
  static Linear load(const ModelFile& model, const std::string& name,
                     kernels::Epilogue epilogue = kernels::Epilogue::None);
  // Modules that read the same input (q/k/v, gate/up) as one Linear whose outputs are the parts'
  // outputs side by side, when they quantize identically (one activation quantization, one wider
  // GEMM); otherwise one Linear per module, in order.
  static std::vector<Linear> load_merged(const ModelFile& model, const std::vector<std::string>& names,
                                         kernels::Epilogue epilogue = kernels::Epilogue::None);
  // A floating-point Linear over an existing [N, K] F32 weight (e.g. the tied LM head).
  static Linear from_weight(Tensor weight_f32, Tensor bias_f32 = Tensor());
  // A quantized Linear from canonical integers (INT4 unpacked, one value per element) and its
  // token-wise activation quantization; act_bits 0 means weight-only (dequantized once to F32).
  static Linear from_quantized(const QuantizedTensor& weight, int act_bits, bool act_symmetric,
                               Tensor bias_f32 = Tensor(), kernels::Epilogue epilogue = kernels::Epilogue::None);

  // x: F32 [M, K] -> F32 [M, N].
  Tensor forward(const Tensor& x) const;
  // Rows from a fused producer (e.g. Norm::rows): an integer Linear quantizes each row as it is made.
  Tensor forward(const kernels::RowSource& x) const;
  // The same rows through each of `linears` (unmerged q/k/v, gate/up): with more than one, the rows are
  // made once, not once per Linear (a fused producer would otherwise normalize every row again).
  static std::vector<Tensor> forward_each(const std::vector<Linear>& linears, const kernels::RowSource& x);

  int64_t in_features() const { return K_; }
  int64_t out_features() const { return N_; }
  bool integer() const { return act_bits_ != 0; }

 private:
  int64_t N_ = 0, K_ = 0;
  int act_bits_ = 0;  // 0: floating-point input
  kernels::Epilogue epilogue_ = kernels::Epilogue::None;
  Tensor bias_;                 // F32 [N] or undefined
  kernels::F32Weight weight_f32_;  // FP path
  kernels::IntWeight weight_int_;  // integer path
  kernels::GemmF32Fn gemm_f32_ = nullptr;
  kernels::GemmIntFn gemm_int_ = nullptr;
};

// F32 copy of an F32 / BF16 / F16 tensor (F32 input is returned as is, sharing storage).
Tensor to_f32(const Tensor& t);

}  // namespace finequant
