// CPU norms and elementwise ops on F32 rows (the loops behind the CPU backend's ops).
#pragma once
#include <algorithm>
#include <cstdint>

#include "kernels/backend.h"

namespace finequant {
namespace kernels {

// Below twice this many elements a norm or elementwise op runs on the calling thread: waking workers costs
// more. 8192, not 65536: BERT-base 1 x 32's residual adds and LayerNorms (24,576 values) then split, 0.985x
// its time on Zen 4 (paired A/B in one process; DESIGN 5.5).
constexpr int64_t kParallelElements = 8192;
// parallel_for's grain in rows of `row` values each.
inline int64_t parallel_rows_grain(int64_t row) {
  return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(row, 1));
}

void add_inplace(float* x, const float* y, int64_t n, ThreadPool& pool);
void gated_mul(GateActivation act, const float* gate, int64_t gate_stride, const float* up, int64_t up_stride,
               float* out, int64_t M, int64_t I, ThreadPool& pool);
void softcap(float* x, int64_t n, float cap, ThreadPool& pool);  // x <- tanh(x / cap) * cap
void rope(float* x, int64_t row_stride, int64_t M, int64_t heads, const float* inv_freq, int64_t half,
          const int64_t* positions, ThreadPool& pool);
// y = x H, the block-Hadamard rotation of `rows` rows of K values (kernels/backend.h `hadamard`);
// y may be x.
void hadamard_rows(const float* x, float* y, int64_t rows, int64_t K, int64_t block, ThreadPool& pool);

// The rotation of one row of K values by blocks of `block` (none when 0), with the row kernel of
// the active ISA level chosen once (row_rotation, hadamard.cc); y may be x.
struct RowRotation {
  int64_t block = 0;
  float scale = 0.f;  // float(1 / sqrt(block)), the one multiply of each value
  void (*kernel)(const float* x, float* y, int64_t K, int64_t block, float scale) = nullptr;

  explicit operator bool() const { return block > 0; }
  void apply(const float* x, float* y, int64_t K) const { kernel(x, y, K, block, scale); }
};
RowRotation row_rotation(int64_t block, int64_t K);
void gather_rows(const float* table, int64_t C, const int64_t* ids, int64_t n, float* out, bool add);
void kv_append(const HeadView& k, const HeadView& v, float* k_cache, float* v_cache, int64_t B, int64_t KVH,
               int64_t cap, int64_t past, int64_t T, int64_t D);

}  // namespace kernels
}  // namespace finequant
