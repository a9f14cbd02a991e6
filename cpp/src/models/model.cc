#include "models/model.h"

#include "core/convert.h"
#include "models/weights.h"

namespace finequant {

Tensor last_real_rows(const ExecContext& ctx, const Tensor& x, const uint8_t* mask, int64_t B, int64_t T) {
  Tensor rows = Tensor::empty(DType::I64, {B});
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = T - 1;
    while (t > 0 && !mask[b * T + t]) --t;
    rows.data<int64_t>()[b] = b * T + t;
  }
  Tensor last = Tensor::empty(DType::F32, {B, x.dim(1)}, ctx.device);
  ctx.backend->gather_rows(ctx, x, rows.to(ctx.device), last, false);
  return last;
}

std::unique_ptr<Model> build_model(const ModelFile& file, const kernels::Backend& backend, ThreadPool& pool,
                                   kernels::FloatPrecision precision, const StrategyTable* strategy) {
  ModelConfig config = ModelConfig::parse(file.architecture, file.config_json);
  if (config.architecture == "bert") return std::make_unique<Encoder>(file, std::move(config), backend, pool, precision, strategy);
  if (config.architecture == "bart") return std::make_unique<Seq2Seq>(file, std::move(config), backend, pool, precision, strategy);
  return std::make_unique<Decoder>(file, std::move(config), backend, pool, precision, strategy);
}

std::string Weights::find_prefix(const ModelFile& file, const std::string& probe,
                                 std::initializer_list<const char*> candidates) {
  for (const char* p : candidates)
    if (file.file.has(p + probe)) return p;
  fail(ErrorKind::ModelFormat, file.file.path() + ": tensor '" + probe + "' not found (architecture " +
                                   file.architecture + ")");
}

Tensor Weights::host_tensor(const std::string& name, Shape expected) const {
  const Tensor t = to_f32(file.file.tensor(prefix + name));
  FQ_CHECK(t.shape() == expected, ErrorKind::ModelFormat,
           "tensor '" + prefix + name + "' has shape " + shape_str(t.shape()) + ", expected " + shape_str(expected));
  return t;
}

Tensor Weights::tensor(const std::string& name, Shape expected) const {
  return host_tensor(name, std::move(expected)).to(backend.device());
}

kernels::LinearWeights Weights::linear_weights(const std::string& module, kernels::Epilogue epilogue) const {
  const SafetensorsFile& f = file.file;
  const std::string name = prefix + module;
  kernels::LinearWeights w;
  w.epilogue = epilogue;
  w.precision = precision;
  if (f.has(name + ".bias")) w.bias = to_f32(f.tensor(name + ".bias"));
  auto it = file.linears.find(name);
  if (it != file.linears.end()) w.rotation = it->second.rotation;  // the stored weight is W H
  if (it == file.linears.end() || it->second.weight_bits == 0) {
    w.weight_f32 = to_f32(f.tensor(name + ".weight"));
    FQ_CHECK(w.weight_f32.ndim() == 2, ErrorKind::ModelFormat, name + ".weight must be 2-D");
  } else {
    // The reader has already checked dtypes and shapes against the record.
    const LinearRecord& rec = it->second;
    w.weight.spec = QuantSpec{rec.weight_bits, rec.weight_symmetric};
    w.weight.tile = Tile{rec.tile_rows, rec.tile_cols};
    const Tensor& stored = f.tensor(name + ".weight");
    w.weight.q = rec.weight_bits == 4 ? unpack_int4(stored, rec.weight_symmetric) : stored;
    w.weight.scale = f.tensor(name + ".weight_scale");
    if (!rec.weight_symmetric) w.weight.zero_point = f.tensor(name + ".weight_zero_point");
    w.act = QuantSpec{rec.act_bits, rec.act_symmetric};
  }
  FQ_CHECK(!w.bias.defined() || w.bias.numel() == w.out_features(), ErrorKind::ModelFormat,
           name + ".bias size does not match the weight");
  return w;
}

const LinearStrategy* Weights::strategy_of(const std::string& name) const {
  if (!strategy) return nullptr;
  auto it = file.linears.find(prefix + name);
  return it == file.linears.end() ? nullptr : strategy->for_part(it->second.part);
}

// A Linear with its part's strategy; the table counts the weight-only copies it makes.
static Linear create_counted(const Weights& w, const kernels::LinearWeights& lw, const std::string& name) {
  Linear l = Linear::create(w.backend, lw, w.pool, w.strategy_of(name));
  if (l.alternative_bytes()) {
    w.strategy->alternative_linears += 1;
    w.strategy->alternative_bytes += l.alternative_bytes();
  }
  return l;
}

namespace {
std::string shape2(int64_t a, int64_t b) { return "[" + std::to_string(a) + ", " + std::to_string(b) + "]"; }
}  // namespace

Linear Weights::linear(const std::string& name, int64_t out, int64_t in, kernels::Epilogue epilogue) const {
  const kernels::LinearWeights w = linear_weights(name, epilogue);
  FQ_CHECK(w.out_features() == out && w.in_features() == in, ErrorKind::ModelFormat,
           "linear '" + prefix + name + "' is " + shape2(w.out_features(), w.in_features()) + ", expected " +
               shape2(out, in));
  return create_counted(*this, w, name);
}

std::vector<Linear> Weights::linears(const std::vector<std::string>& names, const std::vector<int64_t>& outs,
                                     int64_t in) const {
  std::vector<kernels::LinearWeights> parts;
  for (size_t i = 0; i < names.size(); ++i) {
    parts.push_back(linear_weights(names[i], kernels::Epilogue::None));
    const kernels::LinearWeights& w = parts.back();
    FQ_CHECK(w.out_features() == outs[i] && w.in_features() == in, ErrorKind::ModelFormat,
             "linear '" + prefix + names[i] + "' is " + shape2(w.out_features(), w.in_features()) + ", expected " +
                 shape2(outs[i], in));
  }
  std::vector<Linear> out = Linear::create_merged(backend, parts, pool, strategy_of(names[0]));
  for (const Linear& l : out) {
    if (l.alternative_bytes()) {
      strategy->alternative_linears += 1;
      strategy->alternative_bytes += l.alternative_bytes();
    }
  }
  return out;
}

Norm Weights::norm(const std::string& name, int64_t size, kernels::NormParams::Kind kind, float eps,
                   float weight_offset) const {
  Norm n;
  n.kind = kind;
  n.eps = eps;
  Tensor w = host_tensor(name + ".weight", {size});
  if (weight_offset != 0.f) {
    // fp32 (offset + w), the same rounding as transformers' (1.0 + weight.float())
    Tensor shifted = Tensor::empty(DType::F32, {size});
    float* dst = shifted.data<float>();
    const float* src = w.data<float>();
    for (int64_t i = 0; i < size; ++i) dst[i] = weight_offset + src[i];
    w = shifted;
  }
  n.weight = w.to(backend.device());
  if (kind == kernels::NormParams::Kind::LayerNorm) n.bias = tensor(name + ".bias", {size});
  return n;
}

kernels::Epilogue activation_epilogue(const std::string& hidden_act) {
  if (hidden_act == "gelu") return kernels::Epilogue::GeluErf;
  if (hidden_act == "gelu_new" || hidden_act == "gelu_pytorch_tanh" || hidden_act == "gelu_fast")
    return kernels::Epilogue::GeluTanh;
  fail(ErrorKind::Unsupported, "activation '" + hidden_act + "' is not supported");
}

}  // namespace finequant
