// The machine's ceilings, measured: DRAM read bandwidth (batch-1 decode reads every weight once per
// token; bench/bench_decode.py reports decode as a fraction of it) and the threads-running part of the
// INT8 peak measurements (bench/bench_gemm.py).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <vector>

#include "kernels/cpu/gemm.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {
namespace kernels {

namespace {
// XOR of every 8-byte word of [p, p + n): the loads cannot be skipped, and vectorize at any width.
FQ_MULTIVERSION uint64_t xor_words(const uint64_t* p, int64_t n) {
  uint64_t acc = 0;
#pragma omp simd reduction(^ : acc)
  for (int64_t i = 0; i < n; ++i) acc ^= p[i];
  return acc;
}
}  // namespace

double dram_read_gbps(ThreadPool& pool, int64_t bytes, double seconds) {
  const int64_t words = std::max<int64_t>(bytes / 8, 1 << 20);
  std::vector<uint64_t> buf(static_cast<size_t>(words));
  for (int64_t i = 0; i < words; ++i) buf[static_cast<size_t>(i)] = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;
  std::atomic<uint64_t> sink{0};
  const int threads = pool.size();
  auto sweep = [&] {
    pool.run(threads, [&](int64_t t) {
      const int64_t b = words * t / threads, e = words * (t + 1) / threads;
      sink.fetch_xor(xor_words(buf.data() + b, e - b));
    });
  };
  sweep();  // pages touched, workers awake
  double best = 0.0;
  const auto start = std::chrono::steady_clock::now();
  do {
    const auto t0 = std::chrono::steady_clock::now();
    sweep();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(words) * 8 / s / 1e9);
  } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds);
  volatile uint64_t keep = sink.load();
  (void)keep;
  return best;
}

double peak_gops(int threads, double seconds, PeakLoop loop) {
  std::atomic<int64_t> total_ops{0};
  const auto start = std::chrono::steady_clock::now();
  ThreadPool::shared(threads).run(threads, [&](int64_t) { total_ops += static_cast<int64_t>(loop(start, seconds)); });
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(total_ops.load()) / elapsed / 1e9;
}

}  // namespace kernels
}  // namespace finequant
