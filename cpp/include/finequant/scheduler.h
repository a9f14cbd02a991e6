// Continuous batching for decoder models (docs/DESIGN.md section 11): requests share one KV cache of
// a fixed number of slots; new requests join between decode steps and every step advances all
// running requests by one token. A request's tokens are those Engine::generate gives it alone
// (same sampling code, its own random generator seeded with its seed).
//
//   finequant::Scheduler s(*engine, {.slots = 8});
//   uint64_t id = s.submit(prompt_ids, options);   // any thread
//   while (s.step()) for (auto& e : s.poll()) ...   // one driver thread
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "finequant/engine.h"

namespace finequant {

struct SchedulerOptions {
  int64_t slots = 8;         // requests decoded together: rows of the shared KV cache
  int64_t max_length = 0;    // prompt + new tokens of one request; 0: the model's max_positions
  // Positions of the shared cache (>= max_length; 0: 1.5 * max_length). When the cache fills, each
  // row's live keys move left (compaction); a larger cache compacts less often. Memory: slots x
  // cache_length x layers x 2 x kv_heads x head_dim x 4 bytes, allocated (zeroed) up front.
  int64_t cache_length = 0;
};

enum class FinishReason : uint8_t {
  None,       // the request goes on
  Stop,       // it made one of its stop tokens (the last token)
  Length,     // max_new_tokens, or max_length tokens in all
  Cancelled,  // cancel() took it out
  Error,      // the step failed (message in TokenEvent::error); every running request ends so
};
const char* finish_reason_name(FinishReason reason);  // "stop", "length", "cancelled", "error", ""

// One new token of a request, or only its end (token -1: cancelled, failed, or max_new_tokens 0).
struct TokenEvent {
  uint64_t request = 0;
  int64_t token = -1;
  FinishReason finish = FinishReason::None;  // set on the request's last event
  std::string error;
};

class Scheduler {
 public:
  // `engine` must hold a decoder model (gpt2, llama) and outlive the scheduler. on_event: called
  // from step()'s thread for each event; without it, events queue until poll().
  explicit Scheduler(const Engine& engine, SchedulerOptions options = {},
                     std::function<void(const TokenEvent&)> on_event = {});
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Thread-safe. Queues a request (prompt token ids; max_new_tokens, temperature, top_k, top_p,
  // seed and stop_tokens of `options`; on_token, if set, is called with row 0 from step()'s
  // thread) and returns its id (> 0). Throws InvalidArgument for an empty prompt, an id outside the
  // vocabulary, a prompt longer than max_length or bad sampling options.
  uint64_t submit(std::vector<int64_t> prompt, GenerationOptions options);
  // Thread-safe. The request leaves at the next step() (a Cancelled event), freeing its slot.
  // False when the id is not waiting or running.
  bool cancel(uint64_t request);

  // One thread at a time. Admits waiting requests into free slots (one prefill of them all, their
  // keys and values then copied into the shared cache) and runs one decode step over the running
  // requests. Returns whether any request was waiting or running.
  bool step();
  // Thread-safe. The events since the last call, in order.
  std::vector<TokenEvent> poll();
  // Thread-safe. Waits until a request is waiting or running (true) or `seconds` pass (false).
  bool wait_for_work(double seconds);
  // step() until no request is waiting or running (a caller without a driver thread).
  void run_until_idle();

  int64_t slots() const;
  int64_t max_length() const;
  int64_t cache_length() const;
  int64_t running() const;  // requests in a slot
  int64_t waiting() const;  // submitted, not yet admitted
  int64_t compactions() const;  // times the shared cache was compacted

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace finequant
