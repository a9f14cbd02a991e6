// libFuzzer target: a model file from a stranger. The bytes are written to a file (the reader maps
// files) and opened as a finequant model file: the safetensors framing and header, then the
// metadata and every Linear's quantization record against its tensors. Any outcome but success or a
// finequant::Error (a crash, another exception, a sanitizer report, a hang) is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "finequant/error.h"
#include "finequant/model_file.h"

namespace {

// One in-memory file for the whole run (memfd: no disk traffic), reopened by path every input.
const std::string& scratch_path(int* fd_out) {
  static int fd = -1;
  static std::string path;
  if (fd < 0) {
    fd = ::memfd_create("fq_fuzz_model_file", 0);
    if (fd < 0) std::abort();
    path = "/proc/self/fd/" + std::to_string(fd);
  }
  *fd_out = fd;
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int fd = -1;
  const std::string& path = scratch_path(&fd);
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) std::abort();
  try {
    const finequant::ModelFile m = finequant::ModelFile::open(path);
    // Touch what the reader vouched for: every tensor's bytes are inside the mapping.
    uint64_t sum = 0;
    for (const auto& [name, t] : m.file.tensors()) {
      const auto* p = static_cast<const uint8_t*>(t.raw());
      for (size_t i = 0; i < t.nbytes(); ++i) sum += p[i];
    }
    if (sum == 0xFFFFFFFFFFFFFFFFull) std::abort();  // keeps the loop
  } catch (const finequant::Error&) {
  }
  return 0;
}
