// Memory for packed weights: regions of 2 MiB pages (docs/DESIGN.md section 5.4, "Weights in huge pages").
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <new>

#if defined(__unix__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels/cpu/aligned_vector.h"

#if defined(__SANITIZE_ADDRESS__)
#define FQ_WEIGHT_ARENA 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FQ_WEIGHT_ARENA 0
#endif
#endif
#ifndef FQ_WEIGHT_ARENA
#define FQ_WEIGHT_ARENA 1  // off under AddressSanitizer, which then sees each weight as its own block
#endif

namespace finequant {
namespace kernels {

namespace {

constexpr size_t kLine = 64, kHugePage = size_t{1} << 21;
constexpr size_t kRegion = size_t{32} << 20;  // 16 huge pages, carved up in call order
constexpr size_t kSmall = size_t{64} << 10;   // smaller weights (and tables) stay on the ordinary heap

size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

struct Region {
  char* base;
  size_t size, used;
  int64_t live;  // allocations not yet freed: the region goes back to the heap at 0
};

struct Arena {
  std::mutex mutex;
  std::map<const char*, Region> regions;  // by base address
  Region* open = nullptr;                 // the region new weights are carved from
};

Arena& arena() {
  static Arena* a = [] {
    auto* made = new Arena;  // never destroyed: weights may be freed during static destruction
#if defined(__unix__)
    // A fork() while another thread allocates would leave the child's copy of the mutex locked: take it
    // around the fork, as malloc does for its own locks.
    pthread_atfork([] { arena().mutex.lock(); }, [] { arena().mutex.unlock(); }, [] { arena().mutex.unlock(); });
#endif
    return made;
  }();
  return *a;
}

}  // namespace

void* weight_allocate(size_t bytes) {
  if (!FQ_WEIGHT_ARENA || bytes < kSmall) return ::operator new(bytes, std::align_val_t{kLine});
  bytes = round_up(bytes, kLine);
  Arena& a = arena();
  std::lock_guard<std::mutex> lock(a.mutex);
  if (!a.open || a.open->used + bytes > a.open->size) {
    const size_t size = std::max(kRegion, round_up(bytes, kHugePage));
    char* base = static_cast<char*>(::operator new(size, std::align_val_t{kHugePage}));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // A hint: where transparent huge pages are off (or none are free) the pages stay 4 KiB.
    madvise(base, size, MADV_HUGEPAGE);
#endif
    a.open = &a.regions.emplace(base, Region{base, size, 0, 0}).first->second;
  }
  char* p = a.open->base + a.open->used;
  a.open->used += bytes;
  ++a.open->live;
  return p;
}

void weight_deallocate(void* p, size_t bytes) {
  if (!FQ_WEIGHT_ARENA || bytes < kSmall) {
    ::operator delete(p, std::align_val_t{kLine});
    return;
  }
  Arena& a = arena();
  std::lock_guard<std::mutex> lock(a.mutex);
  auto it = a.regions.upper_bound(static_cast<const char*>(p));
  --it;  // the region whose base is the last one at or below p
  Region& r = it->second;
  if (--r.live > 0) return;
  if (a.open == &r) a.open = nullptr;
  ::operator delete(r.base, std::align_val_t{kHugePage});
  a.regions.erase(it);
}

}  // namespace kernels
}  // namespace finequant
