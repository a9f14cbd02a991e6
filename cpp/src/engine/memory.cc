#include "engine/memory.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

#include "finequant/error.h"

namespace finequant {

namespace {

constexpr double kF32 = 4.0;

// One layer's live fp32 intermediates for M rows: the residual, the normed input and its quantized
// copy, q/k/v, the attention output, a rotation's copy of the widest input and the MLP's gate, up and
// product (what Block::forward holds at its peak; earlier layers' buffers are freed by then).
double layer_activations(double M, double C, double HD, double KVD, double I) {
  return M * (6 * C + 2 * HD + 2 * KVD + 3 * I) * kF32;
}

// The attention kernel's per-thread scratch: a transposed key block and the scores over Tk keys.
double attention_scratch(double threads, double Tk, double D) { return threads * Tk * (D + 2) * kF32; }

}  // namespace

CallMemory estimate_call_memory(const ModelConfig& c, int64_t B_, int64_t T_, int64_t decoder_T_,
                                int64_t cache_positions_, bool all_logits, int threads_) {
  const double B = static_cast<double>(B_), T = static_cast<double>(T_), Td = static_cast<double>(decoder_T_);
  const double cap = static_cast<double>(cache_positions_), threads = std::max(1, threads_);
  const double C = static_cast<double>(c.hidden_size), V = static_cast<double>(c.vocab_size);
  const double D = static_cast<double>(c.head_dim);
  const double HD = static_cast<double>(c.num_heads) * D, KVD = static_cast<double>(c.num_kv_heads) * D;
  CallMemory m;
  if (c.is_seq2seq()) {
    const double L = static_cast<double>(c.decoder_layers);
    const double Dd = C / static_cast<double>(c.decoder_heads), I = static_cast<double>(c.decoder_intermediate_size);
    const double Md = B * std::max(Td, 1.0), Me = B * T;
    const double encoder = layer_activations(Me, C, HD, KVD, static_cast<double>(c.intermediate_size)) +
                           attention_scratch(threads, T, D);
    const double decoder = layer_activations(Md, C, C, C, I) + Md * 2 * C * kF32 /* cross q and output */ +
                           attention_scratch(threads, std::max(T, cap), Dd);
    m.activations = std::max(encoder, decoder) + Me * C * kF32;  // the encoder output outlives the encoder
    m.kv_cache = L * 2 * B * (cap + T) * C * kF32 + B * (cap + T) * 9 * 2;  // self + cross K/V, masks, positions
    m.outputs = all_logits ? Md * V * kF32 : Td > 0 || cap > 0 ? B * V * kF32 : Me * C * kF32;
    return m;
  }
  const double M = B * T;
  m.activations = layer_activations(M, C, HD, KVD, static_cast<double>(c.intermediate_size)) +
                  attention_scratch(threads, T + cap, D);
  if (c.architecture == "bert") {
    m.outputs = M * C * kF32;
    return m;
  }
  // A decoder: forward keeps no cache beyond the call's T positions (K/V of every layer), generate
  // the cache it allocates up front, with its host bookkeeping (valid flags, positions).
  const double slots = std::max(cap, T);
  m.kv_cache = static_cast<double>(c.num_layers) * 2 * B * slots * KVD * kF32 + B * slots * 9 * 2;
  m.outputs = (all_logits ? M : B) * V * kF32;
  return m;
}

double estimate_weight_memory(const ModelFile& file) {
  double bytes = 0;
  for (const auto& [name, t] : file.file.tensors()) {
    const double n = static_cast<double>(t.numel());
    switch (t.dtype()) {
      case DType::F32:
      case DType::F16:
      case DType::BF16: bytes += n * kF32; break;
      case DType::U8: bytes += n * 2; break;  // 4-bit codes unpacked to a byte each (8-bit: an upper bound)
      default: bytes += n * static_cast<double>(dtype_size(t.dtype())); break;
    }
  }
  return bytes;
}

namespace {
int64_t read_available_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream in(line.substr(13));
    int64_t kib = 0;
    if (in >> kib && kib > 0) return kib * 1024;
  }
  const long pages = ::sysconf(_SC_AVPHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) return static_cast<int64_t>(pages) * page;
  return std::numeric_limits<int64_t>::max();  // unknown: no bound
}
}  // namespace

int64_t memory_limit(int64_t max_memory) {
  if (max_memory > 0) return max_memory;
  // Read at most every 100 ms: small calls run thousands of times a second.
  static std::atomic<int64_t> available{0}, read_at_ns{0};
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch()).count();
  if (available.load() == 0 || now - read_at_ns.load() > 100'000'000) {
    available.store(read_available_memory());
    read_at_ns.store(now);
  }
  return available.load();
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024 && u < 6) {
    bytes /= 1024;
    ++u;
  }
  char buf[64];
  if (u == 0) std::snprintf(buf, sizeof buf, "%.0f B", bytes);
  else std::snprintf(buf, sizeof buf, bytes >= 1e4 ? "%.3g %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

void check_memory(const std::string& what, double needed, const std::string& detail, int64_t limit,
                  int64_t max_memory) {
  if (needed <= static_cast<double>(limit)) return;
  const std::string bound = max_memory > 0 ? "max_memory " + format_bytes(static_cast<double>(limit)) +
                                                 " (EngineOptions::max_memory)"
                                           : "the " + format_bytes(static_cast<double>(limit)) +
                                                 " of physical memory available (set EngineOptions::max_memory "
                                                 "to choose a limit)";
  fail(ErrorKind::ResourceLimit,
       what + " needs about " + format_bytes(needed) + " (" + detail + "), more than " + bound);
}

}  // namespace finequant
