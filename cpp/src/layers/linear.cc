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
  l.weight_f32_ = to_f32(weight_f32);
  if (bias_f32.defined()) {
    FQ_CHECK(bias_f32.numel() == l.N_, ErrorKind::ModelFormat, "bias size does not match the weight");
    l.bias_ = to_f32(bias_f32);
  }
  l.gemm_f32_ = kernels::select_gemm_f32();
  return l;
}

Linear Linear::load(const ModelFile& model, const std::string& name, kernels::Epilogue epilogue) {
  const SafetensorsFile& f = model.file;
  const Tensor bias = f.has(name + ".bias") ? f.tensor(name + ".bias") : Tensor();
  auto rec_it = model.linears.find(name);
  if (rec_it == model.linears.end() || rec_it->second.weight_bits == 0) {
    Linear l = from_weight(f.tensor(name + ".weight"), bias);
    l.epilogue_ = epilogue;
    return l;
  }
  const LinearRecord& rec = rec_it->second;
  // The reader has already checked dtypes and shapes against the record; rebuild the canonical
  // quantized tensor (INT4 unpacked) and hand it to the precision-specific preparation.
  QuantizedTensor qt;
  qt.spec.bits = rec.weight_bits;
  qt.spec.symmetric = rec.weight_symmetric;
  qt.tile.rows = rec.tile_rows;
  qt.tile.cols = rec.tile_cols;
  const Tensor& stored = f.tensor(name + ".weight");
  qt.q = rec.weight_bits == 4 ? unpack_int4(stored, rec.weight_symmetric) : stored;
  qt.scale = f.tensor(name + ".weight_scale");
  if (!rec.weight_symmetric) qt.zero_point = f.tensor(name + ".weight_zero_point");

  return from_quantized(qt, rec.act_bits, rec.act_symmetric, bias, epilogue);
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
    l.weight_f32_ = dequantize(qt);
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
  const int64_t M = x.dim(0);
  Tensor y = Tensor::empty(DType::F32, {M, N_});
  const float* bias = bias_.defined() ? bias_.data<float>() : nullptr;
  if (M == 0) return y;
  if (act_bits_ == 0) {
    gemm_f32_(x.data<float>(), weight_f32_.data<float>(), bias, y.data<float>(), M, N_, K_, epilogue_);
  } else {
    // Token-wise dynamic quantization of x (DESIGN section 2) happens inside the kernel.
    gemm_int_(x.data<float>(), M, weight_int_, bias, y.data<float>(), epilogue_);
  }
  return y;
}

}  // namespace finequant
