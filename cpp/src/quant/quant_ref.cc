// Reference quantization: the math contract (DESIGN.md section 2) written as plainly as possible.
// Every optimized kernel and the Python fake-quant ops are tested against these loops.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "finequant/quant.h"

#include "core/convert.h"

namespace finequant {

namespace {

void check_bits(int bits) { FQ_CHECK_ARG(bits == 4 || bits == 8, "bits must be 4 or 8, got " + std::to_string(bits)); }

std::string pos_str(int64_t r, int64_t c) { return "[" + std::to_string(r) + ", " + std::to_string(c) + "]"; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_tile(const Shape& shape, Tile tile) {
  const int64_t R = shape[0], C = shape[1];
  FQ_CHECK_ARG(tile.rows >= 1 && R % tile.rows == 0,
               "group of " + std::to_string(tile.rows) + " rows does not divide " + std::to_string(R) + " rows");
  FQ_CHECK_ARG(tile.cols >= 1 && tile.cols <= C,
               "block of " + std::to_string(tile.cols) + " columns does not fit " + std::to_string(C) + " columns");
}

}  // namespace

int quant_max(const QuantSpec& spec) {
  check_bits(spec.bits);
  return spec.symmetric ? (1 << (spec.bits - 1)) - 1 : (1 << spec.bits) - 1;
}

float round_scale_to_half(float s) {
  const uint16_t h = float_to_half(s);
  FQ_CHECK_ARG((h & 0x7c00u) != 0x7c00u, "weight scale " + std::to_string(s) +
                                             " is beyond the fp16 range (65504): use scale_dtype fp32");
  const float r = half_to_float(h);
  return r == 0.0f ? 0x1p-24f : r;
}

QuantizedTensor quantize(const Tensor& x, QuantSpec spec, Tile tile, bool half_scales) {
  check_bits(spec.bits);
  FQ_CHECK_ARG(x.defined() && x.ndim() == 2 && x.dtype() == DType::F32,
               std::string("quantize expects a 2-D F32 tensor, got ") + (x.defined() ? dtype_name(x.dtype()) : "undefined") +
                   " " + shape_str(x.shape()));
  check_tile(x.shape(), tile);
  const int64_t R = x.dim(0), C = x.dim(1);
  const float* xp = x.data<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      FQ_CHECK_ARG(std::isfinite(xp[r * C + c]), "input contains NaN or Inf at " + pos_str(r, c));

  const int64_t grid_rows = R / tile.rows, grid_cols = ceil_div(C, tile.cols);
  const float qmax = static_cast<float>(quant_max(spec));

  QuantizedTensor out;
  out.spec = spec;
  out.tile = tile;
  out.q = Tensor::empty(spec.symmetric ? DType::I8 : DType::U8, {R, C});
  out.scale = Tensor::empty(DType::F32, {grid_rows, grid_cols});
  if (!spec.symmetric) out.zero_point = Tensor::empty(DType::U8, {grid_rows, grid_cols});

  for (int64_t gr = 0; gr < grid_rows; ++gr) {
    for (int64_t gc = 0; gc < grid_cols; ++gc) {
      const int64_t r0 = gr * tile.rows, r1 = r0 + tile.rows;
      const int64_t c0 = gc * tile.cols, c1 = std::min(C, c0 + tile.cols);
      float lo = 0.0f, hi = 0.0f, amax = 0.0f;  // the asymmetric range always includes zero
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const float v = xp[r * C + c];
          lo = std::min(lo, v);
          hi = std::max(hi, v);
          amax = std::max(amax, std::fabs(v));
        }

      float s, z = 0.0f;
      if (spec.symmetric) {
        s = amax / qmax;
      } else {
        const float range = hi - lo;
        FQ_CHECK_ARG(std::isfinite(range), "value range overflows float32 in the tile at " + pos_str(r0, c0));
        s = range / qmax;
      }
      if (s == 0.0f) s = 1.0f;  // all-zero tile (or underflow): never divide by zero
      if (half_scales) s = round_scale_to_half(s);
      if (!spec.symmetric) z = std::clamp(std::nearbyint(-lo / s), 0.0f, qmax);

      out.scale.data<float>()[gr * grid_cols + gc] = s;
      if (!spec.symmetric) out.zero_point.data<uint8_t>()[gr * grid_cols + gc] = static_cast<uint8_t>(z);

      // Clamp in float before the integer cast: x / s may be huge (or inf) for a tiny s.
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const float v = xp[r * C + c];
          if (spec.symmetric) {
            out.q.data<int8_t>()[r * C + c] = static_cast<int8_t>(std::clamp(std::nearbyint(v / s), -qmax, qmax));
          } else {
            out.q.data<uint8_t>()[r * C + c] = static_cast<uint8_t>(std::clamp(std::nearbyint(v / s) + z, 0.0f, qmax));
          }
        }
    }
  }
  return out;
}

QuantizedTensor quantize_rows(const Tensor& x, QuantSpec spec) {
  FQ_CHECK_ARG(x.defined() && x.ndim() == 2, "quantize_rows expects a 2-D tensor, got " + shape_str(x.shape()));
  return quantize(x, spec, Tile{1, x.dim(1)});
}

Tensor dequantize(const QuantizedTensor& qt) {
  check_bits(qt.spec.bits);
  const Tensor& q = qt.q;
  FQ_CHECK_ARG(q.defined() && q.ndim() == 2, "dequantize expects 2-D integers, got " + shape_str(q.shape()));
  const DType want = qt.spec.symmetric ? DType::I8 : DType::U8;
  FQ_CHECK_ARG(q.dtype() == want, std::string("dequantize expects q of dtype ") + dtype_name(want) + ", got " +
                                      dtype_name(q.dtype()));
  check_tile(q.shape(), qt.tile);
  const int64_t R = q.dim(0), C = q.dim(1);
  const Shape grid = {R / qt.tile.rows, ceil_div(C, qt.tile.cols)};
  FQ_CHECK_ARG(qt.scale.defined() && qt.scale.dtype() == DType::F32 && qt.scale.shape() == grid,
               "dequantize expects an F32 scale of shape " + shape_str(grid) + ", got " + shape_str(qt.scale.shape()));
  if (!qt.spec.symmetric)
    FQ_CHECK_ARG(qt.zero_point.defined() && qt.zero_point.dtype() == DType::U8 && qt.zero_point.shape() == grid,
                 "dequantize expects a U8 zero point of shape " + shape_str(grid) + ", got " +
                     shape_str(qt.zero_point.shape()));

  Tensor out = Tensor::empty(DType::F32, {R, C});
  float* op = out.data<float>();
  const float* sp = qt.scale.data<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = (r / qt.tile.rows) * grid[1] + c / qt.tile.cols;
      int32_t qv, zv = 0;
      if (qt.spec.symmetric) {
        qv = q.data<int8_t>()[r * C + c];
      } else {
        qv = q.data<uint8_t>()[r * C + c];
        zv = qt.zero_point.data<uint8_t>()[g];
      }
      op[r * C + c] = static_cast<float>(qv - zv) * sp[g];
    }
  return out;
}

Tensor pack_int4(const Tensor& q) {
  FQ_CHECK_ARG(q.defined() && q.ndim() >= 1 && (q.dtype() == DType::I8 || q.dtype() == DType::U8),
               "pack_int4 expects an I8 or U8 tensor");
  const int64_t C = q.dim(-1);
  FQ_CHECK_ARG(C % 2 == 0, "INT4 packing needs an even number of columns, got " + std::to_string(C));
  const bool is_signed = q.dtype() == DType::I8;
  Shape out_shape = q.shape();
  out_shape.back() = C / 2;
  Tensor out = Tensor::empty(DType::U8, out_shape);
  const int64_t n = q.numel();
  const uint8_t* in = static_cast<const uint8_t*>(q.raw());
  uint8_t* op = out.data<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int v = is_signed ? static_cast<int8_t>(in[i]) : in[i];
    const bool ok = is_signed ? (v >= -8 && v <= 7) : (v <= 15);
    FQ_CHECK_ARG(ok, "value " + std::to_string(v) + " at flat index " + std::to_string(i) + " does not fit an " +
                         (is_signed ? "signed" : "unsigned") + " INT4 nibble");
  }
  for (int64_t i = 0; i < n / 2; ++i)
    op[i] = static_cast<uint8_t>((in[2 * i] & 0x0F) | ((in[2 * i + 1] & 0x0F) << 4));
  return out;
}

Tensor unpack_int4(const Tensor& packed, bool is_signed) {
  FQ_CHECK_ARG(packed.defined() && packed.ndim() >= 1 && packed.dtype() == DType::U8,
               "unpack_int4 expects a U8 tensor");
  Shape out_shape = packed.shape();
  out_shape.back() *= 2;
  Tensor out = Tensor::empty(is_signed ? DType::I8 : DType::U8, out_shape);
  const uint8_t* in = packed.data<uint8_t>();
  uint8_t* op = static_cast<uint8_t*>(out.raw());
  for (int64_t i = 0, n = packed.numel(); i < n; ++i) {
    uint8_t lo = in[i] & 0x0F, hi = in[i] >> 4;
    if (is_signed) {  // sign-extend the nibble: 8..15 -> -8..-1
      op[2 * i] = static_cast<uint8_t>(static_cast<int8_t>(lo << 4) >> 4);
      op[2 * i + 1] = static_cast<uint8_t>(static_cast<int8_t>(hi << 4) >> 4);
    } else {
      op[2 * i] = lo;
      op[2 * i + 1] = hi;
    }
  }
  return out;
}

}  // namespace finequant
