// One kernel interface for every backend (docs/DESIGN.md section 5). Layers call these ops through
// the execution context's backend and never see a device or an instruction set; a backend is a
// folder (kernels/cpu/, cuda/src/) and a line in backend_for().
//
// Every pointer and tensor handed to a backend lives on the backend's device. Shapes are checked
// by the callers (Engine at the door, layers when they wire); backends assume valid input.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/context.h"
#include "finequant/quant.h"
#include "finequant/tensor.h"
#include "kernels/epilogue.h"

namespace finequant {
namespace kernels {

// A Linear as the model file stores it (host memory, canonical layout): an integer weight
// (weight.q defined, INT4 unpacked to one value per element) or a floating-point one.
// How Linears with floating-point inputs multiply (EngineOptions::float_precision, docs/DESIGN.md
// 5.4): exact fp32 products, or bf16 operands (the weight stored as bf16, the inputs rounded per
// call) with fp32 sums where the backend has such a kernel (CPU: AVX512-BF16), else fp32.
enum class FloatPrecision { F32, BF16 };

struct LinearWeights {
  QuantizedTensor weight;  // integer weight, or undefined
  Tensor weight_f32;       // F32 [N, K] when weight.q is undefined
  Tensor bias;             // F32 [N] or undefined
  QuantSpec act{0, true};  // token-wise activation quantization; bits 0: floating-point inputs
  Epilogue epilogue = Epilogue::None;
  FloatPrecision precision = FloatPrecision::F32;  // for floating-point inputs (act.bits == 0)
  // Block-Hadamard input rotation (docs/DESIGN.md section 2): 0 none, else the block size b; the
  // weight already holds W H, and the Linear multiplies rows(x) H before the GEMM. Not the kernel's
  // concern: the backend prepares the weight as usual.
  int64_t rotation = 0;

  bool quantized() const { return weight.q.defined(); }
  int64_t out_features() const { return quantized() ? weight.q.dim(0) : weight_f32.dim(0); }
  int64_t in_features() const { return quantized() ? weight.q.dim(1) : weight_f32.dim(1); }
  // Weight-only quantization (W8A16 / W4A16): the weight dequantized once, as F32.
  LinearWeights dequantized() const;
};

// A Linear's weight in the form its kernel wants, made once at load by the backend that runs it;
// opaque to layers (each CPU ISA and each CUDA kernel family owns its layout).
class PreparedLinear {
 public:
  virtual ~PreparedLinear() = default;
  int64_t N = 0, K = 0;
  Epilogue epilogue = Epilogue::None;
  Tensor bias;          // F32 [N] on the backend's device, or undefined
  std::string kernel;   // the kernel that runs it, e.g. "cpu/avx512vnni int8", "cuda/cutlass-sm90 w8a8"
};

// LayerNorm (weight, bias) or RMSNorm (weight only) over rows of C values.
struct NormParams {
  enum class Kind { LayerNorm, RMSNorm };
  Kind kind = Kind::LayerNorm;
  const float* weight = nullptr;  // [C]
  const float* bias = nullptr;    // [C] (LayerNorm) or null
  float eps = 1e-5f;
  int64_t C = 0;
};

// The rows entering a GEMM: x [M, K], normalized on the way in when `norm` is set (a fused
// producer: pre-LN blocks hand their norm to the q/k/v and fc1 kernels, so an integer kernel
// quantizes each normalized row where it is made and the F32 rows are never stored).
// With `rotation` (a block b > 0) the GEMM reads the (normalized) rows times the block-Hadamard H
// (DESIGN section 2, the backend's `hadamard`): the CPU kernels rotate each row where they quantize
// it; x itself is never modified.
struct GemmInput {
  const Tensor& x;
  const NormParams* norm = nullptr;
  int64_t rotation = 0;
  // The weight the model multiplies next (Linear::set_next), or null: a CPU backend has its idle
  // threads prefetch it during a decode-sized call and the serial work after it (DESIGN 5.5).
  const PreparedLinear* next = nullptr;
};

// A strided view of a 4-D F32 array [B, heads, T, D]: element (b, h, t, d) is at
// data[b * sb + h * sh + t * st + d]. Attention reads Q/K/V straight from projection outputs or a
// KV cache without copies.
struct HeadView {
  const float* data = nullptr;
  int64_t sb = 0, sh = 0, st = 0;
  const float* at(int64_t b, int64_t h, int64_t t) const { return data + b * sb + h * sh + t * st; }
};

// Scaled dot-product attention with grouped-query heads (q head h reads kv head h / (H / KVH)).
//   q: [B, H, Tq, D], k/v: [B, KVH, Tk, D]; out: F32 [B * Tq, H * D] (token-major, ready for o_proj).
//   key_valid[b * key_valid_stride + j] != 0 when key j of sequence b may be attended to.
//   causal_offset >= 0: query t sits at absolute key index causal_offset + t and sees keys <= that;
//   causal_offset < 0: no causal mask (encoder). A query with no visible key gets zeros.
//   window > 0 (sliding window): query t of sequence b also needs
//     query_positions[b * Tq + t] - key_positions[b * key_valid_stride + j] < window;
//   key positions never decrease along j (padding slots hold the next real token's position).
//   softcap > 0: each score s = scale * q.k becomes softcap * tanh(s / softcap) before the softmax.
struct AttentionArgs {
  HeadView q, k, v;
  float* out = nullptr;
  int64_t B = 0, H = 0, KVH = 0, Tq = 0, Tk = 0, D = 0;
  const uint8_t* key_valid = nullptr;
  int64_t key_valid_stride = 0;
  int64_t causal_offset = -1;
  float scale = 1.f;
  int64_t window = 0;
  const int64_t* query_positions = nullptr;  // I64 [B * Tq] (window > 0)
  const int64_t* key_positions = nullptr;    // I64 [B, key_valid_stride] (window > 0)
  float softcap = 0.f;
};

// The activation of a gated MLP's gate: silu (SwiGLU) or GeLU with the tanh approximation (GeGLU).
enum class GateActivation { Silu, GeluTanh };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // e.g. "cpu (avx2)", "cuda:0 NVIDIA H200 (sm90)"

  // The context of one call on the calling thread, its CPU work on `pool` (CUDA: the thread's
  // stream on this device).
  virtual ExecContext context(ThreadPool& pool) const = 0;
  // Waits for the call's work; throws InvalidArgument if a kernel met NaN/Inf input on the way.
  virtual void finish(const ExecContext& ctx) const = 0;

  // ---- GEMM: y [M, N] = epilogue(rows(x) W^T + bias), integer or floating point -----------
  virtual std::unique_ptr<PreparedLinear> prepare_linear(const LinearWeights& w, ThreadPool& pool) const = 0;  // pool: packing
  virtual void linear(const ExecContext& ctx, const GemmInput& x, const PreparedLinear& w, Tensor& y) const = 0;

  // ---- norms and elementwise ops on F32 rows ------------------------------------------------
  virtual void norm(const ExecContext& ctx, const Tensor& x, const NormParams& norm, Tensor& y) const = 0;
  virtual void add(const ExecContext& ctx, Tensor& x, const Tensor& y) const = 0;  // x += y
  // y = x H for x, y F32 [rows, K] with H = blockdiag(H_b) / sqrt(b) (docs/DESIGN.md section 2): per
  // block of b consecutive values of a row, butterfly stages h = 1, 2, ..., b/2 pairing i (bit h of
  // its index in the block clear) with i + h as (a + c, a - c) in fp32, then each value times
  // float(1 / sqrt(b)). Every backend does exactly these operations (bit-identical results).
  // y may be x (in place); b is a power of two that divides K.
  virtual void hadamard(const ExecContext& ctx, const Tensor& x, Tensor& y, int64_t block) const = 0;
  // out[m, i] = act(gate[m * gate_stride + i]) * up[m * up_stride + i], out dense [M, I].
  virtual void gated_mul(const ExecContext& ctx, GateActivation act, const float* gate, int64_t gate_stride,
                         const float* up, int64_t up_stride, float* out, int64_t M, int64_t I) const = 0;
  // x <- cap * tanh(x / cap) elementwise (final-logit soft-capping), x F32.
  virtual void softcap(const ExecContext& ctx, Tensor& x, float cap) const = 0;
  // Rotary embedding (Hugging Face rotate_half) in place on M rows `row_stride` floats apart, each
  // starting with heads * D values (D = 2 * inv_freq.numel()); positions: I64 [M].
  virtual void rope(const ExecContext& ctx, float* x, int64_t row_stride, int64_t M, int64_t heads,
                    const Tensor& inv_freq, const Tensor& positions) const = 0;
  // out[i] = table[ids[i]] (or += with add) for i < ids.numel(); table [V, C], ids I64, out [n, C].
  virtual void gather_rows(const ExecContext& ctx, const Tensor& table, const Tensor& ids, Tensor& out,
                           bool add) const = 0;

  // ---- attention and the KV cache ------------------------------------------------------------
  // Stores T tokens of k and v (views [B, KVH, T, D]) at [past, past + T) of caches [B, KVH, cap, D].
  virtual void kv_append(const ExecContext& ctx, const HeadView& k, const HeadView& v, Tensor& k_cache,
                         Tensor& v_cache, int64_t past, int64_t T) const = 0;
  virtual void attention(const ExecContext& ctx, const AttentionArgs& args) const = 0;
};

// The backend that runs on `device` (CPU: one per process; CUDA: one per device ordinal).
const Backend& backend_for(Device device);

}  // namespace kernels
}  // namespace finequant
