// The CUDA backend's kernels, as launchers over raw device pointers on one stream (docs/DESIGN.md
// section 5.3). The backend (backend_cuda.cc) validates shapes and owns the memory; launchers only
// enqueue work and throw finequant::Error(Runtime) when a launch fails (check_launch).
//
// Integer operand layout (shared by every integer GEMM; prepared once at load, see layout.h):
//   * Operands are stored signed: a symmetric value as is; an asymmetric one shifted by
//     operand_shift(bits) (128 for 8-bit, 8 for 4-bit), its zero point shifted alike. The integer
//     result of a block, sum_k (x - zx)(w - zw), is unchanged (kernels/epilogue.h).
//   * K is cut into nb blocks of G (the weight's K-block; G = K when it has none), each padded with
//     zeros to Gp = round_up(G, 32); Kp = nb * Gp. Block b's k lies at [b * Gp, b * Gp + kb).
//   * 8-bit data: int8 [rows, Kp]; 4-bit packed: [rows, Kp / 2] bytes, element 2i in the low
//     nibble of byte i (two's complement nibbles). Weights are [N, Kp] (the nn.Linear layout, a
//     column-major B), activations [M, Kp].
//   * Per-channel tables are [nb, N]: sw (float), zw (shifted zero point), cm = sum_k w' - kb zw'.
//     Row groups and per-tensor weights are expanded to one entry per channel.
//   * Per-row tables: sx [M] (float), zx [M] (shifted zero point), rs [M, nb] = sum_k x' per block.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/epilogue.h"

namespace finequant {
namespace cuda {

using kernels::Epilogue;

// Throws Error(Runtime) naming `what` when the last launch (or `status`) failed.
void check_launch(const char* what);
void check(cudaError_t status, const char* what);

// ---- integer GEMM operands -------------------------------------------------------------------
struct IntWeightDev {
  const void* w = nullptr;       // int8 [N, Kp] (bits 8) or packed int4 [N, Kp / 2] (bits 4)
  const float* sw = nullptr;     // [nb, N]
  const int32_t* zw = nullptr;   // [nb, N], all zero when the weight is symmetric
  const int32_t* cm = nullptr;   // [nb, N]
  int64_t N = 0, K = 0, G = 0, Gp = 0, nb = 1, Kp = 0;
  int bits = 8;
  bool symmetric = true;  // zw == 0 everywhere
};

struct IntActsDev {
  void* xq = nullptr;        // int8 [M, Kp], or packed int4 [M, Kp / 2] when packed4
  float* sx = nullptr;       // [M]
  int32_t* zx = nullptr;     // [M], zero when symmetric
  int32_t* rs = nullptr;     // [M, nb]
  int64_t M = 0;
  int bits = 8;              // the values' range (4-bit values may be stored as int8)
  bool symmetric = true;
  bool packed4 = false;
};

struct GemmOutDev {
  float* y = nullptr;           // F32 [M, ldy], columns [0, N) written
  int64_t ldy = 0;
  const float* bias = nullptr;  // [N] or null
  Epilogue epilogue = Epilogue::None;
};

struct NormDev {
  int kind = 0;                 // 0: LayerNorm (weight, bias), 1: RMSNorm (weight)
  const float* weight = nullptr;
  const float* bias = nullptr;
  float eps = 1e-5f;
};

// Token-wise quantization of M rows of x (row stride ldx, K values each), normalized first when
// `norm` is given, written in the GEMM layout above: the same scale, zero point and values as the
// reference quantize_rows (docs/DESIGN.md section 2) on the (normalized) row. `out` describes the
// destination buffers and the format (bits, symmetric, packed4). A row holding NaN or Inf sets
// *bad_row = max(*bad_row, m) (device int32, initialized to -1 by the caller).
void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const NormDev* norm, int64_t G, int64_t Gp,
                   int64_t nb, const IntActsDev& out, int32_t* bad_row, cudaStream_t stream);

// CUTLASS tensor-core GEMMs for weights with one K-block (nb == 1), epilogue fused (EVT):
// y = act(sx sw float(correct_block(...)) + bias) (epilogue.h). Return false (nothing launched)
// when they do not cover the case, so the caller takes gemm_int_blocked.
//   sm80 kernels (SASS for sm80/86/89/90): W8A8 int8 x int8; W4A8 int8 x int4 (mixed input, int4
//   widened in the mainloop); W4A4 int4 x int4 (acts packed4). With 4-bit weights and 4-bit values
//   stored as int8 (packed4 false) the mixed W4A8 kernel runs: that is how W4A4 runs on sm90, where
//   INT4 MMA is emulated. The kernel's tile shape is chosen by M (decode- to prefill-sized buckets).
bool gemm_int_cutlass_sm80(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out, cudaStream_t stream);
//   sm90a: W8A8 with TMA and warp-specialized wgmma (IGMMA). False on other archs or bits.
bool gemm_int_cutlass_sm90(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out, cudaStream_t stream);

// Tensor-core GEMM for any weight (K-blocked or not, 8- or 4-bit, activations int8 storage, never
// packed4): mma.sync m16n8k32 s8 per block, INT4 weights widened in registers, each block's int32
// sums corrected and accumulated in fp32 in the reference's order. sm80 and later.
void gemm_int_blocked(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out, cudaStream_t stream);

// ---- floating point --------------------------------------------------------------------------
// y[M, N] = act(x[M, K] W[N, K]^T + bias) in fp32 (CUTLASS SIMT: exact fp32 products, no TF32).
void gemm_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, Epilogue epilogue,
              float* y, cudaStream_t stream);

// ---- norms and elementwise ops (F32 rows) ----------------------------------------------------
void norm_rows(const float* x, int64_t M, int64_t C, const NormDev& norm, float* y, cudaStream_t stream);
void add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream);
// y = x H (kernels/backend.h hadamard): M rows of K values, blocks of `block` (a power of two <= 4096
// dividing K); y may be x.
void hadamard(const float* x, float* y, int64_t M, int64_t K, int64_t block, cudaStream_t stream);
// out[m, i] = act(gate[m * gs + i]) * up[m * us + i], out dense [M, I]; act silu or GeLU-tanh.
void gated_mul(bool gelu_tanh, const float* gate, int64_t gs, const float* up, int64_t us, float* out, int64_t M,
               int64_t I, cudaStream_t stream);
// x[i] <- tanh(x[i] / cap) * cap for i < n.
void softcap(float* x, int64_t n, float cap, cudaStream_t stream);
// Rotary embedding in place (Hugging Face rotate_half): M rows `row_stride` floats apart, each
// starting with heads * head_dim values; positions [M] (int64); inv_freq [head_dim / 2].
void rope(float* x, int64_t row_stride, int64_t M, int64_t heads, int64_t head_dim, const float* inv_freq,
          const int64_t* positions, cudaStream_t stream);
// out[i] (=|+=) table[ids[i]] for i < n, rows of C floats.
void gather_rows(const float* table, int64_t C, const int64_t* ids, int64_t n, float* out, bool add,
                 cudaStream_t stream);

// ---- attention -------------------------------------------------------------------------------
// A strided view of [B, heads, T, D] F32: element (b, h, t, d) at data[b * sb + h * sh + t * st + d].
struct HeadViewDev {
  const float* data = nullptr;
  int64_t sb = 0, sh = 0, st = 0;
};
// Appends the chunk's keys and values (T tokens) at [past, past + T) of caches [B, KVH, cap, D].
void kv_append(const HeadViewDev& k, const HeadViewDev& v, float* k_cache, float* v_cache, int64_t B, int64_t KVH,
               int64_t cap, int64_t past, int64_t T, int64_t D, cudaStream_t stream);
// Softmax attention with grouped-query heads (q head h reads kv head h / (H / KVH)), exactly the
// CPU op's semantics (kernels/cpu/attention.h): out [B * Tq, H * D] token-major; key j of sequence b
// is visible when key_valid[b * key_valid_stride + j] != 0 and (causal_offset < 0 or
// j <= causal_offset + t) and, with window > 0, query_positions[b * Tq + t] -
// key_positions[b * key_valid_stride + j] < window; a query with no visible key gets zeros. Scores
// are scale * q.k, then softcap * tanh(s / softcap) when softcap > 0.
void attention(const HeadViewDev& q, const HeadViewDev& k, const HeadViewDev& v, float* out, int64_t B, int64_t H,
               int64_t KVH, int64_t Tq, int64_t Tk, int64_t D, const uint8_t* key_valid, int64_t key_valid_stride,
               int64_t causal_offset, float scale, int64_t window, const int64_t* query_positions,
               const int64_t* key_positions, float softcap, cudaStream_t stream);

}  // namespace cuda
}  // namespace finequant
