// Fragment layouts of mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 and the lane -> memory
// mapping of gemm_int_blocked (docs/DESIGN.md section 5). Host and device code, so that the mapping
// is unit-tested on the host (cpp/tests/test_cuda_mma_layout.cc) without a GPU.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FQ_MMA_HD __host__ __device__ __forceinline__
#else
#define FQ_MMA_HD inline
#endif

namespace finequant {
namespace cuda {
namespace mma {

// PTX ISA "Matrix Fragments for mma.m16n8k32" (.s8), g = lane / 4 (groupID), t = lane % 4:
//   A 16 x 32 (.row), 4 regs of 4 bytes: reg r, byte i -> row g + 8 (r & 1), k 4t + i + 16 (r >> 1)
//   B 32 x 8  (.col), 2 regs of 4 bytes: reg r, byte i -> k 4t + i + 16 r, column g
//   C 16 x 8  (s32),  4 regs:            elem e      -> row g + 8 (e >> 1), column 2t + (e & 1)
// (byte i of a register is bits [8i, 8i + 8), the lower-numbered element.)
FQ_MMA_HD constexpr int group_of(int lane) { return lane >> 2; }
FQ_MMA_HD constexpr int thread_in_group(int lane) { return lane & 3; }
FQ_MMA_HD constexpr int a_row(int lane, int reg) { return group_of(lane) + 8 * (reg & 1); }
FQ_MMA_HD constexpr int a_k(int lane, int reg, int byte) { return 4 * thread_in_group(lane) + byte + 16 * (reg >> 1); }
FQ_MMA_HD constexpr int b_k(int lane, int reg, int byte) { return 4 * thread_in_group(lane) + byte + 16 * reg; }
FQ_MMA_HD constexpr int b_col(int lane) { return group_of(lane); }
FQ_MMA_HD constexpr int c_row(int lane, int e) { return group_of(lane) + 8 * (e >> 1); }
FQ_MMA_HD constexpr int c_col(int lane, int e) { return 2 * thread_in_group(lane) + (e & 1); }

// Lane -> memory. A step covers `kstep` (32 or 64) consecutive k of one K-block. Lane t loads the
// kstep / 4 contiguous bytes [t kstep / 4, (t + 1) kstep / 4) of the step from each of its rows (A
// rows g and g + 8; the weight row of column g), as words w = 0 .. kstep / 16 - 1 (4 bytes each).
// MMA j (< kstep / 32) of the step takes words 2j + (r >> 1) as A reg r and words 2j + r as B reg r,
// the same for A and B: a permutation of k shared by both operands, so the dot products are those
// of the step. Each MMA covers k only inside its step, hence only inside one K-block.
FQ_MMA_HD constexpr int lane_bytes(int kstep) { return kstep / 4; }
FQ_MMA_HD constexpr int lane_words(int kstep) { return kstep / 16; }
FQ_MMA_HD constexpr int mmas_per_step(int kstep) { return kstep / 32; }
// k inside the step of byte `byte` of the lane's word `word`.
FQ_MMA_HD constexpr int lane_word_k(int kstep, int lane, int word, int byte) {
  return thread_in_group(lane) * lane_bytes(kstep) + 4 * word + byte;
}
// Word of the lane's chunk that MMA j feeds as A reg r / B reg r.
FQ_MMA_HD constexpr int a_word(int j, int reg) { return 2 * j + (reg >> 1); }
FQ_MMA_HD constexpr int b_word(int j, int reg) { return 2 * j + reg; }

// __byte_perm without the sign-replication mode: result byte n = byte (sel >> 4n) & 7 of {b:a}.
FQ_MMA_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t ab = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>((ab >> (8 * ((sel >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
#endif
}

// Eight packed signed nibbles (element 2i in the low nibble of byte i) -> eight int8 in two words:
// lo = elements 0..3, hi = elements 4..7 (byte i of a word = element i of the four).
// Per byte, a nibble v (0..15) is turned into v ^ 8 = s + 8 (s its signed value), then
// ((s + 8) + 0x78) ^ 0x80 = s as a two's complement byte; no carry crosses bytes (at most 0x87).
FQ_MMA_HD void widen_int4(uint32_t packed, uint32_t& lo, uint32_t& hi) {
  uint32_t even = (packed & 0x0F0F0F0Fu) ^ 0x08080808u;         // elements 0, 2, 4, 6
  uint32_t odd = ((packed >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u;   // elements 1, 3, 5, 7
  even = (even + 0x78787878u) ^ 0x80808080u;
  odd = (odd + 0x78787878u) ^ 0x80808080u;
  lo = byte_perm(even, odd, 0x5140u);  // e0 o0 e1 o1
  hi = byte_perm(even, odd, 0x7362u);  // e2 o2 e3 o3
}

// Split-K schedule of the small-M kernel: a round is `blocks` whole K-blocks (steps
// [first, first + count)), cut into `warps` contiguous step ranges, range w = [begin(w), begin(w + 1)).
FQ_MMA_HD constexpr int64_t warp_range_begin(int64_t first, int64_t count, int warps, int w) {
  return first + count * w / warps;
}
// Blocks per round: enough steps for every warp to have `steps_per_warp` in flight, at most `cap`.
FQ_MMA_HD constexpr int64_t round_blocks(int64_t steps_per_block, int64_t nb, int warps, int steps_per_warp,
                                         int64_t cap) {
  const int64_t want = (static_cast<int64_t>(warps) * steps_per_warp + steps_per_block - 1) / steps_per_block;
  const int64_t r = want < 1 ? 1 : want;
  const int64_t c = r < cap ? r : cap;
  return c < nb ? c : nb;
}

}  // namespace mma
}  // namespace cuda
}  // namespace finequant
