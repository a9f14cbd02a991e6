// The AVX-VNNI and AMX integer GEMMs compiled with their ISA instructions emulated
// (FQ_KERNEL_EMULATE: exact portable forms of vpdpbusd and of the AMX tile instructions), as
// int_gemm_avxvnni_emulated() and int_gemm_amx_emulated(), for test_gemm_emulated. Everything else
// is the kernels' own code, compiled with the library's flags (-ffp-contract=off).
#define FQ_KERNEL_EMULATE 1
#include "kernels/cpu/gemm_int_avxvnni.cc"
#include "kernels/cpu/gemm_int_amx.cc"
