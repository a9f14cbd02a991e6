// The transformer block shared by all families; the variant is data, not a class per model:
//   pre-LN (GPT-2, Llama):  x = x + attn(norm1(x)); x = x + mlp(norm2(x))
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
  // gelu: fc2(act(fc1 x)), the activation fused into fc1's epilogue.
  // swiglu: down(silu(gate x) * up x), gate and up merged into one Linear at load when they
  // quantize alike (output rows [gate | up]), else two.
  bool swiglu = false;
  Linear fc1, fc2;                // gelu
  std::vector<Linear> gate_up;    // swiglu
  Linear down;
  Tensor forward(const ExecContext& ctx, const kernels::GemmInput& x) const;
};

struct Block {
  bool pre_norm = true;
  Norm norm1, norm2;
  SelfAttention attn;
  Mlp mlp;
  bool has_cross = false;
  CrossAttention cross;
  Norm norm_cross;
  // memory: the cross-attention's keys and values (blocks with has_cross only).
  Tensor forward(const ExecContext& ctx, const Tensor& x, const AttentionContext& actx, LayerKV* cache,
                 const CrossKV* memory = nullptr) const;
};

}  // namespace finequant
