#include "layers/linear.h"

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

Linear Linear::from_weight(Tensor weight_f32, Tensor bias_f32) {
  FQ_CHECK(weight_f32.ndim() == 2, ErrorKind::ModelFormat, "linear weight must be 2-D, got " + shape_str(weight_f32.shape()));
  Linear l;
  l.N_ = weight_f32.dim(0);
  l.K_ = weight_f32.dim(1);
  l.weight_f32_ = kernels::prepare_f32_weight(to_f32(weight_f32));
  if (bias_f32.defined()) {
    FQ_CHECK(bias_f32.numel() == l.N_, ErrorKind::ModelFormat, "bias size does not match the weight");
    l.bias_ = to_f32(bias_f32);
  }
  l.gemm_f32_ = kernels::select_gemm_f32();
  return l;
}

namespace {

// One module's weight as the file stores it: canonical integers (INT4 unpacked) + record, or F32.
struct StoredLinear {
  const LinearRecord* rec = nullptr;  // null: floating point
  QuantizedTensor qt;
  Tensor weight_f32;
  Tensor bias;
};

StoredLinear read_linear(const ModelFile& model, const std::string& name) {
  const SafetensorsFile& f = model.file;
  StoredLinear s;
  if (f.has(name + ".bias")) s.bias = to_f32(f.tensor(name + ".bias"));
  auto it = model.linears.find(name);
  if (it == model.linears.end() || it->second.weight_bits == 0) {
    s.weight_f32 = to_f32(f.tensor(name + ".weight"));
    FQ_CHECK(s.weight_f32.ndim() == 2, ErrorKind::ModelFormat, name + ".weight must be 2-D");
    return s;
  }
  // The reader has already checked dtypes and shapes against the record.
  const LinearRecord& rec = it->second;
  s.rec = &rec;
  s.qt.spec = QuantSpec{rec.weight_bits, rec.weight_symmetric};
  s.qt.tile = Tile{rec.tile_rows, rec.tile_cols};
  const Tensor& stored = f.tensor(name + ".weight");
  s.qt.q = rec.weight_bits == 4 ? unpack_int4(stored, rec.weight_symmetric) : stored;
  s.qt.scale = f.tensor(name + ".weight_scale");
  if (!rec.weight_symmetric) s.qt.zero_point = f.tensor(name + ".weight_zero_point");
  return s;
}

// Rows of same-width 2-D tensors stacked into one.
Tensor concat_rows(const std::vector<Tensor>& parts) {
  int64_t rows = 0;
  for (const Tensor& t : parts) rows += t.dim(0);
  Tensor out = Tensor::empty(parts[0].dtype(), {rows, parts[0].dim(1)});
  uint8_t* dst = static_cast<uint8_t*>(out.raw());
  for (const Tensor& t : parts) {
    std::memcpy(dst, t.raw(), t.nbytes());
    dst += t.nbytes();
  }
  return out;
}

// Parts can share one GEMM when they quantize identically and their scale tiles stack.
bool same_quantization(const StoredLinear& a, const StoredLinear& b) {
  if (!a.rec || !b.rec) return !a.rec && !b.rec && a.weight_f32.dim(1) == b.weight_f32.dim(1);
  const LinearRecord &x = *a.rec, &y = *b.rec;
  return x.weight_bits == y.weight_bits && x.weight_symmetric == y.weight_symmetric && x.act_bits == y.act_bits &&
         x.act_symmetric == y.act_symmetric && x.tile_rows == y.tile_rows && x.tile_cols == y.tile_cols &&
         a.qt.q.dim(1) == b.qt.q.dim(1);
}

}  // namespace

Linear Linear::load(const ModelFile& model, const std::string& name, kernels::Epilogue epilogue) {
  std::vector<Linear> merged = load_merged(model, {name}, epilogue);
  return std::move(merged[0]);
}

std::vector<Linear> Linear::load_merged(const ModelFile& model, const std::vector<std::string>& names,
                                        kernels::Epilogue epilogue) {
  std::vector<StoredLinear> parts;
  for (const std::string& n : names) parts.push_back(read_linear(model, n));
  bool mergeable = true;
  for (const StoredLinear& p : parts) mergeable = mergeable && same_quantization(parts[0], p);
  auto build = [&](const StoredLinear& s, Tensor bias) {
    if (!s.rec) {
      Linear l = from_weight(s.weight_f32, bias);
      l.epilogue_ = epilogue;
      return l;
    }
    return from_quantized(s.qt, s.rec->act_bits, s.rec->act_symmetric, bias, epilogue);
  };
  std::vector<Linear> out;
  if (!mergeable || parts.size() == 1) {
    for (const StoredLinear& p : parts) out.push_back(build(p, p.bias));
    return out;
  }
  // Stack weights (and scale rows, zero points, biases; a missing bias is zeros) along N.
  StoredLinear all;
  all.rec = parts[0].rec;
  std::vector<Tensor> weights, scales, zero_points, biases;
  bool any_bias = false;
  for (const StoredLinear& p : parts) any_bias = any_bias || p.bias.defined();
  for (const StoredLinear& p : parts) {
    weights.push_back(p.rec ? p.qt.q : p.weight_f32);
    if (p.rec) scales.push_back(p.qt.scale);
    if (p.rec && p.qt.zero_point.defined()) zero_points.push_back(p.qt.zero_point);
    const int64_t n = p.rec ? p.qt.q.dim(0) : p.weight_f32.dim(0);
    if (any_bias) biases.push_back(p.bias.defined() ? p.bias.reshape({1, n}) : Tensor::zeros(DType::F32, {1, n}));
  }
  Tensor bias;
  if (any_bias) {
    const Tensor b = concat_rows(biases);
    bias = b.reshape({b.numel()});
  }
  if (all.rec) {
    all.qt = parts[0].qt;
    all.qt.q = concat_rows(weights);
    all.qt.scale = concat_rows(scales);
    if (!zero_points.empty()) all.qt.zero_point = concat_rows(zero_points);
  } else {
    all.weight_f32 = concat_rows(weights);
  }
  out.push_back(build(all, bias));
  return out;
}

Linear Linear::from_quantized(const QuantizedTensor& qt, int act_bits, bool act_symmetric, Tensor bias_f32,
                              kernels::Epilogue epilogue) {
  FQ_CHECK(act_bits == 0 || act_bits == 8 || act_bits == 4, ErrorKind::ModelFormat,
           "act_bits must be 0, 4 or 8, got " + std::to_string(act_bits));
  Linear l;
  l.N_ = qt.q.dim(0);
  l.K_ = qt.q.dim(1);
  l.epilogue_ = epilogue;
  if (bias_f32.defined()) {
    FQ_CHECK(bias_f32.numel() == l.N_, ErrorKind::ModelFormat, "bias size does not match the weight");
    l.bias_ = to_f32(bias_f32);
  }
  if (act_bits == 0) {
    // Weight-only quantization: dequantize once, then run the FP kernel.
    l.weight_f32_ = kernels::prepare_f32_weight(dequantize(qt));
    l.gemm_f32_ = kernels::select_gemm_f32();
  } else {
    l.act_bits_ = act_bits;
    l.weight_int_ = kernels::prepare_int_weight(qt.q, qt.scale, qt.zero_point, qt.tile.rows, qt.tile.cols,
                                                qt.spec.bits, QuantSpec{act_bits, act_symmetric});
    l.gemm_int_ = kernels::select_gemm_int();
  }
  return l;
}

Tensor Linear::forward(const Tensor& x) const {
  FQ_CHECK_ARG(x.dtype() == DType::F32 && x.ndim() == 2 && x.dim(1) == K_,
               "Linear expects F32 [M, " + std::to_string(K_) + "], got " + shape_str(x.shape()));
  return forward(kernels::StoredRows(x.data<float>(), x.dim(0), K_));
}

std::vector<Tensor> Linear::forward_each(const std::vector<Linear>& linears, const kernels::RowSource& x) {
  std::vector<Tensor> outs;
  if (linears.size() == 1) {
    outs.push_back(linears[0].forward(x));
    return outs;
  }
  const Tensor rows = x.materialize();
  for (const Linear& l : linears) outs.push_back(l.forward(rows));
  return outs;
}

Tensor Linear::forward(const kernels::RowSource& x) const {
  FQ_CHECK_ARG(x.cols == K_, "Linear expects rows of " + std::to_string(K_) + " values, got " + std::to_string(x.cols));
  Tensor y = Tensor::empty(DType::F32, {x.rows, N_});
  const float* bias = bias_.defined() ? bias_.data<float>() : nullptr;
  if (x.rows == 0) return y;
  if (act_bits_ == 0) {
    const Tensor rows = x.materialize();
    gemm_f32_(rows.data<float>(), x.rows, weight_f32_, bias, y.data<float>(), epilogue_);
  } else {
    // Token-wise dynamic quantization of the rows (DESIGN section 2) happens inside the kernel.
    gemm_int_(x, weight_int_, bias, y.data<float>(), epilogue_);
  }
  return y;
}

}  // namespace finequant
