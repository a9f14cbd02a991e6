// Per-shape strategy (docs/DESIGN.md section 12): which kernel each GEMM part (qkv, attn_out, fc1,
// fc2, head) of a quantized model runs, per token-count bucket, as `finequant tune` measured on
// this machine. The stored integer weights run either as stored (integer kernel, activations
// quantized per row: the default) or dequantized once at load to a floating-point weight-only
// Linear (fp32, or bf16 where the backend has such a kernel). The weight-only path changes the
// numerics (no activation quantization): an explicit accuracy/speed choice the table records.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace finequant {

// The alternative one Linear may hold: its precision and, per token-count bucket, whether a call
// with M rows in that bucket runs it instead of the integer kernel.
struct LinearStrategy {
  kernels::FloatPrecision precision = kernels::FloatPrecision::F32;
  std::vector<int64_t> bucket_max;  // inclusive upper bound of each bucket's M, ascending; the last covers the rest
  std::vector<uint8_t> use_alternative;  // per bucket
  bool any() const;
  bool chooses_alternative(int64_t M) const;
};

// A strategy table (`strategy.json` in the model directory), read and checked.
struct StrategyTable {
  std::string path;
  std::string cpu, backend;          // the machine tune measured on
  std::vector<int64_t> bucket_max;   // as in LinearStrategy
  std::map<std::string, LinearStrategy> parts;  // parts with at least one bucket on the alternative
  // Filled while the model loads: Linears given an alternative copy, and its bytes.
  mutable int64_t alternative_linears = 0;
  mutable int64_t alternative_bytes = 0;

  // Parses `path`; throws Error(ModelFormat) naming the file and the field for a corrupt table.
  static StrategyTable read(const std::string& path);
  // The strategy of `part` ("qkv", ...), or null when the part always runs as stored.
  const LinearStrategy* for_part(const std::string& part) const;
  // One line per part, e.g. "fc1: M 1 int, 2-8 int, 9-64 fp32, 65+ fp32".
  std::string describe() const;
};

// The machine a table belongs to: the CPU's model name (Linux /proc/cpuinfo; "unknown" elsewhere)
// and the CPU backend's name, which names the kernels' instruction-set level.
std::string machine_cpu_name();
std::string machine_backend_name();

}  // namespace finequant
