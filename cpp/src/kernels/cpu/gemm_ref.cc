// Reference CPU GEMMs: straightforward loops, OpenMP over output columns (each thread owns
// whole weight rows, which is the memory that matters for small M).
#include <algorithm>
#include <cmath>

#include "kernels/cpu/act_math.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/multiversion.h"

// The loops below are written so that the compiler vectorizes them (FQ_MULTIVERSION); the
// hand-tuned kernels of kernels/cpu/ replace them where it matters.
namespace finequant {
namespace kernels {

float apply_epilogue(Epilogue e, float v) {
  switch (e) {
    case Epilogue::None:
      return v;
    case Epilogue::GeluErf:
      return actmath::gelu_erf(v);
    case Epilogue::GeluTanh:
      return actmath::gelu_tanh(v);
  }
  return v;
}

FQ_MULTIVERSION void gemm_f32_ref(const float* x, int64_t M, const F32Weight& fw, const float* bias, float* y,
                                  Epilogue epilogue) {
  const int64_t N = fw.N, K = fw.K;
  const float* w = fw.w.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)  // lets the compiler reassociate: a vectorized dot product
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * wn[k];
      if (bias) acc += bias[n];
      y[m * N + n] = apply_epilogue(epilogue, acc);
    }
  }
}

F32Weight prepare_f32_weight(Tensor w) {
  F32Weight fw;
  fw.N = w.dim(0);
  fw.K = w.dim(1);
  fw.w = std::move(w);
  if (active_isa() == Isa::Avx512Vnni) {
    constexpr int64_t kTile = 64;
    const int64_t tiles = (fw.N + kTile - 1) / kTile, K = fw.K;
    fw.packed.assign(static_cast<size_t>(tiles * kTile * K), 0.f);
    const float* src = fw.w.data<float>();
    for (int64_t n = 0; n < fw.N; ++n)
      for (int64_t k = 0; k < K; ++k)
        fw.packed[static_cast<size_t>(((n / kTile) * K + k) * kTile + n % kTile)] = src[n * K + k];
    fw.w = Tensor();  // one copy in memory
  }
  return fw;
}

GemmF32Fn select_gemm_f32() { return active_isa() == Isa::Avx512Vnni ? gemm_f32_avx512 : gemm_f32_ref; }

IntWeight prepare_int_weight(Tensor q, Tensor scale, Tensor zero_point, int64_t tile_rows, int64_t tile_cols,
                             int bits, QuantSpec act) {
  IntWeight w;
  w.bits = bits;
  w.act = act;
  w.N = q.dim(0);
  w.K = q.dim(1);
  w.tile_rows = tile_rows;
  w.tile_cols = tile_cols > 0 ? tile_cols : w.K;
  w.num_blocks = (w.K + w.tile_cols - 1) / w.tile_cols;
  w.colsum.assign(static_cast<size_t>(w.N * w.num_blocks), 0);
  auto sums = [&](const auto* data) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < w.N; ++n)
      for (int64_t b = 0; b < w.num_blocks; ++b) {
        const int64_t k0 = b * w.tile_cols, k1 = std::min(w.K, k0 + w.tile_cols);
        int32_t s = 0;
        for (int64_t k = k0; k < k1; ++k) s += data[n * w.K + k];
        w.colsum[n * w.num_blocks + b] = s;
      }
  };
  if (q.dtype() == DType::I8) sums(q.data<int8_t>());
  else sums(q.data<uint8_t>());
  w.q = std::move(q);
  w.scale = std::move(scale);
  w.zero_point = std::move(zero_point);
  if (active_isa() == Isa::Avx512Vnni) prepare_int_weight_avx512vnni(w);
  if (active_isa() == Isa::Avx2) prepare_int_weight_avx2(w);
  return w;
}

namespace {

// TX, TW: int8_t (symmetric) or uint8_t (asymmetric) storage of the integer values.
template <class TX, class TW>
FQ_MULTIVERSION void gemm_int_quantized_typed(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                        Epilogue epilogue) {
  const int64_t M = x.q.dim(0), K = w.K, N = w.N, nb = w.num_blocks, bk = w.tile_cols;
  const TX* xq = static_cast<const TX*>(x.q.raw());
  const TW* wq = static_cast<const TW*>(w.q.raw());
  const float* sx = x.scale.data<float>();  // [M, 1]
  const uint8_t* zx = x.zero_point.defined() ? x.zero_point.data<uint8_t>() : nullptr;
  const float* sw = w.scale.data<float>();  // [N / rows, nb]
  const uint8_t* zw = w.zero_point.defined() ? w.zero_point.data<uint8_t>() : nullptr;

  // rowsum_x per K-block, computed alongside the quantized activations.
  std::vector<int32_t> rowsum(static_cast<size_t>(M * nb), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) rowsum[m * nb + k / bk] += static_cast<int32_t>(xq[m * K + k]);

#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const TW* wn = wq + n * K;
    const int64_t g = n / w.tile_rows;  // scale row of this output channel
    for (int64_t m = 0; m < M; ++m) {
      const TX* xm = xq + m * K;
      const int32_t zxm = zx ? zx[m] : 0;
      float out = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bk, k1 = std::min(K, k0 + bk);
        int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = k0; k < k1; ++k) acc += static_cast<int32_t>(xm[k]) * static_cast<int32_t>(wn[k]);
        const int32_t zwb = zw ? zw[g * nb + b] : 0;
        // Exact integer correction (int64 so that no intermediate can overflow), then fp32 scales.
        const int64_t corrected = int64_t{acc} - int64_t{zxm} * w.colsum[n * nb + b] -
                                  int64_t{zwb} * rowsum[m * nb + b] + (k1 - k0) * int64_t{zxm} * zwb;
        out += sx[m] * sw[g * nb + b] * static_cast<float>(corrected);
      }
      if (bias) out += bias[n];
      y[m * N + n] = apply_epilogue(epilogue, out);
    }
  }
}

}  // namespace

void gemm_int_quantized_ref(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                            Epilogue epilogue) {
  const bool xs = x.q.dtype() == DType::I8, ws = w.q.dtype() == DType::I8;
  if (xs && ws) gemm_int_quantized_typed<int8_t, int8_t>(x, w, bias, y, epilogue);
  else if (xs) gemm_int_quantized_typed<int8_t, uint8_t>(x, w, bias, y, epilogue);
  else if (ws) gemm_int_quantized_typed<uint8_t, int8_t>(x, w, bias, y, epilogue);
  else gemm_int_quantized_typed<uint8_t, uint8_t>(x, w, bias, y, epilogue);
}

void gemm_int_ref(const RowSource& x, const IntWeight& w, const float* bias, float* y, Epilogue epilogue) {
  gemm_int_quantized_ref(quantize_rows(x.materialize(), w.act), w, bias, y, epilogue);
}

Tensor RowSource::materialize() const {
  Tensor t = Tensor::empty(DType::F32, {rows, cols});
  float* out = t.data<float>();
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (int64_t m = 0; m < rows; ++m) {
    const float* r = row(m, out + m * cols);
    if (r != out + m * cols) std::copy(r, r + cols, out + m * cols);
  }
  return t;
}

Tensor StoredRows::materialize() const {
  return Tensor::borrow(const_cast<float*>(data), DType::F32, {rows, cols});
}

GemmIntFn select_gemm_int() {
  switch (active_isa()) {
    case Isa::Avx512Vnni: return gemm_int_avx512vnni;
    case Isa::Avx2: return gemm_int_avx2;
    default: return gemm_int_ref;
  }
}

}  // namespace kernels
}  // namespace finequant
