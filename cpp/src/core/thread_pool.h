// The CPU thread pool (docs/DESIGN.md section 5.5): persistent workers that take the parallel
// work of the CPU kernels, in place of an OpenMP fork/join per op.
//
// Work is a number of tasks that the caller and the workers claim one at a time (the kernel picks
// the split: channel tiles, rows, heads). The caller works too and returns when every task has
// run; it never waits for a thread that has not started, so a worker descheduled by a busy
// neighbour costs at most the task it holds, and the caller finishes the rest alone. Idle threads
// spin briefly (the next op of a decode step follows within microseconds), then sleep.
//
// One Engine owns one pool (its thread count); work outside an Engine uses ThreadPool::shared. A
// pool runs one caller's work at a time: a second concurrent caller, or a task that starts work of
// its own, runs its tasks on its own thread. No pool is ever shared by accident between Engines. In
// a child process after fork() the workers do not exist: its pools run everything on the caller.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace finequant {

// Bytes in memory (for ThreadPool::prefetch_when_idle).
struct MemorySpan {
  const void* data = nullptr;
  size_t bytes = 0;
};

class ThreadPool {
 public:
  // `threads` >= 1 threads in all: the caller plus threads - 1 workers.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return size_; }

  // Runs task(i) for every i in [0, tasks) and returns when all have run. Exceptions thrown by a
  // task are rethrown here (the first one; the other tasks still run).
  template <class F>
  void run(int64_t tasks, F&& task) {
    using Fn = std::remove_reference_t<F>;
    run_tasks(tasks, [](void* f, int64_t i) { (*static_cast<Fn*>(f))(i); }, const_cast<void*>(static_cast<const void*>(&task)));
  }

  // Idle-time prefetch (docs/DESIGN.md section 5.5): until the next call, a worker with no task to run
  // brings `spans` (at most kMaxIdleSpans, in order) toward its caches a few KiB at a time, in place of
  // the spinning before it sleeps (so never longer), stops the moment a job starts, and resumes where it
  // stopped at its next idle moment. Decode's GEMVs wait on DRAM while the caller's serial work between
  // them leaves the workers idle: the backend names the next GEMV's weights here, which then come from
  // cache. Spans may be freed meanwhile (prefetches never fault).
  static constexpr int kMaxIdleSpans = 4;
  void prefetch_when_idle(const MemorySpan* spans, int count);
  // Bytes of the last prefetch_when_idle's spans not yet taken, in whole chunks (tests).
  uint64_t idle_prefetch_left() const;

  // The process-wide pool of `threads` threads (0: default_threads()), made on first use and kept.
  static ThreadPool& shared(int threads);

 private:
  using TaskFn = void (*)(void*, int64_t);
  void run_tasks(int64_t tasks, TaskFn fn, void* arg);
  void worker_loop();
  bool claim_and_run(uint64_t state);
  bool forked() const;  // this process is a fork() child of the one that started the workers
  // prefetch_when_idle's work, while the job `state` lasts, until `deadline`
  void prefetch_idle(uint64_t state, std::chrono::steady_clock::time_point deadline);
  uint64_t idle_chunk(uint64_t at, int* span) const;
  uint64_t idle_span_bytes(int span) const;  // rounded up to whole chunks

  int size_;
  unsigned fork_epoch_;
  std::vector<std::thread> workers_;
  std::mutex caller_;  // one caller's work at a time

  // The current job: generation (high 20 bits), task count (22), next unclaimed task (22). Claims
  // are compare-and-swaps on the whole word, so a thread that wakes late can never claim a task of
  // a job that has moved on.
  std::atomic<uint64_t> state_{0};
  TaskFn fn_ = nullptr;  // of the current job; rewritten only after every task of the last one ran
  void* arg_ = nullptr;
  std::atomic<int64_t> done_{0};
  std::atomic<bool> failed_{false};
  // prefetch_when_idle's spans, and its progress: generation (high 24 bits), next chunk (40 bits).
  std::atomic<const char*> idle_data_[kMaxIdleSpans] = {};
  std::atomic<uint64_t> idle_bytes_[kMaxIdleSpans] = {};
  std::atomic<uint64_t> idle_next_{0};
  std::exception_ptr error_;
  std::mutex error_mutex_;

  // Sleeping: workers wait for a new generation, the caller for the last task. On the heap, so that
  // a fork() child can leak it instead of destroying condition variables that the parent's workers
  // wait on (glibc would wait for those waiters forever).
  struct Sleep {
    std::mutex mutex;
    std::condition_variable work, done;
  };
  std::unique_ptr<Sleep> sleep_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_sleeping_{false};
  std::atomic<bool> stop_{false};
};

// Threads of ThreadPool::shared(0): set_default_threads, else FINEQUANT_NUM_THREADS, else
// OMP_NUM_THREADS, else the CPUs this process may run on.
int default_threads();
void set_default_threads(int threads);  // 0 restores the default

// Runs fn(begin, end) over [0, n) split into chunks of at least `grain` items (one chunk, on the
// caller, when n < 2 * grain or the pool has one thread).
template <class F>
void parallel_for(ThreadPool& pool, int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  const int64_t max_chunks = std::max<int64_t>(1, n / std::max<int64_t>(grain, 1));
  const int64_t chunks = std::min<int64_t>(max_chunks, int64_t{4} * pool.size());
  if (chunks <= 1 || pool.size() == 1) {
    fn(int64_t{0}, n);
    return;
  }
  pool.run(chunks, [&](int64_t c) { fn(n * c / chunks, n * (c + 1) / chunks); });
}

// A kernel's work items (a GEMM's channel tiles, attention's (sequence, head) pairs) in runs of
// consecutive items, one pool task each: run r covers items [begin(r), end(r)).
struct WorkRuns {
  const int64_t* starts = nullptr;  // guided runs (guided_runs): starts[0..count]
  int64_t items = 0, run = 1, count = 0;  // otherwise runs of `run` items
  int64_t begin(int64_t r) const { return starts ? starts[r] : r * run; }
  int64_t end(int64_t r) const { return starts ? starts[r + 1] : std::min(items, (r + 1) * run); }
};
inline WorkRuns uniform_runs(int64_t items, int64_t run) { return {nullptr, items, run, (items + run - 1) / run}; }

// Guided runs: each a 1 / (2 x threads) share of the items not yet given out, at least one, so the first
// runs are long (few claims on the pool's shared word: a task per tile, 48 for a SmolLM2 gate_up and
// 1,536 for an LM head, cost each decode GEMM a claim per tile) and the last ones single items, so that
// the threads finish together. Equal runs (4 per thread) left a thread idle while the other ran the last
// long run: guided runs made batch-1 decode 1.012-1.064x faster in 11 of 12 cells (GPT-2 small, SmolLM2;
// w8a8, w4a8, INT4 head; Zen 4), 0.971x in one (DESIGN 5.5). A thread descheduled mid-run holds at most a
// quarter of the items (2 threads). For attention, runs of consecutive heads keep a GQA group's heads on
// one thread, which then fetches the group's cached keys and values once. The starts live in a
// thread_local of the calling thread, valid until its next call (the pool's workers read them through
// the pointer).
inline WorkRuns guided_runs(int64_t items, int threads) {
  if (threads <= 1) return uniform_runs(items, std::max<int64_t>(items, 1));
  thread_local std::vector<int64_t> starts;
  starts.assign(1, 0);
  const int64_t share = int64_t{2} * threads;
  for (int64_t left = items; left > 0;) {
    const int64_t run = std::max<int64_t>(1, (left + share - 1) / share);
    starts.push_back(starts.back() + run);
    left -= run;
  }
  return {starts.data(), items, 0, static_cast<int64_t>(starts.size()) - 1};
}

}  // namespace finequant
