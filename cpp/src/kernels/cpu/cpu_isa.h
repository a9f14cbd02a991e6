// CPU instruction-set levels (docs/DESIGN.md section 5.4): detection, names and selection in one
// place. Levels are ordered; each kernel family (integer GEMM, FP32 GEMM, attention) registers
// implementations at some levels and runs the best one at or below the active level that this CPU
// supports, so a new level never silently sends a family back to the reference loops.
#pragma once
#include <string>
#include <vector>

namespace finequant {
namespace kernels {

enum class CpuIsa : int {
  Ref = 0,         // portable loops (auto-vectorized for x86-64-v2/v3/v4 where it pays: multiversion.h)
  Avx2 = 1,        // avx2
  AvxVnni = 2,     // avx2 + avx-vnni (ymm vpdpbusd/vpdpwssd, VEX): Alder Lake, Zen 5 client, Sierra Forest
  Avx512Vnni = 3,  // avx512f, bw, dq, vl, vnni
  Amx = 4,         // the above + amx-tile, amx-int8, and the OS's permission for tile data
};

struct IsaInfo {
  CpuIsa level;
  const char* name;  // what FINEQUANT_ISA, force_isa and Python's set_isa accept
  bool (*supported)();  // the CPU has every feature of the level
  // Chosen without being asked for. A level whose kernels have not yet run on a CPU that has it
  // (so were verified only against the emulation of their instructions) is used only when forced.
  bool on_by_default;
};

// Every level, lowest first: the one table of names.
const std::vector<IsaInfo>& isa_table();
const char* isa_name(CpuIsa isa);
bool cpu_supports(CpuIsa isa);
CpuIsa best_supported_isa();  // of the levels on by default

// AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16: CPUID.(7,1):EAX[5]) with AVX512-VNNI: the bf16 FP32-path
// kernel's features (a precision option, not a level).
bool cpu_has_avx512_bf16();
// AMX-BF16 (tdpbf16ps: CPUID.(7,0):EDX[22]) on a CPU with the amx level (tile data permitted).
bool cpu_has_amx_bf16();

// The active level: the forced one (force_isa), else FINEQUANT_ISA, else the best supported level
// that is on by default; a level the CPU lacks falls back to the highest supported level below it. Kernel choices follow the active
// level when a weight is prepared (GEMMs) or when an op runs (attention, norms).
CpuIsa active_isa();
// "auto" clears a forced level; throws InvalidArgument naming the known levels for anything else.
void force_isa(const std::string& name);

// Whether a kernel of `level` may run when `active` is the active level: at or below it, supported
// by the CPU, and on by default unless it is the active level itself (so that forcing a level
// tries its kernels, but never another level's unverified ones).
bool kernel_eligible(CpuIsa level, CpuIsa active);

// The best entry of a kernel family for the active level: the highest eligible `level`. Every
// family has a Ref entry.
template <class Kernel>
const Kernel& select_kernel(const std::vector<Kernel>& family, CpuIsa active) {
  const Kernel* best = nullptr;
  for (const Kernel& k : family)
    if (kernel_eligible(k.level, active) && (!best || k.level > best->level)) best = &k;
  return *best;
}

}  // namespace kernels
}  // namespace finequant
