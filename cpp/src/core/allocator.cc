#include "core/allocator.h"

#include <cstring>
#include <map>
#include <mutex>
#include <new>

#include "finequant/error.h"

namespace finequant {

namespace {

constexpr size_t kAlignment = 64;

// Host memory. Freed blocks are kept for reuse by size: activations of the same shapes are allocated
// on every forward, and malloc serves large blocks with fresh mmap pages whose page faults and zeroing
// cost up to ~40% of a large GEMM (measured: 1024 x 768 outputs), small ones (a decode step's rows)
// through memalign, whose split-off remainders kept glibc consolidating its free lists: ~1.5% of a
// SmolLM2 decode step (DESIGN 5.5).
class CpuAllocator final : public Allocator {
 public:
  static constexpr size_t kMinBlock = 256, kMaxBlock = size_t{128} << 20, kMaxTotal = size_t{256} << 20;

  void* allocate(size_t bytes, int) override {
    if (bytes >= kMinBlock && bytes <= kMaxBlock) {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        total_ -= bytes;
        return p;
      }
    }
    return ::operator new(bytes, std::align_val_t(kAlignment));
  }

  void deallocate(void* p, size_t bytes, int) override {
    if (bytes >= kMinBlock && bytes <= kMaxBlock) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (total_ + bytes <= kMaxTotal) {
        free_.emplace(bytes, p);
        total_ += bytes;
        return;
      }
    }
    ::operator delete(p, std::align_val_t(kAlignment));
  }

  void fill_zero(void* p, size_t bytes, int) override { std::memset(p, 0, bytes); }

  void copy(void* dst, Device, const void* src, Device, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t total_ = 0;
};

}  // namespace

Allocator& allocator_for(Device::Kind kind) {
  static Allocator* const cpu = new CpuAllocator;  // never destroyed: tensors may outlive static destructors
  if (kind == Device::Kind::CPU) return *cpu;
#ifdef FINEQUANT_WITH_CUDA
  return *cuda_allocator();
#else
  fail(ErrorKind::Unsupported, "this build of finequant has no CUDA backend (nvcc or CUTLASS was not found when it was built)");
#endif
}

}  // namespace finequant
