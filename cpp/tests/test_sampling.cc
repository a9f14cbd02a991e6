// Token choice (engine/sampling.h): the draws follow softmax(logits / temperature) restricted by
// top_k and then top_p, as a reference that sorts the whole vocabulary computes; the argmax at
// temperature 0; -inf logits and suppressed tokens are never drawn; ties are ordered by id.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "check.h"
#include "engine/sampling.h"

using namespace finequant;

namespace {

// The probability of each token: every id sorted (stable, by logit), then the filters in order.
std::vector<double> reference(const std::vector<float>& logits, const GenerationOptions& o) {
  const int64_t V = static_cast<int64_t>(logits.size());
  std::vector<int64_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  int64_t keep = o.top_k > 0 ? std::min<int64_t>(o.top_k, V) : V;
  std::vector<double> p(static_cast<size_t>(V), 0.0);
  double total = 0.0;
  for (int64_t i = 0; i < keep; ++i)
    total += p[order[i]] = std::exp((static_cast<double>(logits[order[i]]) - logits[order[0]]) / o.temperature);
  if (o.top_p < 1.f) {
    double cum = 0.0;
    int64_t n = 0;
    while (n < keep && cum < o.top_p * total) cum += p[order[n++]];
    for (int64_t i = std::max<int64_t>(n, 1); i < keep; ++i) p[order[i]] = 0.0;
    keep = std::max<int64_t>(n, 1);
  }
  total = 0.0;
  for (double v : p) total += v;
  for (double& v : p) v /= total;
  return p;
}

// Draws `n` tokens and checks every frequency against the reference within 5 standard deviations
// (and tokens of probability 0 never drawn).
void check_distribution(const std::vector<float>& logits, const GenerationOptions& o, int n, uint64_t seed) {
  const int64_t V = static_cast<int64_t>(logits.size());
  const std::vector<double> p = reference(logits, o);
  std::vector<int> hits(static_cast<size_t>(V), 0);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    const int64_t t = choose_token(logits.data(), V, o, rng);
    CHECK(t >= 0 && t < V);
    if (t >= 0 && t < V) ++hits[t];
  }
  int64_t bad = 0;
  for (int64_t t = 0; t < V; ++t) {
    const double mean = n * p[t], sd = std::sqrt(n * p[t] * (1 - p[t]));
    if (p[t] == 0.0 ? hits[t] != 0 : std::abs(hits[t] - mean) > 5 * sd + 1) {
      if (bad++ < 3)
        std::printf("  V=%lld top_k=%lld top_p=%g: token %lld drawn %d times, expected %.1f\n", (long long)V,
                    (long long)o.top_k, o.top_p, (long long)t, hits[t], mean);
    }
  }
  CHECK_EQ(bad, 0);
}

std::vector<float> random_logits(int64_t V, uint64_t seed, float spread) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, spread);
  std::vector<float> l(static_cast<size_t>(V));
  for (float& v : l) v = d(rng);
  return l;
}

}  // namespace

TEST(draws_follow_the_filtered_softmax) {
  for (const auto& [k, p] : std::vector<std::pair<int64_t, float>>{{0, 1.f}, {10, 1.f}, {0, 0.9f}, {25, 0.7f}, {1, 1.f}}) {
    GenerationOptions o;
    o.temperature = 0.8f;
    o.top_k = k;
    o.top_p = p;
    check_distribution(random_logits(61, 3, 2.f), o, 60000, 11);
  }
}

TEST(large_vocabulary_beyond_the_first_sorted_candidates) {
  // Flat logits: top_p 0.95 reaches thousands of tokens, past the first candidates sorted.
  GenerationOptions o;
  o.temperature = 1.f;
  o.top_p = 0.95f;
  check_distribution(random_logits(5000, 5, 0.3f), o, 5000, 12);
  o.top_p = 1.f;
  o.top_k = 700;
  check_distribution(random_logits(5000, 6, 1.f), o, 5000, 13);
}

TEST(greedy_masked_and_ties) {
  std::vector<float> l = {1.f, 3.f, -std::numeric_limits<float>::infinity(), 3.f, 2.f};
  GenerationOptions o;
  std::mt19937_64 rng(1);
  CHECK_EQ(choose_token(l.data(), 5, o, rng), 1);  // temperature 0: the first largest
  o.temperature = 1.f;
  o.top_k = 1;
  for (int i = 0; i < 100; ++i) CHECK_EQ(choose_token(l.data(), 5, o, rng), 1);  // ties: the lower id first
  o.top_k = 0;
  o.temperature = 50.f;  // nearly flat, but -inf stays impossible
  for (int i = 0; i < 2000; ++i) CHECK(choose_token(l.data(), 5, o, rng) != 2);
}

TEST(suppressed_tokens_are_never_chosen) {
  // As -inf logits: the same distribution over the others, greedy included.
  const std::vector<float> l = random_logits(61, 7, 2.f);
  GenerationOptions o;
  o.suppress_tokens = {static_cast<int64_t>(std::max_element(l.begin(), l.end()) - l.begin()), 0, 60};
  std::vector<float> masked = l;
  for (int64_t t : o.suppress_tokens) masked[t] = -std::numeric_limits<float>::infinity();
  std::mt19937_64 rng(2);
  CHECK_EQ(choose_token(l.data(), 61, o, rng), std::max_element(masked.begin(), masked.end()) - masked.begin());
  for (const auto& [k, p] : std::vector<std::pair<int64_t, float>>{{0, 1.f}, {10, 1.f}, {0, 0.9f}}) {
    o.temperature = 0.8f;
    o.top_k = k;
    o.top_p = p;
    const std::vector<double> want = reference(masked, o);
    std::vector<int> hits(61, 0);
    std::mt19937_64 draws(14);
    const int n = 30000;
    for (int i = 0; i < n; ++i) ++hits[choose_token(l.data(), 61, o, draws)];
    for (int64_t t = 0; t < 61; ++t) {
      const double mean = n * want[t], sd = std::sqrt(n * want[t] * (1 - want[t]));
      CHECK(want[t] == 0.0 ? hits[t] == 0 : std::abs(hits[t] - mean) <= 5 * sd + 1);
    }
  }
  check_sampling_options(o, 61);
  o.suppress_tokens = {61};
  CHECK_THROWS_KIND_MSG(check_sampling_options(o, 61), ErrorKind::InvalidArgument, "61 is outside [0, 61)");
  o.suppress_tokens = {-1};
  CHECK_THROWS_KIND_MSG(check_sampling_options(o, 61), ErrorKind::InvalidArgument, "-1 is outside");
  o.suppress_tokens = {0, 1, 1};
  CHECK_THROWS_KIND_MSG(check_sampling_options(o, 2), ErrorKind::InvalidArgument, "leaves no token");
  check_sampling_options(o, 3);
}

int main() { return RUN_ALL_TESTS(); }
