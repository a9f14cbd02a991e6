#include "core/thread_pool.h"

#include <chrono>
#include <cstdlib>
#include <map>

#include <pthread.h>
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace finequant {

namespace {

constexpr int kGenBits = 20, kCountBits = 22;
constexpr uint64_t kCountMask = (uint64_t{1} << kCountBits) - 1;
constexpr int64_t kMaxTasks = int64_t{1} << kCountBits;

uint64_t pack_state(uint64_t gen, uint64_t count, uint64_t next) {
  return (gen << (2 * kCountBits)) | (count << kCountBits) | next;
}
uint64_t gen_of(uint64_t s) { return s >> (2 * kCountBits); }
uint64_t count_of(uint64_t s) { return (s >> kCountBits) & kCountMask; }
uint64_t next_of(uint64_t s) { return s & kCountMask; }
bool has_work(uint64_t s) { return next_of(s) < count_of(s); }

// Idle-time prefetch: chunks small enough that a worker joins a new job within ~0.1 us.
constexpr uint64_t kIdleChunk = 2048, kIdleChunkBits = 40, kIdleChunkMask = (uint64_t{1} << kIdleChunkBits) - 1;

// How long an idle thread polls before it sleeps: long enough to bridge the gaps between the ops
// of one decode step, short enough to give a busy core back soon (FINEQUANT_SPIN_US overrides).
std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds t{[] {
    const char* env = std::getenv("FINEQUANT_SPIN_US");
    return env ? std::max(0L, std::strtol(env, nullptr, 10)) : 50L;
  }()};
  return t;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Polls `ready` until `deadline` (by default spin_time() from now); true once it holds.
template <class Pred>
bool spin_until(Pred ready, std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::now() + spin_time()) {
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return ready();
  }
}

thread_local bool t_in_task = false;  // this thread is running a pool task (nested work runs inline)

// Counts fork() children: a pool made before the fork sees another epoch in the child.
std::atomic<unsigned> g_fork_epoch{0};
unsigned fork_epoch() {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { g_fork_epoch.fetch_add(1); }); });
  return g_fork_epoch.load();
}

std::atomic<int> g_default_threads{0};

int affinity_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

int env_threads(const char* name) {
  const char* v = std::getenv(name);
  if (!v) return 0;
  const long n = std::strtol(v, nullptr, 10);
  return n > 0 && n < 4096 ? static_cast<int>(n) : 0;
}

}  // namespace

int default_threads() {
  if (const int d = g_default_threads.load()) return d;
  if (const int e = env_threads("FINEQUANT_NUM_THREADS")) return e;
  if (const int e = env_threads("OMP_NUM_THREADS")) return e;
  static const int cpus = affinity_cpus();
  return cpus;
}

void set_default_threads(int threads) { g_default_threads = std::max(0, threads); }

ThreadPool& ThreadPool::shared(int threads) {
  static std::mutex mutex;
  static auto* pools = new std::map<int, ThreadPool*>;  // never destroyed: kernels may run at exit
  const int n = threads > 0 ? threads : default_threads();
  std::lock_guard<std::mutex> lock(mutex);
  ThreadPool*& p = (*pools)[n];
  if (!p) p = new ThreadPool(n);
  return *p;
}

ThreadPool::ThreadPool(int threads)
    : size_(std::max(1, threads)), fork_epoch_(fork_epoch()), sleep_(std::make_unique<Sleep>()) {
  workers_.reserve(static_cast<size_t>(size_ - 1));
  for (int i = 1; i < size_; ++i) workers_.emplace_back([this] { worker_loop(); });
}

bool ThreadPool::forked() const { return fork_epoch_ != g_fork_epoch.load(std::memory_order_relaxed); }

ThreadPool::~ThreadPool() {
  if (forked()) {  // the workers are the parent's: nothing to stop or join here
    new std::vector<std::thread>(std::move(workers_));  // leaked: a joinable std::thread must not be destroyed
    (void)sleep_.release();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(sleep_->mutex);
    stop_ = true;
  }
  sleep_->work.notify_all();
  for (std::thread& t : workers_) t.join();
}

bool ThreadPool::claim_and_run(uint64_t s) {
  if (!has_work(s)) return false;
  if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) return true;  // raced: look again
  // Claimed: this job cannot finish (nor fn_ change) before done_ counts this task.
  const bool nested = t_in_task;
  t_in_task = true;
  try {
    fn_(arg_, static_cast<int64_t>(next_of(s)));
  } catch (...) {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!failed_.exchange(true)) error_ = std::current_exception();
  }
  t_in_task = nested;
  if (done_.fetch_add(1) + 1 == static_cast<int64_t>(count_of(s)) && caller_sleeping_.load()) {
    std::lock_guard<std::mutex> lock(sleep_->mutex);
    sleep_->done.notify_one();
  }
  return true;
}

void ThreadPool::worker_loop() {
  for (;;) {
    const uint64_t s = state_.load(std::memory_order_acquire);
    if (claim_and_run(s)) continue;
    // Prefetching takes the place of spinning: a worker holds its core for spin_time() either way.
    const auto deadline = std::chrono::steady_clock::now() + spin_time();
    prefetch_idle(s, deadline);
    // A new job, or new spans to prefetch while there is none.
    const uint64_t idle = idle_next_.load(std::memory_order_relaxed);
    if (spin_until(
            [&] {
              return stop_.load(std::memory_order_relaxed) || state_.load(std::memory_order_relaxed) != s ||
                     idle_next_.load(std::memory_order_relaxed) != idle;
            },
            deadline)) {
      if (stop_) return;
      continue;
    }
    std::unique_lock<std::mutex> lock(sleep_->mutex);
    sleepers_.fetch_add(1);
    sleep_->work.wait(lock, [&] { return stop_.load() || state_.load() != s; });
    sleepers_.fetch_sub(1);
    if (stop_) return;
  }
}

void ThreadPool::prefetch_when_idle(const MemorySpan* spans, int count) {
  if (size_ == 1) return;
  count = std::min(count, kMaxIdleSpans);
  const uint64_t gen = (idle_next_.load(std::memory_order_relaxed) >> kIdleChunkBits) + 1;
  idle_next_.store((gen << kIdleChunkBits) | kIdleChunkMask, std::memory_order_relaxed);  // nothing to do meanwhile
  for (int i = 0; i < kMaxIdleSpans; ++i) {
    idle_data_[i].store(i < count ? static_cast<const char*>(spans[i].data) : nullptr, std::memory_order_relaxed);
    idle_bytes_[i].store(i < count ? spans[i].bytes : 0, std::memory_order_relaxed);
  }
  idle_next_.store(gen << kIdleChunkBits, std::memory_order_release);
}

uint64_t ThreadPool::idle_span_bytes(int i) const {
  return (idle_bytes_[i].load(std::memory_order_relaxed) + kIdleChunk - 1) / kIdleChunk * kIdleChunk;
}

// The byte offset of the chunk `at` points to within span *i, or *i = kMaxIdleSpans past the last.
uint64_t ThreadPool::idle_chunk(uint64_t at, int* i) const {
  uint64_t offset = (at & kIdleChunkMask) * kIdleChunk;
  for (*i = 0; *i < kMaxIdleSpans && offset >= idle_span_bytes(*i); ++*i) offset -= idle_span_bytes(*i);
  return offset;
}

uint64_t ThreadPool::idle_prefetch_left() const {
  const uint64_t taken = (idle_next_.load(std::memory_order_acquire) & kIdleChunkMask) * kIdleChunk;
  uint64_t total = 0;
  for (int i = 0; i < kMaxIdleSpans; ++i) total += idle_span_bytes(i);
  return taken < total ? total - taken : 0;
}

void ThreadPool::prefetch_idle(uint64_t s, std::chrono::steady_clock::time_point deadline) {
  // Chunks are claimed like tasks, so several idle workers share the spans. A torn read (spans of a
  // newer call) prefetches the wrong bytes, which is harmless.
  while (state_.load(std::memory_order_relaxed) == s && !stop_.load(std::memory_order_relaxed) &&
         std::chrono::steady_clock::now() < deadline) {
    uint64_t at = idle_next_.load(std::memory_order_acquire);
    int i;
    const uint64_t offset = idle_chunk(at, &i);
    if (i == kMaxIdleSpans) return;  // all taken
    if (!idle_next_.compare_exchange_weak(at, at + 1, std::memory_order_acq_rel)) continue;
    const char* p = idle_data_[i].load(std::memory_order_relaxed);
    const uint64_t end = std::min(offset + kIdleChunk, idle_bytes_[i].load(std::memory_order_relaxed));
#if defined(__x86_64__) || defined(__i386__)
    for (uint64_t b = offset; p && b < end; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
#else
    for (uint64_t b = offset; p && b < end; b += 64) __builtin_prefetch(p + b, 0, 2);
#endif
  }
}

void ThreadPool::run_tasks(int64_t tasks, TaskFn fn, void* arg) {
  if (tasks <= 0) return;
  // Inline: one thread or one task, a task starting work of its own, a fork() child (no workers),
  // or the pool busy with another caller's work (that caller's threads are not ours to wait for).
  if (size_ == 1 || tasks == 1 || t_in_task || forked() || !caller_.try_lock()) {
    for (int64_t i = 0; i < tasks; ++i) fn(arg, i);
    return;
  }
  std::lock_guard<std::mutex> own(caller_, std::adopt_lock);
  // Jobs above the task field's range run as several.
  struct Shifted {
    TaskFn fn;
    void* arg;
    int64_t first;
    static void call(void* a, int64_t i) {
      const auto* s = static_cast<const Shifted*>(a);
      s->fn(s->arg, s->first + i);
    }
  };
  for (int64_t first = 0; first < tasks; first += kMaxTasks - 1) {
    const int64_t n = std::min<int64_t>(tasks - first, kMaxTasks - 1);
    Shifted shifted{fn, arg, first};
    fn_ = first == 0 ? fn : &Shifted::call;
    arg_ = first == 0 ? arg : &shifted;
    done_.store(0);
    failed_.store(false);
    error_ = nullptr;
    const uint64_t gen = (gen_of(state_.load()) + 1) & ((uint64_t{1} << kGenBits) - 1);
    state_.store(pack_state(gen, static_cast<uint64_t>(n), 0));  // publishes fn_, arg_ (seq_cst)
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_->mutex);
      sleep_->work.notify_all();
    }
    // The caller works too, and then waits only for tasks that others hold.
    for (uint64_t s = state_.load(std::memory_order_acquire); has_work(s); s = state_.load(std::memory_order_acquire))
      claim_and_run(s);
    if (!spin_until([&] { return done_.load(std::memory_order_acquire) == n; })) {
      std::unique_lock<std::mutex> lock(sleep_->mutex);
      caller_sleeping_.store(true);
      sleep_->done.wait(lock, [&] { return done_.load() == n; });
      caller_sleeping_.store(false);
    }
    if (failed_.load()) std::rethrow_exception(error_);
  }
}

}  // namespace finequant
