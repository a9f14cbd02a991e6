// Continuous batching over one shared KV cache (docs/DESIGN.md section 11).
//
// The cache has `slots` rows and one length L (the append index of Decoder::step). Row r holds the
// keys and values of the request in slot r at the cache positions key_valid marks; the rest are
// gaps the attention masks. A decode step appends every running row's pending token at L. An
// admitted request is prefilled on its own cache (with the admitted prompts of its length) and its
// prompt's keys/values are copied into its row, ending at L (L grows first when the prompt is
// longer). When L reaches the capacity, every row's live keys move to the front (compaction).
#include "finequant/scheduler.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <unordered_set>

#include "engine/engine_impl.h"
#include "engine/sampling.h"
#include "kernels/backend.h"

namespace finequant {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::None: return "";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::Error: return "error";
  }
  return "";
}

namespace {

struct Request {
  uint64_t id = 0;
  std::vector<int64_t> prompt;
  GenerationOptions options;
  std::mt19937_64 rng;
  int64_t limit = 0;      // new tokens it may make: min(max_new_tokens, max_length - prompt + 1), as generate
  int64_t made = 0;       // new tokens so far
  int64_t pending = -1;   // the last new token, fed back at the next decode step
};

}  // namespace

struct Scheduler::Impl {
  const Engine::Impl& engine;
  const Decoder& decoder;
  int64_t slots = 0, max_length = 0, capacity = 0;
  std::function<void(const TokenEvent&)> on_event;

  // Shared with submit / cancel / poll (any thread).
  mutable std::mutex mutex;
  std::condition_variable work;
  std::deque<std::unique_ptr<Request>> waiting;
  std::unordered_set<uint64_t> live;     // waiting or running
  std::unordered_set<uint64_t> cancels;  // asked since the last step
  std::vector<TokenEvent> events;
  uint64_t next_id = 1;
  int64_t running_count = 0;
  int64_t compactions = 0;

  // The step thread's own state.
  KVCache cache;
  std::vector<std::unique_ptr<Request>> rows;  // per slot; null: free

  Impl(const Engine::Impl& e, const Decoder& d) : engine(e), decoder(d) {}

  // A cache of `B` rows and `cap` positions, zeroed: positions a row never wrote stay finite (the
  // attention multiplies masked values by an exact 0, which a NaN would survive).
  KVCache zeroed_cache(int64_t B, int64_t cap) const {
    const ModelConfig& c = decoder.config();
    KVCache kv;
    kv.B = B;
    kv.capacity = cap;
    const Shape s{B, c.num_kv_heads, cap, c.head_dim};
    for (int64_t i = 0; i < c.num_layers; ++i)
      kv.layers.push_back(LayerKV{Tensor::zeros(DType::F32, s, decoder.backend().device()),
                                  Tensor::zeros(DType::F32, s, decoder.backend().device())});
    kv.key_valid.assign(static_cast<size_t>(B * cap), 0);
    kv.key_position.assign(static_cast<size_t>(B * cap), 0);
    kv.next_position.assign(static_cast<size_t>(B), 0);
    return kv;
  }

  // Row r of a cache's layer tensor [B, KVH, cap, D] as a [1, KVH, cap, D] view.
  static Tensor row_view(Tensor& t, int64_t r) {
    const int64_t per_row = t.dim(1) * t.dim(2) * t.dim(3);
    return Tensor::borrow(t.data<float>() + r * per_row, DType::F32, {1, t.dim(1), t.dim(2), t.dim(3)}, nullptr,
                          t.device());
  }
  // Positions [from, from + n) of row `src_row` of `src` into positions [to, to + n) of row `dst_row`.
  static void copy_keys(const ExecContext& ctx, KVCache& src, int64_t src_row, int64_t from, KVCache& dst,
                        int64_t dst_row, int64_t to, int64_t n) {
    for (size_t l = 0; l < src.layers.size(); ++l) {
      const Tensor& sk = src.layers[l].k;
      const int64_t KVH = sk.dim(1), cap = sk.dim(2), D = sk.dim(3);
      const int64_t offset = (src_row * KVH * cap + from) * D;
      const kernels::HeadView k{sk.data<float>() + offset, KVH * cap * D, cap * D, D};
      const kernels::HeadView v{src.layers[l].v.data<float>() + offset, KVH * cap * D, cap * D, D};
      Tensor dk = row_view(dst.layers[l].k, dst_row), dv = row_view(dst.layers[l].v, dst_row);
      ctx.backend->kv_append(ctx, k, v, dk, dv, to, n);
    }
  }

  void emit(TokenEvent e) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (e.finish != FinishReason::None) live.erase(e.request);
      if (!on_event) {
        events.push_back(std::move(e));
        return;
      }
    }
    on_event(e);
  }

  // Records token `t` for the request in slot r; frees the slot when the request is done.
  void take_token(int64_t r, int64_t t) {
    Request& q = *rows[r];
    ++q.made;
    q.pending = t;
    FinishReason finish = FinishReason::None;
    if (is_stop_token(q.options, t)) finish = FinishReason::Stop;
    else if (q.made >= q.limit) finish = FinishReason::Length;
    if (q.options.on_token) q.options.on_token(0, t);
    emit(TokenEvent{q.id, t, finish, {}});
    if (finish != FinishReason::None) release(r);
  }

  void release(int64_t r) {
    rows[r].reset();
    std::lock_guard<std::mutex> lock(mutex);
    --running_count;
  }

  // Moves every row's live keys to the front of a fresh cache.
  void compact(const ExecContext& ctx) {
    KVCache fresh = zeroed_cache(slots, capacity);
    int64_t length = 0;
    std::vector<int64_t> live(static_cast<size_t>(slots), 0);  // keys kept per row
    for (int64_t r = 0; r < slots; ++r) {
      fresh.next_position[r] = cache.next_position[r];
      if (!rows[r]) continue;
      const uint8_t* valid = cache.key_valid.data() + r * capacity;
      int64_t n = 0;
      for (int64_t j = 0; j < cache.length;) {  // runs of live keys
        if (!valid[j]) {
          ++j;
          continue;
        }
        int64_t end = j;
        while (end < cache.length && valid[end]) ++end;
        copy_keys(ctx, cache, r, j, fresh, r, n, end - j);
        std::copy(cache.key_position.begin() + r * capacity + j, cache.key_position.begin() + r * capacity + end,
                  fresh.key_position.begin() + r * capacity + n);
        n += end - j;
        j = end;
      }
      std::fill(fresh.key_valid.begin() + r * capacity, fresh.key_valid.begin() + r * capacity + n, 1);
      live[r] = n;
      length = std::max(length, n);
    }
    // Gaps after a row's keys carry its next position: positions never decrease along a row (as
    // Decoder::step keeps them for padding).
    for (int64_t r = 0; r < slots; ++r)
      std::fill(fresh.key_position.begin() + r * capacity + live[r], fresh.key_position.begin() + r * capacity + length,
                fresh.next_position[r]);
    fresh.length = length;
    cache = std::move(fresh);
    std::lock_guard<std::mutex> lock(mutex);
    ++compactions;
  }

  void prefill(const ExecContext& ctx, const std::vector<int64_t>& admitted) {
    const int64_t k = static_cast<int64_t>(admitted.size());
    int64_t T = 0;
    for (int64_t r : admitted) T = std::max<int64_t>(T, rows[r]->prompt.size());
    std::vector<int64_t> ids(static_cast<size_t>(k * T), 0);
    std::vector<uint8_t> mask(static_cast<size_t>(k * T), 0);
    for (int64_t i = 0; i < k; ++i) {  // right padding: each prompt's keys at [0, P)
      const std::vector<int64_t>& p = rows[admitted[i]]->prompt;
      std::copy(p.begin(), p.end(), ids.begin() + i * T);
      std::fill(mask.begin() + i * T, mask.begin() + i * T + p.size(), 1);
    }
    KVCache own = decoder.new_cache(k, T);
    const Tensor logits = host_logits(decoder.backend(), ctx, decoder.step(ctx, ids.data(), mask.data(), k, T, own, false));
    // The prompts end at L, so that their next token lands right after them.
    if (cache.length < T) {
      for (int64_t r = 0; r < slots; ++r) {
        std::fill(cache.key_valid.begin() + r * capacity + cache.length, cache.key_valid.begin() + r * capacity + T, 0);
        std::fill(cache.key_position.begin() + r * capacity + cache.length, cache.key_position.begin() + r * capacity + T,
                  cache.next_position[r]);
      }
      cache.length = T;
    }
    const int64_t L = cache.length, V = decoder.config().vocab_size;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t r = admitted[i], P = static_cast<int64_t>(rows[r]->prompt.size());
      copy_keys(ctx, own, i, 0, cache, r, L - P, P);
      uint8_t* valid = cache.key_valid.data() + r * capacity;
      std::fill(valid, valid + capacity, 0);
      std::fill(valid + L - P, valid + L, 1);
      // The gap before the prompt: position 0, so that positions never decrease along the row.
      int64_t* position = cache.key_position.data() + r * capacity;
      std::fill(position, position + capacity, 0);
      for (int64_t j = 0; j < P; ++j) position[L - P + j] = j;
      cache.next_position[r] = P;
    }
    decoder.backend().finish(ctx);
    for (int64_t i = 0; i < k; ++i) {
      Request& q = *rows[admitted[i]];
      take_token(admitted[i], choose_token(logits.data<float>() + i * V, V, q.options, q.rng));
    }
  }

  void decode(const ExecContext& ctx) {
    int64_t B = 0;  // rows up to the last running one: the step's batch
    for (int64_t r = 0; r < slots; ++r)
      if (rows[r]) B = r + 1;
    if (B == 0) return;
    if (cache.length == capacity) compact(ctx);
    FQ_CHECK(cache.length < capacity, ErrorKind::Runtime, "scheduler: the KV cache is full after compaction");
    std::vector<int64_t> ids(static_cast<size_t>(B), 0);
    std::vector<uint8_t> mask(static_cast<size_t>(B), 0);
    for (int64_t r = 0; r < B; ++r)
      if (rows[r]) {
        ids[r] = rows[r]->pending;
        mask[r] = 1;
      }
    // The first B rows of the shared cache, viewed in place (rows are contiguous in [slots, ...]).
    KVCache view;
    view.B = B;
    view.capacity = capacity;
    view.length = cache.length;
    for (LayerKV& kv : cache.layers)
      view.layers.push_back(LayerKV{
          Tensor::borrow(kv.k.raw(), DType::F32, {B, kv.k.dim(1), capacity, kv.k.dim(3)}, nullptr, kv.k.device()),
          Tensor::borrow(kv.v.raw(), DType::F32, {B, kv.v.dim(1), capacity, kv.v.dim(3)}, nullptr, kv.v.device())});
    view.key_valid.assign(cache.key_valid.begin(), cache.key_valid.begin() + B * capacity);
    view.key_position.assign(cache.key_position.begin(), cache.key_position.begin() + B * capacity);
    view.next_position.assign(cache.next_position.begin(), cache.next_position.begin() + B);
    const Tensor logits = host_logits(decoder.backend(), ctx, decoder.step(ctx, ids.data(), mask.data(), B, 1, view, false));
    std::copy(view.key_valid.begin(), view.key_valid.end(), cache.key_valid.begin());
    std::copy(view.key_position.begin(), view.key_position.end(), cache.key_position.begin());
    std::copy(view.next_position.begin(), view.next_position.end(), cache.next_position.begin());
    for (int64_t r = B; r < slots; ++r) {
      cache.key_valid[r * capacity + cache.length] = 0;
      cache.key_position[r * capacity + cache.length] = cache.next_position[r];
    }
    cache.length += 1;
    const int64_t V = decoder.config().vocab_size;
    for (int64_t r = 0; r < B; ++r)
      if (rows[r]) take_token(r, choose_token(logits.data<float>() + r * V, V, rows[r]->options, rows[r]->rng));
  }

  // A failed step leaves the cache in an unknown state: every running request ends with the error.
  void fail_all(const std::string& message) {
    for (int64_t r = 0; r < slots; ++r)
      if (rows[r]) {
        emit(TokenEvent{rows[r]->id, -1, FinishReason::Error, message});
        release(r);
      }
    cache = zeroed_cache(slots, capacity);
  }
};

Scheduler::Scheduler(const Engine& engine, SchedulerOptions options, std::function<void(const TokenEvent&)> on_event) {
  const Model& model = *engine.impl_->model;
  FQ_CHECK(model.is_decoder(), ErrorKind::Unsupported,
           "the scheduler needs a decoder model (gpt2, llama), this is '" + engine.architecture() + "'");
  const int64_t max_positions = model.config().max_positions;
  FQ_CHECK_ARG(options.slots >= 1, "slots must be >= 1, got " + std::to_string(options.slots));
  FQ_CHECK_ARG(options.max_length >= 0 && options.max_length <= max_positions,
               "max_length must be in [1, " + std::to_string(max_positions) + "] (0: the model's max_positions), got " +
                   std::to_string(options.max_length));
  impl_ = std::make_unique<Impl>(*engine.impl_, static_cast<const Decoder&>(model));
  impl_->slots = options.slots;
  impl_->max_length = options.max_length > 0 ? options.max_length : max_positions;
  impl_->capacity = options.cache_length > 0 ? options.cache_length : impl_->max_length + impl_->max_length / 2;
  FQ_CHECK_ARG(impl_->capacity >= impl_->max_length, "cache_length " + std::to_string(options.cache_length) +
                                                         " is shorter than max_length " +
                                                         std::to_string(impl_->max_length));
  impl_->on_event = std::move(on_event);
  impl_->cache = impl_->zeroed_cache(impl_->slots, impl_->capacity);
  impl_->rows.resize(static_cast<size_t>(impl_->slots));
}

Scheduler::~Scheduler() = default;

uint64_t Scheduler::submit(std::vector<int64_t> prompt, GenerationOptions options) {
  const int64_t V = impl_->decoder.config().vocab_size, P = static_cast<int64_t>(prompt.size());
  check_sampling_options(options, V);
  FQ_CHECK_ARG(P > 0, "the prompt is empty");
  FQ_CHECK_ARG(P <= impl_->max_length, "the prompt has " + std::to_string(P) + " tokens, more than max_length " +
                                           std::to_string(impl_->max_length));
  for (int64_t i = 0; i < P; ++i)
    FQ_CHECK_ARG(prompt[i] >= 0 && prompt[i] < V, "prompt[" + std::to_string(i) + "] = " + std::to_string(prompt[i]) +
                                                      " is outside [0, " + std::to_string(V) + ")");
  auto q = std::make_unique<Request>();
  q->prompt = std::move(prompt);
  q->rng.seed(options.seed);
  q->limit = std::min(options.max_new_tokens, impl_->max_length - P + 1);
  q->options = std::move(options);
  std::lock_guard<std::mutex> lock(impl_->mutex);
  const uint64_t id = q->id = impl_->next_id++;
  impl_->live.insert(id);
  impl_->waiting.push_back(std::move(q));
  impl_->work.notify_all();
  return id;
}

bool Scheduler::cancel(uint64_t request) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (!impl_->live.count(request)) return false;
  impl_->cancels.insert(request);
  impl_->work.notify_all();
  return true;
}

bool Scheduler::step() {
  Impl& s = *impl_;
  std::unordered_set<uint64_t> cancels;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    cancels.swap(s.cancels);
  }
  for (int64_t r = 0; r < s.slots; ++r)
    if (s.rows[r] && cancels.count(s.rows[r]->id)) {
      s.emit(TokenEvent{s.rows[r]->id, -1, FinishReason::Cancelled, {}});
      s.release(r);
    }
  std::vector<std::unique_ptr<Request>> arrived, dropped;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    for (auto it = s.waiting.begin(); it != s.waiting.end();) {
      if (cancels.count((*it)->id)) {
        dropped.push_back(std::move(*it));
        it = s.waiting.erase(it);
      } else {
        ++it;
      }
    }
    for (int64_t free_slots = s.slots - s.running_count; free_slots > 0 && !s.waiting.empty(); --free_slots) {
      arrived.push_back(std::move(s.waiting.front()));
      s.waiting.pop_front();
    }
  }
  for (auto& q : dropped) s.emit(TokenEvent{q->id, -1, FinishReason::Cancelled, {}});
  std::vector<int64_t> admitted;
  for (auto& q : arrived) {
    if (q->limit <= 0) {  // max_new_tokens 0: nothing to compute
      s.emit(TokenEvent{q->id, -1, FinishReason::Length, {}});
      continue;
    }
    const int64_t r = std::find(s.rows.begin(), s.rows.end(), nullptr) - s.rows.begin();  // lowest free slot
    s.rows[r] = std::move(q);
    admitted.push_back(r);
    std::lock_guard<std::mutex> lock(s.mutex);
    ++s.running_count;
  }
  const bool busy = !arrived.empty() || !dropped.empty() || std::any_of(s.rows.begin(), s.rows.end(), [](const auto& q) { return q != nullptr; });
  if (!busy) return false;
  const kernels::Backend& backend = s.decoder.backend();
  const std::shared_ptr<ThreadPool> pool = s.engine.current_pool();
  const ExecContext ctx = backend.context(*pool);
  try {
    // Prompts of one length prefill together: padding would change a shorter prompt's kernels (the
    // attention's query blocking) and so its bits, and its tokens would no longer be generate's.
    std::stable_sort(admitted.begin(), admitted.end(),
                     [&](int64_t a, int64_t b) { return s.rows[a]->prompt.size() < s.rows[b]->prompt.size(); });
    for (size_t i = 0; i < admitted.size();) {
      size_t end = i;
      while (end < admitted.size() && s.rows[admitted[end]]->prompt.size() == s.rows[admitted[i]]->prompt.size()) ++end;
      s.prefill(ctx, std::vector<int64_t>(admitted.begin() + i, admitted.begin() + end));
      i = end;
    }
    s.decode(ctx);
  } catch (const std::exception& e) {
    s.fail_all(e.what());
  }
  return true;
}

std::vector<TokenEvent> Scheduler::poll() {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  std::vector<TokenEvent> out;
  out.swap(impl_->events);
  return out;
}

bool Scheduler::wait_for_work(double seconds) {
  std::unique_lock<std::mutex> lock(impl_->mutex);
  return impl_->work.wait_for(lock, std::chrono::duration<double>(seconds), [&] {
    return !impl_->waiting.empty() || impl_->running_count > 0 || !impl_->cancels.empty();
  });
}

void Scheduler::run_until_idle() {
  while (step()) {
  }
}

int64_t Scheduler::slots() const { return impl_->slots; }
int64_t Scheduler::max_length() const { return impl_->max_length; }
int64_t Scheduler::cache_length() const { return impl_->capacity; }
int64_t Scheduler::running() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->running_count;
}
int64_t Scheduler::waiting() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return static_cast<int64_t>(impl_->waiting.size());
}
int64_t Scheduler::compactions() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->compactions;
}

}  // namespace finequant
