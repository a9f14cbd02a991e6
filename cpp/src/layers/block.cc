#include "layers/block.h"

namespace finequant {

Tensor Mlp::forward(const Tensor& x) const {
  if (!swiglu) return fc2.forward(fc1.forward(x));
  Tensor g = gate.forward(x);
  silu_mul_inplace(g, up.forward(x));
  return down.forward(g);
}

Tensor Block::forward(const Tensor& x, const AttentionContext& ctx, LayerKV* cache) const {
  if (pre_norm) {
    Tensor h = x.clone();
    add_inplace(h, attn.forward(norm1.forward(x), ctx, cache));
    add_inplace(h, mlp.forward(norm2.forward(h)));
    return h;
  }
  Tensor h = attn.forward(x, ctx, cache);
  add_inplace(h, x);
  h = norm1.forward(h);
  Tensor m = mlp.forward(h);
  add_inplace(m, h);
  return norm2.forward(m);
}

}  // namespace finequant
