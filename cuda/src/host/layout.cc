#include "cuda/src/host/layout.h"

#include <algorithm>
#include <string>

#include "finequant/error.h"

namespace finequant {
namespace cuda {

namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

int32_t value_at(const Tensor& q, int64_t i) {
  return q.dtype() == DType::I8 ? q.data<int8_t>()[i] : q.data<uint8_t>()[i];
}

// Stores a signed value of `bits` at element k of a row of `bytes` (8-bit: one byte; 4-bit: a nibble).
void store(uint8_t* row, int64_t k, int32_t v, int bits) {
  if (bits == 8) {
    row[k] = static_cast<uint8_t>(static_cast<int8_t>(v));
  } else {
    const uint8_t nib = static_cast<uint8_t>(v) & 0x0f;
    row[k / 2] = static_cast<uint8_t>(k % 2 ? (row[k / 2] & 0x0f) | (nib << 4) : (row[k / 2] & 0xf0) | nib);
  }
}

int32_t load(const uint8_t* row, int64_t k, int bits) {
  if (bits == 8) return static_cast<int8_t>(row[k]);
  const int32_t nib = (row[k / 2] >> (k % 2 ? 4 : 0)) & 0x0f;
  return nib >= 8 ? nib - 16 : nib;  // two's complement nibble
}

}  // namespace

KBlocks KBlocks::of(int64_t K, int64_t G) {
  KBlocks b;
  b.K = K;
  b.G = G <= 0 || G >= K ? K : G;
  b.nb = (K + b.G - 1) / b.G;
  b.Gp = round_up(std::max<int64_t>(b.G, 1), kBlockAlign);
  b.Kp = b.nb * b.Gp;
  return b;
}

PackedIntWeight pack_int_weight(const QuantizedTensor& qt) {
  PackedIntWeight p;
  p.N = qt.q.dim(0);
  const int64_t N = p.N, K = qt.q.dim(1), rows = qt.tile.rows;
  p.kb = KBlocks::of(K, qt.tile.cols);
  p.bits = qt.spec.bits;
  p.symmetric = qt.spec.symmetric;
  const KBlocks& kb = p.kb;
  const int32_t shift = operand_shift(p.bits, p.symmetric);
  const int64_t row_bytes = p.bits == 8 ? kb.Kp : kb.Kp / 2;
  p.w.assign(static_cast<size_t>(N * row_bytes), 0);
  p.sw.assign(static_cast<size_t>(kb.nb * N), 0.f);
  p.zw.assign(static_cast<size_t>(kb.nb * N), 0);
  p.cm.assign(static_cast<size_t>(kb.nb * N), 0);
  const int64_t grid_cols = qt.scale.dim(1);  // == nb
  for (int64_t n = 0; n < N; ++n) {
    uint8_t* row = p.w.data() + n * row_bytes;
    for (int64_t b = 0; b < kb.nb; ++b) {
      const int64_t len = kb.length(b), g = (n / rows) * grid_cols + b;
      const int32_t zw = p.symmetric ? 0 : static_cast<int32_t>(qt.zero_point.data<uint8_t>()[g]) - shift;
      int32_t colsum = 0;
      for (int64_t k = 0; k < len; ++k) {
        const int32_t v = value_at(qt.q, n * K + b * kb.G + k) - shift;
        store(row, b * kb.Gp + k, v, p.bits);
        colsum += v;
      }
      p.sw[b * N + n] = qt.scale.data<float>()[g];
      p.zw[b * N + n] = zw;
      p.cm[b * N + n] = colsum - static_cast<int32_t>(len) * zw;
    }
  }
  return p;
}

QuantizedActs quantize_rows_emulated(const float* x, int64_t M, int64_t K, QuantSpec act, int64_t G, bool packed4) {
  // The values are the reference's (quantize_rows); what the kernel adds is their layout.
  const QuantizedTensor q = quantize_rows(Tensor::borrow(const_cast<float*>(x), DType::F32, {M, K}), act);
  QuantizedActs a;
  a.M = M;
  a.kb = KBlocks::of(K, G);
  a.bits = act.bits;
  a.symmetric = act.symmetric;
  a.packed4 = packed4;
  const KBlocks& kb = a.kb;
  const int32_t shift = operand_shift(act.bits, act.symmetric);
  const int64_t row_bytes = packed4 ? kb.Kp / 2 : kb.Kp;
  a.xq.assign(static_cast<size_t>(M * row_bytes), 0);
  a.sx.assign(q.scale.data<float>(), q.scale.data<float>() + M);
  a.zx.assign(static_cast<size_t>(M), 0);
  a.rs.assign(static_cast<size_t>(M * kb.nb), 0);
  for (int64_t m = 0; m < M; ++m) {
    if (!act.symmetric) a.zx[m] = static_cast<int32_t>(q.zero_point.data<uint8_t>()[m]) - shift;
    uint8_t* row = a.xq.data() + m * row_bytes;
    for (int64_t b = 0; b < kb.nb; ++b) {
      int32_t sum = 0;
      for (int64_t k = 0; k < kb.length(b); ++k) {
        const int32_t stored = value_at(q.q, m * K + b * kb.G + k) - shift;
        store(row, b * kb.Gp + k, stored, packed4 ? 4 : 8);
        sum += stored;
      }
      a.rs[m * kb.nb + b] = sum;
    }
  }
  return a;
}

void gemm_int_emulated(const QuantizedActs& x, const PackedIntWeight& w, const float* bias, kernels::Epilogue epilogue,
                       float* y) {
  const KBlocks& kb = w.kb;
  const int64_t M = x.M, N = w.N;
  const int64_t x_bytes = x.packed4 ? kb.Kp / 2 : kb.Kp, w_bytes = w.bits == 8 ? kb.Kp : kb.Kp / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float out = 0.f;
      for (int64_t b = 0; b < kb.nb; ++b) {
        int32_t acc = 0;  // the tensor cores' int32 sum over the padded block
        for (int64_t k = b * kb.Gp; k < (b + 1) * kb.Gp; ++k)
          acc += load(x.xq.data() + m * x_bytes, k, x.packed4 ? 4 : 8) * load(w.w.data() + n * w_bytes, k, w.bits);
        const int32_t c = kernels::correct_block(acc, x.zx[m], w.cm[b * N + n], w.zw[b * N + n], x.rs[m * kb.nb + b]);
        out = kernels::accumulate_block(out, w.sw[b * N + n], c);
      }
      y[m * N + n] =
          kernels::finish_output(kernels::dequantize_sum(x.sx[m], out), bias != nullptr, bias ? bias[n] : 0.f, epilogue);
    }
}

}  // namespace cuda
}  // namespace finequant
