// Token choice shared by Engine::generate and the Scheduler, so that a request gives the same
// tokens alone or in a batch (docs/DESIGN.md section 11).
#pragma once
#include <cstdint>
#include <random>

#include "finequant/engine.h"

namespace finequant {

// Throws InvalidArgument for sampling settings outside their ranges (max_new_tokens, temperature,
// top_k, top_p, suppress_tokens in [0, vocab_size) leaving at least one token).
void check_sampling_options(const GenerationOptions& o, int64_t vocab_size);

// The next token from one row of logits [V] (suppress_tokens' taken as -inf): the argmax when temperature
// <= 0, else a draw (one uniform number from `rng`) from softmax(logits / temperature) restricted to the top_k
// largest and then to the smallest prefix whose probability reaches top_p.
int64_t choose_token(const float* logits, int64_t V, const GenerationOptions& o, std::mt19937_64& rng);

bool is_stop_token(const GenerationOptions& o, int64_t token);

}  // namespace finequant
