// Typed access to a model file's tensors under the module prefix the file uses (e.g. "model."
// for Llama), with shape checks so a mismatched file fails at load, not in a kernel.
#pragma once
#include <initializer_list>
#include <string>
#include <vector>

#include "finequant/model_file.h"
#include "layers/linear.h"
#include "layers/ops.h"

namespace finequant {

struct Weights {
  const ModelFile& file;
  std::string prefix;

  // The first candidate prefix p for which p + probe is a tensor of the file.
  static std::string find_prefix(const ModelFile& file, const std::string& probe,
                                 std::initializer_list<const char*> candidates);

  Tensor tensor(const std::string& name, Shape expected) const;  // F32 (converted from BF16/F16)
  Linear linear(const std::string& name, int64_t out, int64_t in,
                kernels::Epilogue epilogue = kernels::Epilogue::None) const;
  // Modules reading the same input (Linear::load_merged), with outs[i] outputs each.
  std::vector<Linear> linears(const std::vector<std::string>& names, const std::vector<int64_t>& outs, int64_t in) const;
  Norm norm(const std::string& name, int64_t size, Norm::Kind kind, float eps) const;
};

// The GEMM epilogue for a Hugging Face hidden_act name ("gelu" is the erf form).
kernels::Epilogue activation_epilogue(const std::string& hidden_act);

}  // namespace finequant
