// The transformer block shared by all families; the variant is data, not a class per model:
//   pre-LN (GPT-2, Llama):  x = x + attn(norm1(x)); x = x + mlp(norm2(x))
//   sandwich (Gemma 2):     x = x + post_attn_norm(attn(norm1(x))); x = x + post_mlp_norm(mlp(norm2(x)))
//   post-LN (BERT):         x = norm1(x + attn(x)); x = norm2(x + mlp(x))
// An encoder-decoder's decoder block (BART) has a cross-attention over the encoder's output between
// the two, with its own norm (norm_cross): post-LN x = norm_cross(x + cross(x)), pre-LN
// x = x + cross(norm_cross(x)).
// Pre-LN norms are fused into the GEMM that reads them (kernels::GemmInput::norm): each
// normalized row is made and quantized by the q/k/v (or fc1/gate-up) kernel and never stored.
#pragma once
#include "layers/attention.h"
#include "layers/norm.h"

namespace finequant {

struct Mlp {
  // plain: fc2(act(fc1 x)), the activation fused into fc1's epilogue.
  // gated: down(act(gate x) * up x) with act silu (SwiGLU) or GeLU-tanh (GeGLU), gate and up one
  // Linear when the file stores them fused (Phi-3's gate_up_proj) or merged at load when they
  // quantize alike (output rows [gate | up]), else two.
  bool gated = false;
  kernels::GateActivation gate_act = kernels::GateActivation::Silu;
  Linear fc1, fc2;                // plain
  std::vector<Linear> gate_up;    // gated
  Linear down;
  Tensor forward(const ExecContext& ctx, const kernels::GemmInput& x) const;
};

struct Block {
  bool pre_norm = true;
  Norm norm1, norm2;
  bool sandwich = false;               // pre-LN only: post_attn_norm / post_mlp_norm on the branch outputs
  Norm post_attn_norm, post_mlp_norm;
  SelfAttention attn;
  Mlp mlp;
  bool has_cross = false;
  CrossAttention cross;
  Norm norm_cross;
  // memory: the cross-attention's keys and values (blocks with has_cross only).
  Tensor forward(const ExecContext& ctx, const Tensor& x, const AttentionContext& actx, LayerKV* cache,
                 const CrossKV* memory = nullptr) const;
  // The Linears a decode step runs, in the order it runs them (the cross-attention's keys and values
  // are made once per call, not per step).
  std::vector<Linear*> step_linears();
};

// Links each Linear of a decode step to the one it runs after it (Linear::set_next): the blocks' in
// order, then the head, whose next is the first block's first (the next step).
void link_step_order(std::vector<Block>& blocks, Linear& head);

}  // namespace finequant
