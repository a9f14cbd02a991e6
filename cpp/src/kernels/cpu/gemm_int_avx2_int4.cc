// AVX2 integer GEMM for INT4 weights: the AVX-VNNI kernel (gemm_int_avxvnni.cc: 4 k per int32 lane,
// INT4 kept as nibbles, the operand shifts) with vpdpbusd computed as vpmaddubsw + vpmaddwd, which
// is exact for INT4 weights (a pair of products is at most 2 x 255 x 15, far inside int16). Per
// 4 k of 8 channels one multiply-add chain instead of the widening path of gemm_int_avx2.cc, whose
// prepare hands INT4 weights here (docs/DESIGN.md section 5.4); bit-identical to gemm_int_ref.
#define FQ_AVX2_MADDUBS 1
#include "kernels/cpu/gemm_int_avxvnni.cc"
