// The two inner products of softmax attention for a block of up to 4 queries of one head, with a
// portable form and an AVX-512 form (register tiles of 4 queries x 64 keys / 64 values) picked by
// active_isa(). attention() in layers/ops.cc does the masking, softmax and the loops around them.
#pragma once
#include <cstdint>

namespace finequant {
namespace kernels {

constexpr int kAttnQueries = 4;  // queries per block
constexpr int64_t kAttnKeys = 64;  // keys per score tile; K^T rows are padded to a multiple

// scores[i * ld + j] = sum_d q[i][d] * kt[d * ld_kt + j] for i < nq, j < nkeys (a multiple of
// kAttnKeys; kt holds zeros past the real keys).
using AttnScoresFn = void (*)(const float* const* q, int nq, const float* kt, int64_t ld_kt, int64_t nkeys, int64_t D,
                              float* scores, int64_t ld);
// out[i][d] = sum_{j < n} p[i * ld + j] * v[j * v_stride + d] for i < nq, d < D. Masked keys have
// p = 0; their values (padding tokens, computed like any other) are finite, so they add nothing.
using AttnValuesFn = void (*)(const float* p, int64_t ld, int nq, const float* v, int64_t v_stride, int64_t n,
                              int64_t D, float* const* out);

// In place: p[j] <- softmax_j(valid[j] ? p[j] * scale : -inf) over j < n, exact zeros at invalid
// keys; all zeros (and false) when no key is valid.
using AttnSoftmaxFn = bool (*)(float* p, const uint8_t* valid, int64_t n, float scale);

bool attention_softmax_ref(float* p, const uint8_t* valid, int64_t n, float scale);
bool attention_softmax_avx512(float* p, const uint8_t* valid, int64_t n, float scale);
AttnSoftmaxFn select_attention_softmax();

void attention_scores_ref(const float* const* q, int nq, const float* kt, int64_t ld_kt, int64_t nkeys, int64_t D,
                          float* scores, int64_t ld);
void attention_values_ref(const float* p, int64_t ld, int nq, const float* v, int64_t v_stride, int64_t n, int64_t D,
                          float* const* out);
void attention_scores_avx512(const float* const* q, int nq, const float* kt, int64_t ld_kt, int64_t nkeys, int64_t D,
                             float* scores, int64_t ld);
void attention_values_avx512(const float* p, int64_t ld, int nq, const float* v, int64_t v_stride, int64_t n,
                             int64_t D, float* const* out);
AttnScoresFn select_attention_scores();
AttnValuesFn select_attention_values();

}  // namespace kernels
}  // namespace finequant
