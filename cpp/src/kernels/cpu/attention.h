// CPU attention (kernels/backend.h AttentionArgs): the loops over sequences, heads and blocks of
// up to 6 queries, with masking and softmax, around the inner products of a registered kernel: a
// portable form and an AVX-512 form (register tiles of up to 6 queries x 64 keys / 64 values; decode:
// 16 cached keys per step).
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_isa.h"

namespace finequant {
namespace kernels {

constexpr int kAttnQueries = 6;  // queries per block
// Calls with at least this many queries transpose K for the score tiles; fewer (decode) take a dot
// product per key.
constexpr int kAttnTransposeQueries = 4;
constexpr int64_t kAttnKeys = 64;  // keys per score tile; K^T rows are padded to a multiple

// scores[i * ld + j] = sum_d q[i][d] * kt[d * ld_kt + j] for i < nq, j < nkeys (a multiple of
// kAttnKeys; kt holds zeros past the real keys).
using AttnScoresFn = void (*)(const float* const* q, int nq, const float* kt, int64_t ld_kt, int64_t nkeys, int64_t D,
                              float* scores, int64_t ld);
// out[i][d] = sum_{j < n} p[i * ld + j] * v[j * v_stride + d] for i < nq, d < D. Masked keys have
// p = 0; their values (padding tokens, computed like any other) are finite, so they add nothing.
using AttnValuesFn = void (*)(const float* p, int64_t ld, int nq, const float* v, int64_t v_stride, int64_t n,
                              int64_t D, float* const* out);

// Decode (fewer queries than kAttnTransposeQueries): scores[j] = sum_d q[d] * k[j * k_stride + d] for j < n,
// straight from the cache rows. Every key's sum is formed in the same order wherever the key sits, so a
// key's score does not depend on its slot (masked slots between keys change nothing; DESIGN section 11).
using AttnKeyScoresFn = void (*)(const float* q, const float* k, int64_t k_stride, int64_t n, int64_t D, float* scores);

// In place: p[j] <- softmax_j(valid[j] ? p[j] * scale : -inf) over j < n, exact zeros at invalid
// keys; all zeros (and false) when no key is valid.
using AttnSoftmaxFn = bool (*)(float* p, const uint8_t* valid, int64_t n, float scale);

// kt[d * ld + j] = k[j * k_stride + d] for j < n, d < D (K^T for the score tiles); the rest of kt
// is left as it is.
using AttnTransposeFn = void (*)(const float* k, int64_t k_stride, int64_t n, int64_t D, float* kt, int64_t ld);

struct AttentionKernel {
  CpuIsa level;
  AttnScoresFn scores;
  AttnKeyScoresFn key_scores;
  AttnValuesFn values;
  AttnSoftmaxFn softmax;
  AttnTransposeFn transpose;
};
AttentionKernel attention_ref();
AttentionKernel attention_avx512();
const std::vector<AttentionKernel>& attention_kernels();  // registry.cc

// Attention with the given kernel's inner products (the best for the active level by default).
void attention(const ExecContext& ctx, const AttentionArgs& args, const AttentionKernel& kernel);

}  // namespace kernels
}  // namespace finequant
