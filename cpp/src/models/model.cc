#include "models/model.h"

#include "models/weights.h"

namespace finequant {

std::unique_ptr<Model> build_model(const ModelFile& file) {
  ModelConfig config = ModelConfig::parse(file.architecture, file.config_json);
  if (config.architecture == "bert") return std::make_unique<Encoder>(file, std::move(config));
  return std::make_unique<Decoder>(file, std::move(config));
}

std::string Weights::find_prefix(const ModelFile& file, const std::string& probe,
                                 std::initializer_list<const char*> candidates) {
  for (const char* p : candidates)
    if (file.file.has(p + probe)) return p;
  fail(ErrorKind::ModelFormat, file.file.path() + ": tensor '" + probe + "' not found (architecture " +
                                   file.architecture + ")");
}

Tensor Weights::tensor(const std::string& name, Shape expected) const {
  const Tensor t = to_f32(file.file.tensor(prefix + name));
  FQ_CHECK(t.shape() == expected, ErrorKind::ModelFormat,
           "tensor '" + prefix + name + "' has shape " + shape_str(t.shape()) + ", expected " + shape_str(expected));
  return t;
}

Linear Weights::linear(const std::string& name, int64_t out, int64_t in, kernels::Epilogue epilogue) const {
  Linear l = Linear::load(file, prefix + name, epilogue);
  FQ_CHECK(l.out_features() == out && l.in_features() == in, ErrorKind::ModelFormat,
           "linear '" + prefix + name + "' is [" + std::to_string(l.out_features()) + ", " +
               std::to_string(l.in_features()) + "], expected [" + std::to_string(out) + ", " + std::to_string(in) + "]");
  return l;
}

std::vector<Linear> Weights::linears(const std::vector<std::string>& names, const std::vector<int64_t>& outs,
                                     int64_t in) const {
  std::vector<std::string> full;
  int64_t total = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    full.push_back(prefix + names[i]);
    total += outs[i];
  }
  std::vector<Linear> ls = Linear::load_merged(file, full);
  for (size_t i = 0; i < ls.size(); ++i) {
    const int64_t out = ls.size() == 1 ? total : outs[i];
    FQ_CHECK(ls[i].out_features() == out && ls[i].in_features() == in, ErrorKind::ModelFormat,
             "linear '" + full[ls.size() == 1 ? 0 : i] + "' (" + std::to_string(ls.size()) + " of " +
                 std::to_string(names.size()) + " parts) is [" + std::to_string(ls[i].out_features()) + ", " +
                 std::to_string(ls[i].in_features()) + "], expected [" + std::to_string(out) + ", " +
                 std::to_string(in) + "]");
  }
  return ls;
}

Norm Weights::norm(const std::string& name, int64_t size, Norm::Kind kind, float eps) const {
  Norm n;
  n.kind = kind;
  n.eps = eps;
  n.weight = tensor(name + ".weight", {size});
  if (kind == Norm::Kind::LayerNorm) n.bias = tensor(name + ".bias", {size});
  return n;
}

kernels::Epilogue activation_epilogue(const std::string& hidden_act) {
  if (hidden_act == "gelu") return kernels::Epilogue::GeluErf;
  if (hidden_act == "gelu_new" || hidden_act == "gelu_pytorch_tanh" || hidden_act == "gelu_fast")
    return kernels::Epilogue::GeluTanh;
  fail(ErrorKind::Unsupported, "activation '" + hidden_act + "' is not supported");
}

}  // namespace finequant
