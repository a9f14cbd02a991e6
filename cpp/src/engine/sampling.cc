#include "engine/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/act_math.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {

void check_sampling_options(const GenerationOptions& o, int64_t vocab_size) {
  FQ_CHECK_ARG(o.max_new_tokens >= 0, "max_new_tokens must be >= 0");
  FQ_CHECK_ARG(std::isfinite(o.temperature), "temperature must be finite");
  FQ_CHECK_ARG(o.top_k >= 0, "top_k must be >= 0");
  FQ_CHECK_ARG(o.top_p > 0.f && o.top_p <= 1.f, "top_p must be in (0, 1]");
  std::vector<bool> suppressed(static_cast<size_t>(vocab_size));
  for (int64_t t : o.suppress_tokens) {
    FQ_CHECK_ARG(t >= 0 && t < vocab_size, "suppress_tokens: " + std::to_string(t) + " is outside [0, " +
                                               std::to_string(vocab_size) + ")");
    suppressed[static_cast<size_t>(t)] = true;
  }
  FQ_CHECK_ARG(std::find(suppressed.begin(), suppressed.end(), false) != suppressed.end(),
               "suppress_tokens leaves no token to choose");
}

namespace {

// Unnormalized probabilities exp((logit - max) / temperature) of every token (fp32 values, the
// portable exp: one vectorized pass over the vocabulary); exactly 0 below exp's range (-inf logits).
FQ_MULTIVERSION void token_weights(const float* logits, int64_t V, float mx, float inv_t, float* w) {
  for (int64_t i = 0; i < V; ++i) {
    const float x = (logits[i] - mx) * inv_t;
    w[i] = x < kernels::actmath::kExpLo ? 0.f : kernels::actmath::exp(x);
  }
}

}  // namespace

// top_k and top_p take the candidates in descending logit order (ties: the lower id first, as a
// stable sort), sorted only as far as they reach; without them the draw walks the ids in order.
// Sorting the whole vocabulary took ~4 ms per token at 49K, half of a SmolLM2 decode step (DESIGN 5.4).
int64_t choose_token(const float* row, int64_t V, const GenerationOptions& o, std::mt19937_64& rng) {
  std::vector<float> masked;
  const float* logits = row;
  if (!o.suppress_tokens.empty()) {
    masked.assign(row, row + V);
    for (int64_t t : o.suppress_tokens) masked[static_cast<size_t>(t)] = -INFINITY;
    logits = masked.data();
  }
  const int64_t best = std::max_element(logits, logits + V) - logits;
  if (o.temperature <= 0.f) return best;
  std::vector<float> w(static_cast<size_t>(V));
  token_weights(logits, V, logits[best], 1.f / o.temperature, w.data());
  int64_t keep = o.top_k > 0 ? std::min<int64_t>(o.top_k, V) : V;
  if (keep == V && o.top_p >= 1.f) {  // no filter: the draw needs no order
    double total = 0.0;
    for (int64_t i = 0; i < V; ++i) total += w[i];
    const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
    double cum = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      cum += w[i];
      if (u < cum) return i;
    }
    return best;  // (rounding: u at the very end of the total)
  }
  std::vector<int64_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  int64_t sorted = 0;  // order[0, sorted) holds the best tokens in order
  auto sort_to = [&](int64_t n) {
    n = std::min(n, V);
    if (n <= sorted) return;
    auto first = [&](int64_t a, int64_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    std::nth_element(order.begin() + sorted, order.begin() + (n - 1), order.end(), first);
    std::sort(order.begin() + sorted, order.begin() + n, first);
    sorted = n;
  };
  double total = 0.0;
  if (keep < V) {
    sort_to(keep);
    for (int64_t i = 0; i < keep; ++i) total += w[order[i]];
  } else {
    for (int64_t i = 0; i < V; ++i) total += w[i];
  }
  if (o.top_p < 1.f) {  // smallest prefix whose probability reaches top_p (at least one token)
    double cum = 0.0;
    int64_t n = 0;
    while (n < keep && cum < o.top_p * total) {
      if (n >= sorted) sort_to(std::max<int64_t>(64, 4 * sorted));
      cum += w[order[n++]];
    }
    keep = std::max<int64_t>(n, 1);
    total = 0.0;
    for (int64_t i = 0; i < keep; ++i) total += w[order[i]];
  }
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
  double cum = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += w[order[i]];
    if (u < cum) return order[i];
  }
  return order[keep - 1];
}

bool is_stop_token(const GenerationOptions& o, int64_t token) {
  return std::find(o.stop_tokens.begin(), o.stop_tokens.end(), token) != o.stop_tokens.end();
}

}  // namespace finequant
