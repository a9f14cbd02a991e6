// Errors thrown by finequant. Every entry point checks its input and throws one of these;
// kernels assume valid input. The Python bindings map each kind to a Python exception.
#pragma once
#include <stdexcept>
#include <string>

namespace finequant {

enum class ErrorKind {
  InvalidArgument,  // wrong shape, dtype, range or option (Python: ValueError)
  ModelFormat,      // truncated, corrupt or mismatched model file (Python: finequant.ModelFileError)
  Unsupported,      // valid request that finequant does not implement (Python: NotImplementedError)
  ResourceLimit,    // a load or call that would need more memory than allowed (Python: MemoryError)
  Runtime,          // anything else (Python: RuntimeError)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] inline void fail(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

}  // namespace finequant

// FQ_CHECK(cond, kind, message-expression): throw Error(kind, message) unless cond holds.
#define FQ_CHECK(cond, kind, msg)                         \
  do {                                                    \
    if (!(cond)) ::finequant::fail((kind), (msg));        \
  } while (0)
#define FQ_CHECK_ARG(cond, msg) FQ_CHECK(cond, ::finequant::ErrorKind::InvalidArgument, msg)
