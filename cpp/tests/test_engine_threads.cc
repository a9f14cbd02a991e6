// One Engine shared by 8 threads (docs/DESIGN.md, Reliability): mixed forward / generate calls of
// different shapes, fp32 and W8A8, give bit for bit the results of the same calls made serially.
// Also the program `make test-tsan` runs under ThreadSanitizer.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "check.h"
#include "finequant/engine.h"
#include "tiny_model.h"

using namespace finequant;

namespace {

struct Call {
  Tensor ids, mask;
  bool generate = false;
  GenerationOptions options;
};

struct Result {
  std::vector<float> logits;
  std::vector<std::vector<int64_t>> tokens;
  bool operator==(const Result& o) const { return logits == o.logits && tokens == o.tokens; }
};

std::vector<Call> make_calls(int64_t vocab) {
  std::mt19937 rng(3);
  std::vector<Call> calls;
  for (int i = 0; i < 12; ++i) {
    const int64_t B = 1 + i % 3, T = 1 + (5 * i) % 11;
    Call c;
    c.ids = Tensor::empty(DType::I64, {B, T});
    c.mask = Tensor::empty(DType::I64, {B, T});
    for (int64_t k = 0; k < B * T; ++k) {
      c.ids.data<int64_t>()[k] = static_cast<int64_t>(rng() % vocab);
      c.mask.data<int64_t>()[k] = (k % T) < std::min<int64_t>(i % 2, T - 1) ? 0 : 1;  // left padding on odd calls
    }
    c.generate = i % 2 == 0;
    c.options.max_new_tokens = 3 + i % 4;
    if (i % 4 == 2) {  // sampled, seeded
      c.options.temperature = 0.8f;
      c.options.top_k = 5;
      c.options.seed = static_cast<uint64_t>(i);
    }
    calls.push_back(std::move(c));
  }
  return calls;
}

Result run(const Engine& e, const Call& c) {
  Result r;
  if (c.generate) {
    r.tokens = e.generate(c.ids, &c.mask, c.options);
  } else {
    const Tensor out = e.forward(c.ids, &c.mask);
    r.logits.assign(out.data<float>(), out.data<float>() + out.numel());
  }
  return r;
}

void check_shared_engine(bool int8) {
  fqtest::TinyLlama m;
  m.int8 = int8;
  const std::string path = "/tmp/fq_test_engine_threads_" + std::to_string(getpid()) + ".safetensors";
  fqtest::write_tiny_llama(path, m);
  EngineOptions options;
  options.threads = 2;
  const std::unique_ptr<Engine> engine = Engine::load(path, options);
  ::unlink(path.c_str());
  const std::vector<Call> calls = make_calls(m.vocab);
  std::vector<Result> serial;
  for (const Call& c : calls) serial.push_back(run(*engine, c));
  CHECK(!serial[0].tokens.empty() && !serial[1].logits.empty());

  constexpr int kThreads = 8, kRounds = 3;
  std::atomic<int> mismatches{0}, errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r)
        for (size_t k = 0; k < calls.size(); ++k) {
          const size_t i = (k + static_cast<size_t>(t) * 5) % calls.size();  // threads in different orders
          try {
            if (!(run(*engine, calls[i]) == serial[i])) ++mismatches;
          } catch (const std::exception&) {
            ++errors;
          }
        }
    });
  for (auto& th : threads) th.join();
  CHECK_EQ(mismatches.load(), 0);
  CHECK_EQ(errors.load(), 0);
}

}  // namespace

TEST(shared_fp32_engine_matches_serial_calls) { check_shared_engine(false); }
TEST(shared_w8a8_engine_matches_serial_calls) { check_shared_engine(true); }

// set_threads while other threads run calls: a call finishes on the pool it started with.
TEST(set_threads_during_calls) {
  fqtest::TinyLlama m;
  const std::string path = "/tmp/fq_test_engine_threads_set_" + std::to_string(getpid()) + ".safetensors";
  fqtest::write_tiny_llama(path, m);
  const std::unique_ptr<Engine> engine = Engine::load(path, EngineOptions{2});
  ::unlink(path.c_str());
  const std::vector<Call> calls = make_calls(m.vocab);
  const Result want = run(*engine, calls[3]);
  std::atomic<bool> stop{false};
  std::atomic<int> mismatches{0};
  std::thread caller([&] {
    while (!stop)
      if (!(run(*engine, calls[3]) == want)) ++mismatches;
  });
  for (int i = 0; i < 20; ++i) engine->set_threads(1 + i % 3);
  stop = true;
  caller.join();
  CHECK_EQ(mismatches.load(), 0);
}

int main() { return fqtest::run_all(); }
