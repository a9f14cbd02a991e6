// The reference integer GEMM: quantize_rows, then straightforward loops, threads over output
// channels (each thread owns whole weight rows, the memory that matters for small M). Every
// integer kernel is tested bit for bit against it. Compiled with -ffp-contract=off.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>

#include "kernels/cpu/gemm.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {
namespace kernels {

IntWeight make_int_weight(const QuantizedTensor& qt, QuantSpec act, ThreadPool& pool) {
  IntWeight w;
  w.bits = qt.spec.bits;
  w.act = act;
  w.N = qt.q.dim(0);
  w.K = qt.q.dim(1);
  w.tile_rows = qt.tile.rows;
  w.tile_cols = qt.tile.cols > 0 ? qt.tile.cols : w.K;
  w.num_blocks = (w.K + w.tile_cols - 1) / w.tile_cols;
  w.colsum.assign(static_cast<size_t>(w.N * w.num_blocks), 0);
  auto sums = [&](const auto* data) {
    parallel_for(pool, w.N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t b = 0; b < w.num_blocks; ++b) {
          const int64_t k0 = b * w.tile_cols, k1 = std::min(w.K, k0 + w.tile_cols);
          int32_t s = 0;
          for (int64_t k = k0; k < k1; ++k) s += data[n * w.K + k];
          w.colsum[n * w.num_blocks + b] = s;
        }
    });
  };
  if (qt.q.dtype() == DType::I8) sums(qt.q.data<int8_t>());
  else sums(qt.q.data<uint8_t>());
  w.q = qt.q;
  w.scale = qt.scale;
  w.zero_point = qt.zero_point;
  return w;
}

namespace {

// Output channels [n0, n1) of every row. TX, TW: int8_t (symmetric) or uint8_t (asymmetric)
// storage of the integer values.
template <class TX, class TW>
FQ_MULTIVERSION void gemm_int_quantized_channels(const QuantizedTensor& x, const IntWeight& w, const int32_t* rowsum,
                                                 const float* bias, float* y, Epilogue epilogue, int64_t n0,
                                                 int64_t n1) {
  const int64_t M = x.q.dim(0), K = w.K, N = w.N, nb = w.num_blocks, bk = w.tile_cols;
  const TX* xq = static_cast<const TX*>(x.q.raw());
  const TW* wq = static_cast<const TW*>(w.q.raw());
  const float* sx = x.scale.data<float>();  // [M, 1]
  const uint8_t* zx = x.zero_point.defined() ? x.zero_point.data<uint8_t>() : nullptr;
  const float* sw = w.scale.data<float>();  // [N / rows, nb]
  const uint8_t* zw = w.zero_point.defined() ? w.zero_point.data<uint8_t>() : nullptr;

  for (int64_t n = n0; n < n1; ++n) {
    const TW* wn = wq + n * K;
    const int64_t g = n / w.tile_rows;  // scale row of this output channel
    for (int64_t m = 0; m < M; ++m) {
      const TX* xm = xq + m * K;
      const int32_t zxm = zx ? zx[m] : 0;
      float sum = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bk, k1 = std::min(K, k0 + bk);
        int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = k0; k < k1; ++k) acc += static_cast<int32_t>(xm[k]) * static_cast<int32_t>(wn[k]);
        const int32_t zwb = zw ? zw[g * nb + b] : 0;
        // Exact integer correction (int64 so that no intermediate can overflow), then fp32 scales.
        const int64_t corrected = int64_t{acc} - int64_t{zxm} * w.colsum[n * nb + b] -
                                  int64_t{zwb} * rowsum[m * nb + b] + (k1 - k0) * int64_t{zxm} * zwb;
        sum = accumulate_block(sum, sw[g * nb + b], static_cast<int32_t>(corrected));
      }
      y[m * N + n] = finish_output(dequantize_sum(sx[m], sum), bias != nullptr, bias ? bias[n] : 0.f, epilogue);
    }
  }
}

class RefIntLinear final : public CpuLinear {
 public:
  explicit RefIntLinear(IntWeight w) : w_(std::move(w)) {
    N = w_.N;
    K = w_.K;
  }
  void run(const ExecContext& ctx, const RowInput& x, float* y) const override {
    const QuantizedTensor xq = quantize_rows(x.materialize(ctx.threads()), w_.act);
    gemm_int_quantized_ref(xq, w_, bias.defined() ? bias.data<float>() : nullptr, y, epilogue, ctx.threads());
  }

 private:
  IntWeight w_;
};

std::unique_ptr<CpuLinear> prepare_ref(IntWeight w, ThreadPool&) { return std::make_unique<RefIntLinear>(std::move(w)); }

}  // namespace

void gemm_int_quantized_ref(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                            Epilogue epilogue, ThreadPool& pool) {
  // rowsum_x per K-block, computed alongside the quantized activations.
  const int64_t M = x.q.dim(0), K = w.K, nb = w.num_blocks, bk = w.tile_cols;
  std::vector<int32_t> rowsum(static_cast<size_t>(M * nb), 0);
  auto sum_rows = [&](const auto* xq) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) rowsum[m * nb + k / bk] += static_cast<int32_t>(xq[m * K + k]);
  };
  const bool xs = x.q.dtype() == DType::I8, ws = w.q.dtype() == DType::I8;
  if (xs) sum_rows(x.q.data<int8_t>());
  else sum_rows(x.q.data<uint8_t>());
  auto channels = xs ? (ws ? gemm_int_quantized_channels<int8_t, int8_t> : gemm_int_quantized_channels<int8_t, uint8_t>)
                     : (ws ? gemm_int_quantized_channels<uint8_t, int8_t> : gemm_int_quantized_channels<uint8_t, uint8_t>);
  parallel_for(pool, w.N, 4, [&](int64_t n0, int64_t n1) { channels(x, w, rowsum.data(), bias, y, epilogue, n0, n1); });
}

void quantize_rows_into(const RowInput& x, const RowLayout& l, QuantSpec act, const QuantizedRows& out,
                        ThreadPool& pool) {
  const QuantizedTensor xq = quantize_rows(x.materialize(pool), act);  // throws on NaN / Inf rows
  const int64_t M = x.rows, K = l.K;
  auto rows = [&](const auto* q) {
    parallel_for(pool, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        uint8_t* xp = out.xp + l.row_offset(m);
        for (int64_t kk = 0; kk < l.Kp; kk += 64)
          std::memset(xp + l.chunk_offset(kk), 0, static_cast<size_t>(std::min<int64_t>(64, l.Kp - kk)));
        for (int64_t b = 0; b < l.nb; ++b) {
          const int64_t k0 = b * l.bk, kb = std::min(K, k0 + l.bk) - k0;
          for (int64_t k = 0; k < kb;) {  // the bytes as stored, in runs up to each 64-byte chunk's end
            const int64_t kk = b * l.block_padded + k, n = std::min(kb - k, 64 - (kk & 63));
            std::memcpy(xp + l.chunk_offset(kk), q + m * K + k0 + k, static_cast<size_t>(n));
            k += n;
          }
          int32_t s = 0;
          for (int64_t k = 0; k < kb; ++k) s += q[m * K + k0 + k];
          out.rowsum[m * l.nb + b] = s;
        }
        out.sx[m] = xq.scale.data<float>()[m];
        if (!act.symmetric) out.zx[m] = xq.zero_point.data<uint8_t>()[m];
      }
    });
  };
  if (xq.q.dtype() == DType::I8) rows(xq.q.data<int8_t>());
  else rows(xq.q.data<uint8_t>());
}

void quantize_rows_with(QuantizeRowFn row, const RowInput& x, const RowLayout& l, QuantSpec act,
                        const QuantizedRows& out, ThreadPool& pool) {
  const float qmax = static_cast<float>(quant_max(act));
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> bad_row{kNone};  // the first bad row, whichever thread finds it
  parallel_for(pool, x.rows, 1, [&](int64_t r0, int64_t r1) {
    thread_local AlignedVector<float> row_scratch;  // a computed row (fused producer), in L1
    row_scratch.resize(static_cast<size_t>(l.K));
    for (int64_t m = r0; m < r1; ++m)
      if (!row(x.row(m, row_scratch.data()), l, act.symmetric, qmax, out.xp + l.row_offset(m), out.rowsum + m * l.nb,
               out.sx + m, act.symmetric ? nullptr : out.zx + m)) {
        int64_t seen = bad_row.load();
        while (m < seen && !bad_row.compare_exchange_weak(seen, m)) {
        }
      }
  });
  FQ_CHECK_ARG(bad_row == kNone, "input contains NaN or Inf (or an unrepresentable range) in row " +
                                     std::to_string(bad_row.load()));
}

Tensor RowInput::materialize(ThreadPool& pool) const {
  if (!norm && !rotation) return Tensor::borrow(const_cast<float*>(x), DType::F32, {rows, cols});
  Tensor t = Tensor::empty(DType::F32, {rows, cols});
  if (norm) normalize_rows(*norm, x, rows, t.data<float>(), pool);
  if (rotation) hadamard_rows(norm ? t.data<float>() : x, t.data<float>(), rows, cols, rotation.block, pool);
  return t;
}

IntGemmKernel int_gemm_ref() { return {CpuIsa::Ref, prepare_ref}; }

}  // namespace kernels
}  // namespace finequant
