#include "kernels/cpu/cpu_isa.h"

#include <atomic>
#include <cstdlib>

#include "finequant/error.h"

namespace finequant {
namespace kernels {

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
bool has_avx512vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}
#else
bool has_avx2() { return false; }
bool has_avx512vnni() { return false; }
#endif
bool always() { return true; }

// -1: not forced; else the forced level.
std::atomic<int> g_forced{-1};

}  // namespace

const std::vector<IsaInfo>& isa_table() {
  static const std::vector<IsaInfo> table = {
      {CpuIsa::Ref, "ref", always},
      {CpuIsa::Avx2, "avx2", has_avx2},
      {CpuIsa::Avx512Vnni, "avx512vnni", has_avx512vnni},
  };
  return table;
}

const char* isa_name(CpuIsa isa) { return isa_table()[static_cast<size_t>(isa)].name; }
bool cpu_supports(CpuIsa isa) { return isa_table()[static_cast<size_t>(isa)].supported(); }

CpuIsa best_supported_isa() {
  CpuIsa best = CpuIsa::Ref;
  for (const IsaInfo& i : isa_table())
    if (i.supported()) best = i.level;
  return best;
}

namespace {
bool parse_level(const std::string& name, CpuIsa* out) {
  for (const IsaInfo& i : isa_table())
    if (name == i.name) {
      *out = i.level;
      return true;
    }
  return false;
}
}  // namespace

CpuIsa active_isa() {
  int forced = g_forced.load(std::memory_order_relaxed);
  CpuIsa want = best_supported_isa();
  if (forced >= 0) {
    want = static_cast<CpuIsa>(forced);
  } else if (const char* env = std::getenv("FINEQUANT_ISA")) {
    CpuIsa named;
    if (parse_level(env, &named)) want = named;  // unknown names: the best supported
  }
  while (want != CpuIsa::Ref && !cpu_supports(want)) want = static_cast<CpuIsa>(static_cast<int>(want) - 1);
  return want;
}

void force_isa(const std::string& name) {
  if (name == "auto") {
    g_forced = -1;
    return;
  }
  CpuIsa level;
  if (!parse_level(name, &level)) {
    std::string known = "auto";
    for (const IsaInfo& i : isa_table()) known += std::string(", ") + i.name;
    fail(ErrorKind::InvalidArgument, "unknown CPU instruction set '" + name + "' (expected " + known + ")");
  }
  g_forced = static_cast<int>(level);
}

}  // namespace kernels
}  // namespace finequant
