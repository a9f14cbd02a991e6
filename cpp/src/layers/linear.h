// Linear: the one class for every precision (DESIGN "one graph, many kernels"). It owns its weight
// prepared once at load by the backend that runs it (kernels/backend.h), whose kernel the
// quantization of the weights decides:
//   floating-point weight           -> FP GEMM
//   integer weight, act bits 0      -> weight dequantized once at load (W8A16 / W4A16), FP GEMM
//   integer weight, act bits 8 / 4  -> activations quantized per row at run time, integer GEMM with a
//                                      fused dequantization epilogue (+ bias, + activation)
// With a block-Hadamard rotation (LinearWeights::rotation, docs/DESIGN.md section 2) the GEMM gets
// the rotation with its input (GemmInput::rotation): the backend rotates the (normalized) rows on
// the way in, as it normalizes them; the caller's input is never modified.
// With a per-shape strategy (layers/strategy.h, docs/DESIGN.md section 12) an integer Linear also
// holds its weight dequantized once at load as a weight-only kernel, and each call picks one of the
// two by its row count M; the copy exists only for Linears whose table chooses it somewhere.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "layers/strategy.h"

namespace finequant {

class Linear {
 public:
  Linear() = default;
  // Prepares `w` for `backend` (CPU work while packing on `pool`); with `strategy` (an integer
  // weight only), also the weight-only alternative the strategy picks for some row counts.
  static Linear create(const kernels::Backend& backend, const kernels::LinearWeights& w, ThreadPool& pool,
                       const LinearStrategy* strategy = nullptr);
  // Modules that read the same input (q/k/v, gate/up) as one Linear whose outputs are the parts'
  // outputs side by side, when they quantize identically (one activation quantization, one wider
  // GEMM); otherwise one Linear per module, in order.
  static std::vector<Linear> create_merged(const kernels::Backend& backend,
                                           const std::vector<kernels::LinearWeights>& parts, ThreadPool& pool,
                                           const LinearStrategy* strategy = nullptr);

  // x: F32 [M, K] rows (normalized on the way in with x.norm) on the context's device -> F32 [M, N].
  Tensor forward(const ExecContext& ctx, const kernels::GemmInput& x) const;
  Tensor forward(const ExecContext& ctx, const Tensor& x) const { return forward(ctx, kernels::GemmInput{x}); }
  // The same rows through each of `linears` (unmerged q/k/v, gate/up): with more than one and a
  // fused norm, the rows are normalized once, not once per Linear.
  static std::vector<Tensor> forward_each(const ExecContext& ctx, const std::vector<Linear>& linears,
                                          const kernels::GemmInput& x);

  // The Linear the model runs after this one in a decode step: a decode-sized call has the backend
  // prefetch its weight while threads idle (kernels::GemmInput::next). `next` stays where it is and
  // outlives this one (the model's own Linears, linked once they are in place).
  void set_next(const Linear& next) { next_ = &next; }

  int64_t in_features() const { return w_ ? w_->K : 0; }
  int64_t out_features() const { return w_ ? w_->N : 0; }
  const std::string& kernel() const { return w_->kernel; }
  int64_t rotation() const { return rotation_; }
  // The kernel a call with M rows runs, and the bytes of the weight-only copy (0 without one).
  const std::string& kernel_for(int64_t M) const { return prepared_for(M).kernel; }
  int64_t alternative_bytes() const { return alt_bytes_; }

 private:
  void check_input(const ExecContext& ctx, const Tensor& x) const;

  const kernels::PreparedLinear& prepared_for(int64_t M) const {
    return alt_ && strategy_.chooses_alternative(M) ? *alt_ : *w_;
  }

  std::shared_ptr<const kernels::PreparedLinear> w_;
  const Linear* next_ = nullptr;  // set_next
  int64_t rotation_ = 0;
  std::shared_ptr<const kernels::PreparedLinear> alt_;  // the weight-only kernel, or null
  LinearStrategy strategy_;                             // when alt_: which row counts run it
  int64_t alt_bytes_ = 0;
};

}  // namespace finequant
