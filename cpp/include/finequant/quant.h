// The math contract (DESIGN.md section 2) in plain C++: the reference every kernel and the Python
// fake-quant ops are tested against. Round half to even, fp32 scales, one scale per tile.
#pragma once
#include <cstdint>

#include "finequant/tensor.h"

namespace finequant {

struct QuantSpec {
  int bits = 8;           // 8 or 4
  bool symmetric = true;  // symmetric: signed q, no zero point; asymmetric: unsigned q with zero point
};

// A scale covers a tile of `rows` x `cols` elements of a 2-D tensor [R, C]:
//   per-tensor {R, C}; per-channel {1, C}; ZeroQuant groups {R / g, C}; K-blocks {1, G}.
// `rows` must divide R. `cols` may leave a shorter last block when it does not divide C
// (e.g. K = 576 with K-blocks of 128), so the scale grid is [R / rows, ceil(C / cols)].
struct Tile {
  int64_t rows = 1;
  int64_t cols = 0;
};

struct QuantizedTensor {
  Tensor q;           // unpacked integers [R, C]: I8 when symmetric, U8 when asymmetric
  Tensor scale;       // F32 [R / rows, ceil(C / cols)]
  Tensor zero_point;  // U8, same shape as scale; undefined when symmetric
  QuantSpec spec;
  Tile tile;
};

// Largest magnitude of a quantized value: 127 / 7 (symmetric) or 255 / 15 (asymmetric, as qmax).
int quant_max(const QuantSpec& spec);

// Quantize a finite F32 2-D tensor. Throws InvalidArgument for NaN/Inf input, bits not in {4, 8},
// a tile that does not fit the shape, or (asymmetric) a value range that overflows fp32.
// half_scales: each scale is rounded to the nearest IEEE half (2^-24 if that is 0) before the zero
// point and the integers are computed from it (scale_dtype "fp16"); a scale beyond the half range throws.
QuantizedTensor quantize(const Tensor& x, QuantSpec spec, Tile tile, bool half_scales = false);
// The scale rule of half_scales: s rounded to the nearest half, 2^-24 when that rounds to zero.
// Throws InvalidArgument for s above the largest half (65504).
float round_scale_to_half(float s);

// Token-wise dynamic activation quantization: one scale (and zero point) per row of x [M, K].
QuantizedTensor quantize_rows(const Tensor& x, QuantSpec spec);

// s * (q - z) as F32 [R, C].
Tensor dequantize(const QuantizedTensor& qt);

// INT4 packing along the last dimension: element 2i in the low nibble of byte i, 2i+1 in the high.
// Input I8 in [-8, 7] (two's complement nibbles) or U8 in [0, 15]; C must be even. Output U8 [R, C/2].
Tensor pack_int4(const Tensor& q);
// Inverse of pack_int4: U8 [R, C/2] -> I8 [R, C] (is_signed) or U8 [R, C].
Tensor unpack_int4(const Tensor& packed, bool is_signed);

}  // namespace finequant
