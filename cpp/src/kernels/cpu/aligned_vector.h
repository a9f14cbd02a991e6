// Vectors whose data starts on a cache line, for CPU kernels' packed weights and scratch rows.
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

}  // namespace kernels
}  // namespace finequant
