// The CUDA backend's integer operand layout (cuda/src/kernels.h, docs/DESIGN.md section 5.3) made
// on the host: weights are packed once at load here and uploaded; the activation quantization and
// the integer GEMM are also emulated here, with the kernels' exact integer and fp32 operations, so
// that the CPU tests check the layout and the epilogue bit for bit against the CPU reference on
// machines without a GPU. Plain C++: built with or without the CUDA backend.
#pragma once
#include <cstdint>
#include <vector>

#include "finequant/quant.h"
#include "kernels/epilogue.h"

namespace finequant {
namespace cuda {

constexpr int64_t kBlockAlign = 32;  // every K-block is padded to a multiple of 32 (one k32 MMA step)

// The constant an asymmetric operand is shifted by so that it is stored signed: q - shift
// (host and device).
FQ_ALWAYS_INLINE int32_t operand_shift(int bits, bool symmetric) { return symmetric ? 0 : (bits == 8 ? 128 : 8); }

// K cut into nb blocks of G, each padded to Gp = round_up(G, 32): Kp = nb * Gp.
struct KBlocks {
  int64_t K = 0, G = 0, Gp = 0, nb = 1, Kp = 0;
  static KBlocks of(int64_t K, int64_t G);  // G <= 0 or G >= K: one block
  int64_t length(int64_t b) const { return (b + 1 < nb ? G : K - b * G); }  // real k of block b
};

struct PackedIntWeight {
  int64_t N = 0;
  KBlocks kb;
  int bits = 8;
  bool symmetric = true;
  std::vector<uint8_t> w;   // int8 [N, Kp] or packed int4 [N, Kp / 2] (element 2i low nibble)
  std::vector<float> sw;    // [nb, N]
  std::vector<int32_t> zw;  // [nb, N] shifted zero points (0 when symmetric)
  std::vector<int32_t> cm;  // [nb, N] sum_k w' - kb zw'
};
// From the canonical weight (INT4 unpacked, one value per element; any tile of the math contract).
PackedIntWeight pack_int_weight(const QuantizedTensor& w);

struct QuantizedActs {
  int64_t M = 0;
  KBlocks kb;
  int bits = 8;
  bool symmetric = true;
  bool packed4 = false;
  std::vector<uint8_t> xq;  // int8 [M, Kp] or packed int4 [M, Kp / 2]
  std::vector<float> sx;    // [M]
  std::vector<int32_t> zx;  // [M]
  std::vector<int32_t> rs;  // [M, nb]
};
// What the quantize_rows kernel writes for x [M, K] (already normalized rows): the reference's
// values (quantize_rows) in the layout. Throws InvalidArgument for NaN/Inf, as the backend does
// after the kernel flags a row.
QuantizedActs quantize_rows_emulated(const float* x, int64_t M, int64_t K, QuantSpec act, int64_t G, bool packed4);

// What every integer GEMM kernel computes from these operands: y [M, N] (row-major).
void gemm_int_emulated(const QuantizedActs& x, const PackedIntWeight& w, const float* bias, kernels::Epilogue epilogue,
                       float* y);

}  // namespace cuda
}  // namespace finequant
