#include "layers/block.h"

namespace finequant {

Tensor Mlp::forward(const kernels::RowSource& x) const {
  if (!swiglu) return fc2.forward(fc1.forward(x));
  const std::vector<Tensor> outs = Linear::forward_each(gate_up, x);
  const int64_t M = x.rows, I = down.in_features();
  const Tensor& g = outs[0];
  const Tensor& u = outs.size() == 1 ? outs[0] : outs[1];
  Tensor h = Tensor::empty(DType::F32, {M, I});
  silu_mul(g.data<float>(), g.dim(1), u.data<float>() + (outs.size() == 1 ? I : 0), u.dim(1), h.data<float>(), M, I);
  return down.forward(h);
}

Tensor Block::forward(const Tensor& x, const AttentionContext& ctx, LayerKV* cache) const {
  if (pre_norm) {
    Tensor h = x.clone();
    add_inplace(h, attn.forward(norm1.rows(x), ctx, cache));
    add_inplace(h, mlp.forward(norm2.rows(h)));
    return h;
  }
  Tensor h = attn.forward(kernels::StoredRows(x.data<float>(), x.dim(0), x.dim(1)), ctx, cache);
  add_inplace(h, x);
  h = norm1.forward(h);
  Tensor m = mlp.forward(kernels::StoredRows(h.data<float>(), h.dim(0), h.dim(1)));
  add_inplace(m, h);
  return norm2.forward(m);
}

}  // namespace finequant
