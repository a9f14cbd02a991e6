#include "finequant/tensor.h"

#include <cstring>
#include <limits>

#include "core/allocator.h"

namespace finequant {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I8: return 1;
    case DType::U8: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
  }
  fail(ErrorKind::InvalidArgument, "unknown dtype");
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  return "?";
}

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace {

constexpr size_t kAlignment = 64;

// Validates dims and returns the byte count, guarding against overflow.
size_t checked_nbytes(DType dtype, const Shape& shape) {
  size_t n = dtype_size(dtype);
  for (int64_t d : shape) {
    FQ_CHECK_ARG(d >= 0, "negative dimension in shape " + shape_str(shape));
    if (d != 0 && n > std::numeric_limits<size_t>::max() / static_cast<size_t>(d))
      fail(ErrorKind::InvalidArgument, "tensor of shape " + shape_str(shape) + " is too large");
    n *= static_cast<size_t>(d);
  }
  return n;
}

}  // namespace

Tensor Tensor::empty(DType dtype, Shape shape, Device device) {
  size_t bytes = checked_nbytes(dtype, shape);
  // Allocate at least one alignment unit so that defined() holds even for numel 0.
  size_t alloc = bytes == 0 ? kAlignment : (bytes + kAlignment - 1) / kAlignment * kAlignment;
  Allocator& allocator = allocator_for(device.kind);
  void* p = allocator.allocate(alloc, device.index);
  Tensor t;
  t.dtype_ = dtype;
  t.device_ = device;
  t.shape_ = std::move(shape);
  t.storage_ = std::shared_ptr<const void>(
      p, [&allocator, alloc, index = device.index](const void* q) { allocator.deallocate(const_cast<void*>(q), alloc, index); });
  t.data_ = p;
  return t;
}

Tensor Tensor::zeros(DType dtype, Shape shape, Device device) {
  Tensor t = empty(dtype, std::move(shape), device);
  allocator_for(device.kind).fill_zero(t.data_, t.nbytes(), device.index);
  return t;
}

Tensor Tensor::borrow(void* data, DType dtype, Shape shape, std::shared_ptr<const void> keepalive, Device device) {
  FQ_CHECK_ARG(data != nullptr, "Tensor::borrow of a null pointer");
  checked_nbytes(dtype, shape);
  Tensor t;
  t.dtype_ = dtype;
  t.device_ = device;
  t.shape_ = std::move(shape);
  t.storage_ = std::move(keepalive);
  t.data_ = data;
  return t;
}

Tensor Tensor::to(Device device) const {
  if (!defined() || device == device_) return *this;
  Tensor t = empty(dtype_, shape_, device);
  // The non-CPU side's allocator knows how to move bytes to and from the host.
  allocator_for(device.is_cpu() ? device_.kind : device.kind).copy(t.data_, device, data_, device_, nbytes());
  return t;
}

int64_t Tensor::dim(int i) const {
  int n = ndim();
  int j = i < 0 ? i + n : i;
  FQ_CHECK_ARG(j >= 0 && j < n,
               "dimension " + std::to_string(i) + " out of range for a tensor of shape " + shape_str(shape_));
  return shape_[j];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

Tensor Tensor::clone() const {
  if (!defined()) return Tensor();
  Tensor t = empty(dtype_, shape_, device_);
  allocator_for(device_.kind).copy(t.data_, device_, data_, device_, nbytes());
  return t;
}

Tensor Tensor::reshape(Shape shape) const {
  checked_nbytes(dtype_, shape);
  Tensor t = *this;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  FQ_CHECK_ARG(n == numel(), "cannot reshape a tensor of shape " + shape_str(shape_) + " to " + shape_str(shape));
  t.shape_ = std::move(shape);
  return t;
}

void Tensor::check_dtype(DType expected) const {
  FQ_CHECK_ARG(dtype_ == expected, std::string("expected a tensor of dtype ") + dtype_name(expected) + ", got " +
                                       dtype_name(dtype_));
}

}  // namespace finequant
