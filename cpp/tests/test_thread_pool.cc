// The CPU thread pool (core/thread_pool.h): every task runs exactly once, on any pool size, with
// errors, nested work, concurrent callers and workers that are slow to start.
#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "core/thread_pool.h"

using namespace finequant;

namespace {

// Runs `tasks` tasks on `pool` and returns how often each ran.
std::vector<int> counts(ThreadPool& pool, int64_t tasks) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(tasks));
  pool.run(tasks, [&](int64_t i) { hits[static_cast<size_t>(i)].fetch_add(1); });
  std::vector<int> out;
  for (auto& h : hits) out.push_back(h.load());
  return out;
}

bool all_once(const std::vector<int>& c) {
  for (int v : c)
    if (v != 1) return false;
  return true;
}

}  // namespace

TEST(every_task_once) {
  for (int size : {1, 2, 3, 8}) {
    ThreadPool pool(size);
    CHECK_EQ(pool.size(), size);
    for (int64_t tasks : {0, 1, 2, 3, 7, 64, 1000})
      for (int rep = 0; rep < 20; ++rep) CHECK(all_once(counts(pool, tasks)));
  }
}

TEST(parallel_for_covers_the_range) {
  ThreadPool pool(3);
  for (int64_t n : {0, 1, 5, 17, 1000, 65537})
    for (int64_t grain : {1, 7, 1000}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      parallel_for(pool, n, grain, [&](int64_t b, int64_t e) {
        CHECK(b < e);
        for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
      });
      for (auto& h : hits) CHECK_EQ(h.load(), 1);
    }
}

TEST(errors_reach_the_caller_and_the_pool_goes_on) {
  ThreadPool pool(2);
  std::atomic<int> ran{0};
  CHECK_THROWS_KIND_MSG(pool.run(50,
                                 [&](int64_t i) {
                                   ran.fetch_add(1);
                                   if (i == 17) fail(ErrorKind::InvalidArgument, "task 17 failed");
                                 }),
                        ErrorKind::InvalidArgument, "task 17 failed");
  CHECK_EQ(ran.load(), 50);  // the other tasks still ran
  CHECK(all_once(counts(pool, 100)));
}

TEST(nested_work_runs_inline) {
  ThreadPool pool(2);
  std::atomic<int> inner{0};
  pool.run(8, [&](int64_t) { pool.run(5, [&](int64_t) { inner.fetch_add(1); }); });
  CHECK_EQ(inner.load(), 40);
}

TEST(concurrent_callers_share_one_pool) {
  // Two threads give the same pool work at once: one gets the workers, the other runs its own
  // tasks; neither waits for the other's, and every task runs once.
  ThreadPool pool(2);
  std::atomic<bool> ok{true};
  auto caller = [&] {
    for (int rep = 0; rep < 200; ++rep)
      if (!all_once(counts(pool, 33))) ok = false;
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  CHECK(ok.load());
}

TEST(a_slow_task_does_not_stop_the_others) {
  // One long task on a worker: the caller runs every other task meanwhile.
  ThreadPool pool(2);
  std::atomic<int> done{0};
  const auto start = std::chrono::steady_clock::now();
  pool.run(200, [&](int64_t i) {
    if (i == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    done.fetch_add(1);
  });
  CHECK_EQ(done.load(), 200);
  CHECK(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(50));
}

TEST(workers_that_sleep_wake_for_new_work) {
  ThreadPool pool(3);
  for (int rep = 0; rep < 5; ++rep) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // past the spin: workers sleep
    std::atomic<int> on_workers{0};
    const auto me = std::this_thread::get_id();
    pool.run(64, [&](int64_t) {
      if (std::this_thread::get_id() != me) on_workers.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    });
    CHECK(on_workers.load() > 0);
  }
}

TEST(a_fork_child_runs_its_pools_inline) {
  // The parent's workers sleep on the pool's condition variable; in the child they do not exist:
  // the child's work runs on its own thread and destroying the pool must not wait for them.
  auto* pool = new ThreadPool(3);
  CHECK(all_once(counts(*pool, 50)));
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // past the spin: the workers sleep
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(20);  // a hang fails the test instead of stalling it
    const bool ok = all_once(counts(*pool, 64)) && all_once(counts(*pool, 3));
    delete pool;
    _exit(ok ? 0 : 3);
  }
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(all_once(counts(*pool, 64)));  // the parent's pool goes on
  delete pool;
}

TEST(shared_pools_by_size) {
  CHECK(&ThreadPool::shared(2) == &ThreadPool::shared(2));
  CHECK_EQ(ThreadPool::shared(3).size(), 3);
  set_default_threads(5);
  CHECK_EQ(default_threads(), 5);
  CHECK_EQ(ThreadPool::shared(0).size(), 5);
  set_default_threads(0);
  CHECK(default_threads() >= 1);
}

// Guided runs cover the items once, in order, longest first, a share of what is left each, ending in
// single items (so the threads finish together); one thread takes them all in one run.
TEST(guided_runs_cover_the_items_longest_first) {
  for (int threads : {1, 2, 3, 8})
    for (int64_t items : {1, 2, 5, 9, 48, 768, 100003}) {
      const WorkRuns runs = guided_runs(items, threads);
      CHECK(runs.count >= 1);
      CHECK_EQ(runs.begin(0), 0);
      CHECK_EQ(runs.end(runs.count - 1), items);
      int64_t left = items;
      for (int64_t r = 0; r < runs.count; ++r) {
        const int64_t n = runs.end(r) - runs.begin(r);
        if (r > 0) CHECK_EQ(runs.begin(r), runs.end(r - 1));
        if (r > 0) CHECK(n <= runs.end(r - 1) - runs.begin(r - 1));
        CHECK_EQ(n, threads == 1 ? items : std::max<int64_t>(1, (left + 2 * threads - 1) / (2 * threads)));
        left -= n;
      }
      if (threads == 1) CHECK_EQ(runs.count, 1);
      else CHECK_EQ(runs.end(runs.count - 1) - runs.begin(runs.count - 1), 1);
      // Logarithmic in the items: ~2 x threads x ln(items) + 2 x threads runs.
      CHECK(runs.count <= 2 * threads * (std::log(static_cast<double>(items)) + 2) + 1);
    }
  const WorkRuns u = uniform_runs(10, 4);
  CHECK_EQ(u.count, 3);
  CHECK_EQ(u.begin(2), 8);
  CHECK_EQ(u.end(2), 10);
}

TEST(idle_workers_prefetch_and_give_way_to_jobs) {
  // The spans of prefetch_when_idle are taken by workers with nothing to run, at each idle moment for as long
  // as they would spin (then they sleep, as before); jobs come first, and a pool stops mid-span.
  std::vector<char> buffer(size_t{8} << 20, 1);
  const MemorySpan spans[] = {{buffer.data(), buffer.size()}, {nullptr, 4096}, {buffer.data() + 1, 100}};
  {
    ThreadPool pool(2);
    pool.prefetch_when_idle(spans, 3);
    CHECK(pool.idle_prefetch_left() >= buffer.size() + 4096);
    for (int rep = 0; rep < 50; ++rep) CHECK(all_once(counts(pool, 64)));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (pool.idle_prefetch_left() > 0 && std::chrono::steady_clock::now() < deadline) {
      CHECK(all_once(counts(pool, 2)));  // wakes the worker, which then prefetches until its spin time is up
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    CHECK_EQ(pool.idle_prefetch_left(), uint64_t{0});
    // More than one idle moment can take (256 MiB, never touched): after its spin time the worker sleeps
    // and takes no more until the next job.
    const std::unique_ptr<char[]> big(new char[size_t{1} << 28]);
    const MemorySpan large = {big.get(), size_t{1} << 28};
    pool.prefetch_when_idle(&large, 1);
    CHECK(all_once(counts(pool, 64)));
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const uint64_t left = pool.idle_prefetch_left();
    CHECK(left > 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK_EQ(pool.idle_prefetch_left(), left);
  }
  ThreadPool one(1);  // no workers: nothing to prefetch with
  one.prefetch_when_idle(spans, 3);
  CHECK(all_once(counts(one, 10)));
}

int main() { return RUN_ALL_TESTS(); }
