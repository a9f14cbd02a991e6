#include "kernels/cpu/cpu_isa.h"

#include <array>
#include <atomic>
#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "finequant/error.h"

namespace finequant {
namespace kernels {

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// CPUID leaf 7 sub-leaf `sub`: registers {eax, ebx, ecx, edx}.
std::array<unsigned, 4> cpuid7(unsigned sub) {
  std::array<unsigned, 4> r{};
  if (__get_cpuid_max(0, nullptr) < 7) return r;
  __cpuid_count(7, sub, r[0], r[1], r[2], r[3]);
  return r;
}
// The OS saves the ymm state (XCR0 bits 1, 2): needed before any VEX-256 instruction.
bool os_saves_ymm() {
  unsigned a, b, c, d;
  __cpuid(1, a, b, c, d);
  if (!(c & (1u << 27))) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0x6) == 0x6;
}
bool has_avx2() {  // with FMA and F16C (every AVX2 CPU has them; the avx2 / avxvnni kernels use both)
  // FMA and F16C from CPUID.1:ECX[12, 29]: clang's __builtin_cpu_supports does not know "f16c" (the fuzz build).
  static const bool has = __builtin_cpu_supports("avx2") && [] {
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    return (c & (1u << 12)) != 0 && (c & (1u << 29)) != 0;
  }();
  return has;
}
bool has_avx512vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}
bool has_avxvnni() {
  static const bool has = has_avx2() && os_saves_ymm() && (cpuid7(1)[0] & (1u << 4));  // CPUID.(7,1):EAX[4]
  return has;
}
bool has_avx512bf16() {
  static const bool has = has_avx512vnni() && (cpuid7(1)[0] & (1u << 5));  // CPUID.(7,1):EAX[5]
  return has;
}
// AMX-TILE and AMX-INT8 (CPUID.(7,0):EDX[24], [25]), and Linux's permission to use tile data
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), asked once per process: a kernel that
// cannot get it is never selected.
bool has_amx() {
  static const bool has = [] {
    if (!has_avx512vnni()) return false;
    const unsigned edx = cpuid7(0)[3];
    if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return has;
}
#else
bool has_avx2() { return false; }
bool has_avxvnni() { return false; }
bool has_avx512vnni() { return false; }
bool has_avx512bf16() { return false; }
bool has_amx() { return false; }
#endif
bool always() { return true; }

// -1: not forced; else the forced level.
std::atomic<int> g_forced{-1};

}  // namespace

const std::vector<IsaInfo>& isa_table() {
  static const std::vector<IsaInfo> table = {
      {CpuIsa::Ref, "ref", always, true},
      {CpuIsa::Avx2, "avx2", has_avx2, true},
      // AVX-VNNI and AMX: bit-identical to the reference on an Intel Xeon with AMX-INT8 (2026-12,
      // docs/DESIGN.md section 5.4), so on by default; a new level starts off until it has run.
      {CpuIsa::AvxVnni, "avxvnni", has_avxvnni, true},
      {CpuIsa::Avx512Vnni, "avx512vnni", has_avx512vnni, true},
      {CpuIsa::Amx, "amx", has_amx, true},
  };
  return table;
}

bool cpu_has_avx512_bf16() { return has_avx512bf16(); }
bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = has_amx() && has_avx512bf16() && (cpuid7(0)[3] & (1u << 22));
  return has;
#else
  return false;
#endif
}

const char* isa_name(CpuIsa isa) { return isa_table()[static_cast<size_t>(isa)].name; }
bool cpu_supports(CpuIsa isa) { return isa_table()[static_cast<size_t>(isa)].supported(); }

bool kernel_eligible(CpuIsa level, CpuIsa active) {
  const IsaInfo& i = isa_table()[static_cast<size_t>(level)];
  return level <= active && i.supported() && (i.on_by_default || level == active);
}

CpuIsa best_supported_isa() {
  CpuIsa best = CpuIsa::Ref;
  for (const IsaInfo& i : isa_table())
    if (i.on_by_default && i.supported()) best = i.level;
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
