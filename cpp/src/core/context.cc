#include "core/context.h"

#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace finequant {

namespace {
std::atomic<int> g_default_threads{0};
}

void set_default_threads(int threads) { g_default_threads = threads; }

int resolve_threads(int requested) {
  if (requested > 0) return requested;
  const int d = g_default_threads.load();
  if (d > 0) return d;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace finequant
