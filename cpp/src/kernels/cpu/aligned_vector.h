// Vectors whose data starts on a cache line, for CPU kernels' scratch rows and packed weights.
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace finequant {
namespace kernels {

// std::allocator aligns to 16 bytes; packed weights, tables and quantized rows are read in 64-byte
// rows (zmm loads, AMX tile rows), and a row that straddles two cache lines costs both: a 2 x 2 AMX
// tile loop from L1 ran 81 ns a step at offset 16 or 32 against 33 at offset 0 (DESIGN 5.4).
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// Packed weights (weight_memory.cc): from 64 KiB up, carved in order from 32 MiB regions that ask Linux
// for 2 MiB pages (madvise, transparent huge pages), so that a decode step, which streams every weight
// once, walks ~50 pages instead of ~25,000 per 100 MB (DESIGN 5.4); smaller ones as AlignedVector.
// A region goes back to the heap when its last weight is freed. Cache-line aligned either way.
void* weight_allocate(size_t bytes);
void weight_deallocate(void* p, size_t bytes);

template <class T>
struct WeightAllocator {
  using value_type = T;
  WeightAllocator() = default;
  template <class U>
  WeightAllocator(const WeightAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(weight_allocate(n * sizeof(T))); }
  void deallocate(T* p, size_t n) { weight_deallocate(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const WeightAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const WeightAllocator<U>&) const { return false; }
};
template <class T>
using WeightVector = std::vector<T, WeightAllocator<T>>;

}  // namespace kernels
}  // namespace finequant
