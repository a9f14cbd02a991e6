// AVX2 integer GEMM on the AVX-VNNI kernel's layout (gemm_int_avxvnni.cc: 4 k per int32 lane, INT4
// kept as nibbles, the operand shifts), for the schemes where vpmaddubsw + vpmaddwd compute its
// vpdpbusd exactly: INT4 weights (a pair of products is at most 2 x 255 x 15) and symmetric INT8
// weights (stored unshifted) with symmetric activations (|w| x sign-applied x: at most 2 x 128 x 127)
// or with asymmetric ones where no weight is -128 (|x - 128| x sign-applied w, the same bound; the
// epilogue adds back 128 colsum). Per 4 k of 8 channels one multiply-add chain instead of the widening path of
// gemm_int_avx2.cc, whose prepare hands these schemes here (docs/DESIGN.md section 5.4);
// bit-identical to gemm_int_ref.
#define FQ_AVX2_MADDUBS 1
#include "kernels/cpu/gemm_int_avxvnni.cc"
