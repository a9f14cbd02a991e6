// The continuous-batching scheduler: requests joining at different steps, sharing a small cache
// that must be compacted, give exactly the tokens Engine::generate gives each of them alone
// (greedy and seeded sampling); stop tokens, cancellation, max_length and bad requests.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "core/thread_pool.h"
#include "finequant/engine.h"
#include "finequant/scheduler.h"
#include "kernels/backend.h"
#include "tiny_model.h"

using namespace finequant;

namespace {

constexpr int64_t kVocab = 61, kMaxPos = 40;

// A random fp32 Llama model file (GQA, untied head).
std::string write_tiny_llama() {
  fqtest::TinyLlama m;
  m.vocab = kVocab;
  m.hidden = 32;
  m.inter = 48;
  m.max_positions = kMaxPos;
  return fqtest::write_tiny_llama("/tmp/fq_test_scheduler_" + std::to_string(getpid()) + ".safetensors", m);
}

const Engine& engine() {
  static const std::string path = write_tiny_llama();
  static const std::unique_ptr<Engine> e = [] {
    auto eng = Engine::load(path, EngineOptions{1});
    ::unlink(path.c_str());  // the mapping stays valid
    return eng;
  }();
  return *e;
}

std::vector<int64_t> random_prompt(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (auto& t : p) t = std::uniform_int_distribution<int64_t>(0, kVocab - 1)(rng);
  return p;
}

std::vector<int64_t> alone(const std::vector<int64_t>& prompt, const GenerationOptions& o) {
  Tensor ids = Tensor::empty(DType::I64, {1, static_cast<int64_t>(prompt.size())});
  std::copy(prompt.begin(), prompt.end(), ids.data<int64_t>());
  return engine().generate(ids, nullptr, o)[0];
}

struct Outcome {
  std::vector<int64_t> tokens;
  FinishReason finish = FinishReason::None;
  int finishes = 0;
};

// Collects a scheduler's events per request id.
void collect(Scheduler& s, std::map<uint64_t, Outcome>& out) {
  for (const TokenEvent& e : s.poll()) {
    Outcome& o = out[e.request];
    CHECK(o.finishes == 0);  // nothing after a request's last event
    if (e.token >= 0) o.tokens.push_back(e.token);
    if (e.finish != FinishReason::None) {
      o.finish = e.finish;
      ++o.finishes;
    }
  }
}

// Requests with prompts of 1..30 tokens arriving over the first steps, three slots, a cache barely
// longer than max_length: every request's tokens are generate's, whatever joined beside it.
void check_batched_matches_alone(bool sampled) {
  Scheduler s(engine(), SchedulerOptions{3, 0, kMaxPos + 4});
  std::vector<std::vector<int64_t>> prompts;
  std::vector<GenerationOptions> options;
  const int64_t lengths[] = {5, 1, 17, 9, 30, 3, 12, 24};
  for (int i = 0; i < 8; ++i) {
    prompts.push_back(random_prompt(lengths[i], 100 + i));
    GenerationOptions o;
    o.max_new_tokens = 4 + 3 * i;  // the 30-token prompt reaches max_length (11 tokens, not 16)
    if (sampled) {
      o.temperature = 0.7f + 0.1f * (i % 3);
      o.top_k = i % 2 ? 0 : 20;
      o.top_p = i % 3 ? 1.f : 0.9f;
      o.seed = 1000 + i;
    }
    options.push_back(o);
  }
  std::map<uint64_t, Outcome> out;
  std::vector<uint64_t> ids;
  for (int step = 0; ids.size() < prompts.size() || s.running() + s.waiting() > 0; ++step) {
    if (ids.size() < prompts.size() && step % 2 == 0) {  // one new request every other step
      ids.push_back(s.submit(prompts[ids.size()], options[ids.size()]));
      if (ids.size() == 2) ids.push_back(s.submit(prompts[2], options[2]));  // two join at once
    }
    s.step();
    collect(s, out);
    CHECK(s.running() <= 3);
  }
  CHECK(s.compactions() > 0);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int64_t> ref = alone(prompts[i], options[i]);
    const Outcome& o = out[ids[i]];
    if (o.tokens != ref) ::fqtest::report(__FILE__, __LINE__, "request " + std::to_string(i) + " differs from generate");
    CHECK_EQ(o.finishes, 1);
    CHECK(o.finish == FinishReason::Length);
  }
  CHECK_EQ(out[ids[4]].tokens.size(), size_t{kMaxPos - 30 + 1});
}

}  // namespace

// A row's keys spread over a shared cache with masked slots between them give bit for bit the
// attention output of the same keys packed at the front: the reason a request's tokens in a batch
// are generate's (the softmax denominator sums the valid keys in key order, DESIGN section 11).
TEST(attention_ignores_masked_slots_bit_for_bit) {
  const kernels::Backend& be = kernels::backend_for(Device::cpu());
  const ExecContext ctx = be.context(ThreadPool::shared(1));
  std::mt19937 rng(3);
  const int64_t D = 64, H = 8, keys = 150, cap = 4 * keys;
  Tensor q = ::fqtest::random_tensor({H, D}, rng);
  Tensor kv = ::fqtest::random_tensor({2, keys, D}, rng, 0.f, 2.f);
  for (int gaps : {0, 1, 3, -1}) {  // masked slots before each key (-1: 0 to 3 at random)
    Tensor kc = ::fqtest::random_tensor({cap, D}, rng, 0.f, 5.f), vc = ::fqtest::random_tensor({cap, D}, rng);
    std::vector<uint8_t> valid(cap, 0);
    int64_t slot = 0;
    for (int64_t j = 0; j < keys; ++j) {
      slot += gaps >= 0 ? gaps : std::uniform_int_distribution<int>(0, 3)(rng);
      std::copy(kv.data<float>() + j * D, kv.data<float>() + (j + 1) * D, kc.data<float>() + slot * D);
      std::copy(kv.data<float>() + (keys + j) * D, kv.data<float>() + (keys + j + 1) * D, vc.data<float>() + slot * D);
      valid[slot++] = 1;
    }
    Tensor out = Tensor::zeros(DType::F32, {1, H * D});
    kernels::AttentionArgs a;
    a.q = kernels::HeadView{q.data<float>(), H * D, D, D};
    a.k = kernels::HeadView{kc.data<float>(), cap * D, 0, D};
    a.v = kernels::HeadView{vc.data<float>(), cap * D, 0, D};
    a.out = out.data<float>();
    a.B = 1, a.H = H, a.KVH = 1, a.Tq = 1, a.Tk = slot, a.D = D;
    a.key_valid = valid.data();
    a.key_valid_stride = cap;
    a.causal_offset = slot - 1;
    a.scale = 0.125f;
    be.attention(ctx, a);
    static std::vector<float> packed;
    if (gaps == 0) packed.assign(out.data<float>(), out.data<float>() + H * D);
    else CHECK(std::memcmp(packed.data(), out.data<float>(), H * D * sizeof(float)) == 0);
  }
}

TEST(greedy_requests_match_generate_alone) { check_batched_matches_alone(false); }

TEST(sampled_requests_match_generate_alone_with_their_seeds) { check_batched_matches_alone(true); }

TEST(stop_token_ends_a_request_and_frees_its_slot) {
  const std::vector<int64_t> prompt = random_prompt(6, 5);
  GenerationOptions o;
  o.max_new_tokens = 10;
  const std::vector<int64_t> full = alone(prompt, o);
  o.stop_tokens = {full[2]};
  const std::vector<int64_t> ref = alone(prompt, o);
  Scheduler s(engine(), SchedulerOptions{1});
  std::map<uint64_t, Outcome> out;
  const uint64_t a = s.submit(prompt, o), b = s.submit(prompt, o);  // b waits for a's slot
  s.run_until_idle();
  collect(s, out);
  CHECK(out[a].tokens == ref && out[b].tokens == ref);
  CHECK(out[a].finish == FinishReason::Stop && out[a].tokens.back() == full[2]);
}

TEST(cancel_frees_the_slot_for_a_waiting_request) {
  Scheduler s(engine(), SchedulerOptions{1});
  GenerationOptions o;
  o.max_new_tokens = 20;
  const std::vector<int64_t> prompt = random_prompt(4, 9);
  const uint64_t a = s.submit(prompt, o), b = s.submit(prompt, o);
  s.step();  // a: prefill (its first token) and one decode step
  s.step();
  CHECK_EQ(s.running(), int64_t{1});
  CHECK_EQ(s.waiting(), int64_t{1});
  CHECK(s.cancel(a));
  s.step();  // a leaves, b takes its slot
  CHECK_EQ(s.waiting(), int64_t{0});
  CHECK(s.cancel(b));
  s.run_until_idle();
  std::map<uint64_t, Outcome> out;
  collect(s, out);
  CHECK(out[a].finish == FinishReason::Cancelled && out[a].tokens.size() == 3);
  CHECK(out[b].finish == FinishReason::Cancelled && out[b].tokens.size() == 2);
  CHECK(!s.cancel(a) && !s.cancel(12345));  // finished or unknown
  CHECK_EQ(s.running(), int64_t{0});
  // A request cancelled while waiting never runs.
  const uint64_t c = s.submit(prompt, o);
  CHECK(s.cancel(c));
  s.run_until_idle();
  collect(s, out);
  CHECK(out[c].finish == FinishReason::Cancelled && out[c].tokens.empty());
}

TEST(zero_new_tokens_finishes_without_tokens) {
  Scheduler s(engine());
  GenerationOptions o;
  o.max_new_tokens = 0;
  const uint64_t a = s.submit(random_prompt(3, 1), o);
  s.run_until_idle();
  std::map<uint64_t, Outcome> out;
  collect(s, out);
  CHECK(out[a].finish == FinishReason::Length && out[a].tokens.empty());
}

TEST(events_go_to_the_callback_when_one_is_given) {
  std::vector<TokenEvent> seen;
  Scheduler s(engine(), SchedulerOptions{2}, [&](const TokenEvent& e) { seen.push_back(e); });
  GenerationOptions o;
  o.max_new_tokens = 5;
  const std::vector<int64_t> prompt = random_prompt(7, 3);
  s.submit(prompt, o);
  s.run_until_idle();
  CHECK(s.poll().empty());
  std::vector<int64_t> tokens;
  for (const TokenEvent& e : seen) tokens.push_back(e.token);
  CHECK(tokens == alone(prompt, o));
  CHECK(seen.back().finish == FinishReason::Length);
}

TEST(bad_requests_and_options_are_refused) {
  Scheduler s(engine(), SchedulerOptions{2, 16});
  GenerationOptions o;
  CHECK_THROWS_KIND_MSG(s.submit({}, o), ErrorKind::InvalidArgument, "empty");
  CHECK_THROWS_KIND_MSG(s.submit({1, kVocab}, o), ErrorKind::InvalidArgument, "outside");
  CHECK_THROWS_KIND_MSG(s.submit(random_prompt(17, 1), o), ErrorKind::InvalidArgument, "max_length 16");
  o.top_p = 0.f;
  CHECK_THROWS_KIND_MSG(s.submit({1}, o), ErrorKind::InvalidArgument, "top_p");
  CHECK_EQ(s.waiting(), int64_t{0});
  CHECK_THROWS_KIND_MSG(Scheduler(engine(), SchedulerOptions{0}), ErrorKind::InvalidArgument, "slots");
  CHECK_THROWS_KIND_MSG(Scheduler(engine(), SchedulerOptions{1, kMaxPos + 1}), ErrorKind::InvalidArgument, "max_length");
  CHECK_THROWS_KIND_MSG(Scheduler(engine(), SchedulerOptions{1, 20, 10}), ErrorKind::InvalidArgument, "cache_length");
}

// The server's pattern (and make test-tsan's): one driver thread steps while 4 client threads submit,
// poll and cancel. Every request that was not cancelled gets generate's tokens; cancelled ones end once.
TEST(clients_on_other_threads_while_a_driver_steps) {
  Scheduler s(engine(), SchedulerOptions{3, 0, kMaxPos + 4});
  constexpr int kClients = 4, kEach = 3;
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::map<uint64_t, Outcome> out;
  std::thread driver([&] {
    while (!stop.load()) {
      if (!s.wait_for_work(0.01)) continue;
      s.step();
    }
  });
  std::vector<std::thread> clients;
  std::vector<std::vector<std::pair<uint64_t, int>>> submitted(kClients);  // (id, request index)
  std::vector<uint64_t> cancelled;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (int k = 0; k < kEach; ++k) {
        const int i = c * kEach + k;
        GenerationOptions o;
        o.max_new_tokens = 3 + i % 5;
        const uint64_t id = s.submit(random_prompt(1 + (7 * i) % 20, 200 + i), o);
        submitted[c].emplace_back(id, i);
        if (i % 4 == 3 && s.cancel(id)) {
          std::lock_guard<std::mutex> lock(mu);
          cancelled.push_back(id);
        }
        std::lock_guard<std::mutex> lock(mu);
        collect(s, out);
      }
    });
  }
  for (std::thread& t : clients) t.join();
  for (int spins = 0; spins < 20000; ++spins) {  // until every request has finished (at most ~20 s)
    {
      std::lock_guard<std::mutex> lock(mu);
      collect(s, out);
      int finished = 0;
      for (const auto& [id, o] : out) finished += o.finishes;
      if (finished == kClients * kEach) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  stop = true;
  driver.join();
  for (int c = 0; c < kClients; ++c) {
    for (const auto& [id, i] : submitted[c]) {
      const Outcome& o = out[id];
      CHECK_EQ(o.finishes, 1);
      if (std::find(cancelled.begin(), cancelled.end(), id) != cancelled.end()) {
        CHECK(o.finish == FinishReason::Cancelled);
        continue;
      }
      GenerationOptions ref;
      ref.max_new_tokens = 3 + i % 5;
      if (o.tokens != alone(random_prompt(1 + (7 * i) % 20, 200 + i), ref))
        ::fqtest::report(__FILE__, __LINE__, "request " + std::to_string(i) + " differs from generate");
    }
  }
  CHECK_EQ(s.running() + s.waiting(), int64_t{0});
}

int main() { return RUN_ALL_TESTS(); }
