// Where tensors live and kernels run: the CPU or one CUDA device.
#pragma once
#include <string>

namespace finequant {

struct Device {
  enum class Kind : unsigned char { CPU, CUDA };
  Kind kind = Kind::CPU;
  int index = 0;  // CUDA device ordinal (0 for the CPU)

  static Device cpu() { return Device{}; }
  static Device cuda(int index = 0) { return Device{Kind::CUDA, index}; }
  bool is_cpu() const { return kind == Kind::CPU; }
  bool is_cuda() const { return kind == Kind::CUDA; }
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;  // "cpu", "cuda:0"

  // "cpu", "cuda", "cuda:N" or "auto" (the first CUDA device when this build has the CUDA backend
  // and a device is present, else the CPU). Throws InvalidArgument for other spellings,
  // Unsupported when CUDA is asked for and this build has no CUDA backend, and Runtime when the
  // named device does not exist (no driver, no GPU, or an index past the device count).
  static Device parse(const std::string& spec);
};

}  // namespace finequant
