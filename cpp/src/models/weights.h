// Typed access to a model file's tensors under the module prefix the file uses (e.g. "model."
// for Llama), with shape checks so a mismatched file fails at load, not in a kernel. The one place
// where model files (io/) meet layers: tensors are read here, converted to F32 or to the canonical
// LinearWeights, and handed to the backend of the model's device.
#pragma once
#include <initializer_list>
#include <string>
#include <vector>

#include "finequant/model_file.h"
#include "layers/block.h"
#include "layers/strategy.h"

namespace finequant {

struct Weights {
  const ModelFile& file;
  std::string prefix;
  const kernels::Backend& backend;
  ThreadPool& pool;  // CPU threads for packing at load (the Engine's)
  kernels::FloatPrecision precision = kernels::FloatPrecision::F32;  // of its floating-point Linears
  const StrategyTable* strategy = nullptr;  // per-shape kernel choice of its integer Linears (docs/DESIGN.md 12)

  // The first candidate prefix p for which p + probe is a tensor of the file.
  static std::string find_prefix(const ModelFile& file, const std::string& probe,
                                 std::initializer_list<const char*> candidates);

  Tensor host_tensor(const std::string& name, Shape expected) const;  // F32 on the host (from BF16/F16 too)
  Tensor tensor(const std::string& name, Shape expected) const;       // F32 on the backend's device
  // Module `name` as stored (tensors `<name>.weight`, `.bias`, `.weight_scale`, `.weight_zero_point`);
  // a module without a quantization record is a floating-point Linear.
  kernels::LinearWeights linear_weights(const std::string& name, kernels::Epilogue epilogue) const;
  // The strategy of module `name`'s part (the file's record), or null.
  const LinearStrategy* strategy_of(const std::string& name) const;
  Linear linear(const std::string& name, int64_t out, int64_t in,
                kernels::Epilogue epilogue = kernels::Epilogue::None) const;
  // Modules reading the same input (Linear::create_merged), with outs[i] outputs each.
  std::vector<Linear> linears(const std::vector<std::string>& names, const std::vector<int64_t>& outs, int64_t in) const;
  // weight_offset is added to the stored weight (Gemma's RMSNorm multiplies by 1 + weight).
  Norm norm(const std::string& name, int64_t size, kernels::NormParams::Kind kind, float eps,
            float weight_offset = 0.f) const;
};

// The GEMM epilogue for a Hugging Face hidden_act name ("gelu" is the erf form).
kernels::Epilogue activation_epilogue(const std::string& hidden_act);

}  // namespace finequant
