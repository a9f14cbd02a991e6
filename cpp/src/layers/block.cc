#include "layers/block.h"

namespace finequant {

Tensor Mlp::forward(const ExecContext& ctx, const kernels::GemmInput& x) const {
  if (!gated) return fc2.forward(ctx, fc1.forward(ctx, x));
  const std::vector<Tensor> outs = Linear::forward_each(ctx, gate_up, x);
  const int64_t M = x.x.dim(0), I = down.in_features();
  const Tensor& g = outs[0];
  const Tensor& u = outs.size() == 1 ? outs[0] : outs[1];
  Tensor h = Tensor::empty(DType::F32, {M, I}, ctx.device);
  ctx.backend->gated_mul(ctx, gate_act, g.data<float>(), g.dim(1), u.data<float>() + (outs.size() == 1 ? I : 0),
                         u.dim(1), h.data<float>(), M, I);
  return down.forward(ctx, h);
}

std::vector<Linear*> Block::step_linears() {
  std::vector<Linear*> out;
  for (Linear& l : attn.qkv) out.push_back(&l);
  out.push_back(&attn.o);
  if (has_cross) {
    out.push_back(&cross.q);
    out.push_back(&cross.o);
  }
  if (mlp.gated) {
    for (Linear& l : mlp.gate_up) out.push_back(&l);
    out.push_back(&mlp.down);
  } else {
    out.push_back(&mlp.fc1);
    out.push_back(&mlp.fc2);
  }
  return out;
}

void link_step_order(std::vector<Block>& blocks, Linear& head) {
  std::vector<Linear*> order;
  for (Block& b : blocks)
    for (Linear* l : b.step_linears()) order.push_back(l);
  order.push_back(&head);
  for (size_t i = 0; i < order.size(); ++i) order[i]->set_next(*order[(i + 1) % order.size()]);
}

Tensor Block::forward(const ExecContext& ctx, const Tensor& x, const AttentionContext& actx, LayerKV* cache,
                      const CrossKV* memory) const {
  const kernels::Backend& be = *ctx.backend;
  FQ_CHECK_ARG(!has_cross || memory, "a cross-attention block needs the encoder's keys and values");
  if (pre_norm) {
    const kernels::NormParams n1 = norm1.params(), n2 = norm2.params();
    Tensor h = x.clone();
    const Tensor a = attn.forward(ctx, kernels::GemmInput{x, &n1}, actx, cache);
    be.add(ctx, h, sandwich ? post_attn_norm.forward(ctx, a) : a);
    if (has_cross) {
      const kernels::NormParams nc = norm_cross.params();
      be.add(ctx, h, cross.forward(ctx, kernels::GemmInput{h, &nc}, actx.B, actx.T, *memory));
    }
    const Tensor m = mlp.forward(ctx, kernels::GemmInput{h, &n2});
    be.add(ctx, h, sandwich ? post_mlp_norm.forward(ctx, m) : m);
    return h;
  }
  Tensor h = attn.forward(ctx, kernels::GemmInput{x}, actx, cache);
  be.add(ctx, h, x);
  h = norm1.forward(ctx, h);
  if (has_cross) {
    Tensor c = cross.forward(ctx, kernels::GemmInput{h}, actx.B, actx.T, *memory);
    be.add(ctx, c, h);
    h = norm_cross.forward(ctx, c);
  }
  Tensor m = mlp.forward(ctx, kernels::GemmInput{h});
  be.add(ctx, m, h);
  return norm2.forward(ctx, m);
}

}  // namespace finequant
