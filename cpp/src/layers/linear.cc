#include "layers/linear.h"

#include <cstring>

namespace finequant {

namespace {

using kernels::LinearWeights;

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
bool same_quantization(const LinearWeights& a, const LinearWeights& b) {
  if (a.in_features() != b.in_features() || a.epilogue != b.epilogue || a.rotation != b.rotation) return false;
  if (!a.quantized() || !b.quantized()) return !a.quantized() && !b.quantized();
  const QuantizedTensor &x = a.weight, &y = b.weight;
  return x.spec.bits == y.spec.bits && x.spec.symmetric == y.spec.symmetric && a.act.bits == b.act.bits &&
         a.act.symmetric == b.act.symmetric && x.tile.rows == y.tile.rows && x.tile.cols == y.tile.cols;
}

// The parts stacked along N (weights, scale rows, zero points, biases; a missing bias is zeros).
LinearWeights stack(const std::vector<LinearWeights>& parts) {
  LinearWeights all = parts[0];
  std::vector<Tensor> weights, scales, zero_points, biases;
  bool any_bias = false;
  for (const LinearWeights& p : parts) any_bias = any_bias || p.bias.defined();
  for (const LinearWeights& p : parts) {
    weights.push_back(p.quantized() ? p.weight.q : p.weight_f32);
    if (p.quantized()) scales.push_back(p.weight.scale);
    if (p.quantized() && p.weight.zero_point.defined()) zero_points.push_back(p.weight.zero_point);
    const int64_t n = p.out_features();
    // one column each: concat_rows needs equal widths, the parts' lengths differ (q vs k/v under GQA)
    if (any_bias) biases.push_back(p.bias.defined() ? p.bias.reshape({n, 1}) : Tensor::zeros(DType::F32, {n, 1}));
  }
  all.bias = Tensor();
  if (any_bias) {
    const Tensor b = concat_rows(biases);
    all.bias = b.reshape({b.numel()});
  }
  if (all.quantized()) {
    all.weight.q = concat_rows(weights);
    all.weight.scale = concat_rows(scales);
    if (!zero_points.empty()) all.weight.zero_point = concat_rows(zero_points);
  } else {
    all.weight_f32 = concat_rows(weights);
  }
  return all;
}

}  // namespace

Linear Linear::create(const kernels::Backend& backend, const LinearWeights& w, ThreadPool& pool,
                      const LinearStrategy* strategy) {
  Linear l;
  FQ_CHECK(w.rotation == 0 || (w.rotation >= 2 && (w.rotation & (w.rotation - 1)) == 0 &&
                                w.in_features() % w.rotation == 0),
           ErrorKind::InvalidArgument,
           "rotation " + std::to_string(w.rotation) + " must be 0 or a power of two that divides the " +
               std::to_string(w.in_features()) + " input columns");
  l.w_ = backend.prepare_linear(w, pool);
  l.rotation_ = w.rotation;
  // Only integer kernels have a weight-only alternative (a weight-only model already runs it).
  if (strategy && strategy->any() && w.quantized() && w.act.bits > 0) {
    LinearWeights f = w.dequantized();  // still W H under a rotation: the Linear rotates the rows for both
    f.precision = strategy->precision;
    l.alt_ = backend.prepare_linear(f, pool);
    l.strategy_ = *strategy;
    const int64_t bytes_per_weight = strategy->precision == kernels::FloatPrecision::BF16 ? 2 : 4;
    l.alt_bytes_ = w.out_features() * w.in_features() * bytes_per_weight;
  }
  return l;
}

std::vector<Linear> Linear::create_merged(const kernels::Backend& backend, const std::vector<LinearWeights>& parts,
                                          ThreadPool& pool, const LinearStrategy* strategy) {
  bool mergeable = true;
  for (const LinearWeights& p : parts) mergeable = mergeable && same_quantization(parts[0], p);
  std::vector<Linear> out;
  if (!mergeable || parts.size() == 1) {
    for (const LinearWeights& p : parts) out.push_back(create(backend, p, pool, strategy));
  } else {
    out.push_back(create(backend, stack(parts), pool, strategy));
  }
  return out;
}

void Linear::check_input(const ExecContext& ctx, const Tensor& t) const {
  FQ_CHECK_ARG(t.dtype() == DType::F32 && t.ndim() == 2 && t.dim(1) == w_->K,
               "Linear expects F32 [M, " + std::to_string(w_->K) + "], got " + shape_str(t.shape()));
  FQ_CHECK_ARG(t.device() == ctx.device,
               "Linear on " + ctx.device.str() + " got an input on " + t.device().str());
}

Tensor Linear::forward(const ExecContext& ctx, const kernels::GemmInput& x) const {
  check_input(ctx, x.x);
  Tensor y = Tensor::empty(DType::F32, {x.x.dim(0), w_->N}, ctx.device);
  const int64_t M = x.x.dim(0);
  ctx.backend->linear(ctx, kernels::GemmInput{x.x, x.norm, rotation_, next_ ? &next_->prepared_for(M) : nullptr},
                      prepared_for(M), y);
  return y;
}

std::vector<Tensor> Linear::forward_each(const ExecContext& ctx, const std::vector<Linear>& linears,
                                         const kernels::GemmInput& x) {
  std::vector<Tensor> outs;
  if (linears.size() == 1 || !x.norm) {
    for (const Linear& l : linears) outs.push_back(l.forward(ctx, x));
    return outs;
  }
  Tensor rows = Tensor::empty(DType::F32, x.x.shape(), ctx.device);
  ctx.backend->norm(ctx, x.x, *x.norm, rows);
  for (const Linear& l : linears) outs.push_back(l.forward(ctx, rows));
  return outs;
}

}  // namespace finequant
