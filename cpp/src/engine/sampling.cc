#include "engine/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace finequant {

void check_sampling_options(const GenerationOptions& o) {
  FQ_CHECK_ARG(o.max_new_tokens >= 0, "max_new_tokens must be >= 0");
  FQ_CHECK_ARG(std::isfinite(o.temperature), "temperature must be finite");
  FQ_CHECK_ARG(o.top_k >= 0, "top_k must be >= 0");
  FQ_CHECK_ARG(o.top_p > 0.f && o.top_p <= 1.f, "top_p must be in (0, 1]");
}

int64_t choose_token(const float* logits, int64_t V, const GenerationOptions& o, std::mt19937_64& rng) {
  if (o.temperature <= 0.f) return std::max_element(logits, logits + V) - logits;
  std::vector<int64_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  int64_t keep = V;
  if (o.top_k > 0) keep = std::min(keep, o.top_k);
  std::vector<double> p(static_cast<size_t>(keep));
  const double mx = logits[order[0]];
  double total = 0.0;
  for (int64_t i = 0; i < keep; ++i) total += p[i] = std::exp((logits[order[i]] - mx) / o.temperature);
  if (o.top_p < 1.f) {  // smallest prefix whose probability reaches top_p (at least one token)
    double cum = 0.0;
    int64_t n = 0;
    while (n < keep && cum < o.top_p * total) cum += p[n++];
    keep = std::max<int64_t>(n, 1);
    total = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  }
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
  double cum = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += p[i];
    if (u < cum) return order[i];
  }
  return order[keep - 1];
}

bool is_stop_token(const GenerationOptions& o, int64_t token) {
  return std::find(o.stop_tokens.begin(), o.stop_tokens.end(), token) != o.stop_tokens.end();
}

}  // namespace finequant
