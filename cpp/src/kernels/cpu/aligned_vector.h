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
inline void* cache_line_allocate(size_t bytes) { return ::operator new(bytes, std::align_val_t{64}); }
inline void cache_line_deallocate(void* p, size_t) { ::operator delete(p, std::align_val_t{64}); }

// Packed weights (weight_memory.cc): from 64 KiB up, carved in order from 32 MiB regions that ask Linux
// for 2 MiB pages (madvise, transparent huge pages), so that a decode step, which streams every weight
// once, walks ~50 pages instead of ~25,000 per 100 MB (DESIGN 5.4); smaller ones as cache_line_allocate.
// A region goes back to the heap when its last weight is freed. Cache-line aligned either way.
void* weight_allocate(size_t bytes);
void weight_deallocate(void* p, size_t bytes);

// A stateless allocator over a pair of functions (bytes in, bytes out).
template <class T, void* (*Allocate)(size_t), void (*Deallocate)(void*, size_t)>
struct FunctionAllocator {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = FunctionAllocator<U, Allocate, Deallocate>;
  };
  FunctionAllocator() = default;
  template <class U>
  FunctionAllocator(const FunctionAllocator<U, Allocate, Deallocate>&) {}
  T* allocate(size_t n) { return static_cast<T*>(Allocate(n * sizeof(T))); }
  void deallocate(T* p, size_t n) { Deallocate(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const FunctionAllocator<U, Allocate, Deallocate>&) const { return true; }
  template <class U>
  bool operator!=(const FunctionAllocator<U, Allocate, Deallocate>&) const { return false; }
};

template <class T>
using AlignedVector = std::vector<T, FunctionAllocator<T, cache_line_allocate, cache_line_deallocate>>;
template <class T>
using WeightVector = std::vector<T, FunctionAllocator<T, weight_allocate, weight_deallocate>>;

}  // namespace kernels
}  // namespace finequant
