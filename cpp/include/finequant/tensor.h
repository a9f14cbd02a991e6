// A dense, contiguous, row-major tensor: dtype + shape + device + storage that is either owned
// (from the device's allocator) or borrowed (e.g. from a memory-mapped model file, kept alive by a
// shared handle). The data of a CUDA tensor is a device pointer: host code never dereferences it,
// to() copies between devices.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "finequant/device.h"
#include "finequant/error.h"

namespace finequant {

enum class DType : uint8_t { F32, F16, BF16, I8, U8, I32, I64 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // safetensors spelling: "F32", "I8", ...

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);  // "[2, 3]"

template <class T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::F32; };
template <> struct DTypeOf<int8_t> { static constexpr DType value = DType::I8; };
template <> struct DTypeOf<uint8_t> { static constexpr DType value = DType::U8; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::I32; };
template <> struct DTypeOf<int64_t> { static constexpr DType value = DType::I64; };

class Tensor {
 public:
  Tensor() = default;
  // Owned, 64-byte aligned storage from the device's allocator. empty() leaves it uninitialised,
  // zeros() clears it.
  static Tensor empty(DType dtype, Shape shape, Device device = Device::cpu());
  static Tensor zeros(DType dtype, Shape shape, Device device = Device::cpu());
  // Borrowed storage: `keepalive` (may be null) owns the memory `data` points into.
  static Tensor borrow(void* data, DType dtype, Shape shape, std::shared_ptr<const void> keepalive = nullptr,
                       Device device = Device::cpu());

  bool defined() const { return data_ != nullptr; }  // empty() always allocates, even for numel 0
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the end
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  void* raw() { return data_; }
  const void* raw() const { return data_; }
  template <class T> T* data() { check_dtype(DTypeOf<T>::value); return static_cast<T*>(data_); }
  template <class T> const T* data() const { check_dtype(DTypeOf<T>::value); return static_cast<const T*>(data_); }

  Tensor clone() const;                   // owned deep copy on the same device
  Tensor reshape(Shape shape) const;      // same storage, same numel
  // The tensor on `device`: itself when already there (shared storage), else an owned copy.
  Tensor to(Device device) const;

 private:
  void check_dtype(DType expected) const;

  DType dtype_ = DType::F32;
  Device device_;
  Shape shape_;
  std::shared_ptr<const void> storage_;
  void* data_ = nullptr;
};

}  // namespace finequant
