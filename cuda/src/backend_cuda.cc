// The CUDA backend (docs/DESIGN.md section 5.3): the kernel record of kernels/backend.h over the
// launchers of cuda/src/kernels.h. Integer weights are packed once at load into the signed,
// block-padded layout (cuda/src/host/layout.h) and uploaded; each GEMM quantizes its input rows
// token-wise on the device (with a fused norm for pre-LN blocks), then runs the best kernel:
//   one K-block: CUTLASS (sm90a wgmma for W8A8 on Hopper, else the sm80 IMMA kernels, M-bucketed);
//   K-blocks (INT4 default), or a shape CUTLASS does not take: the blocked mma.sync kernel.
// On sm90 INT4 x INT4 MMA is emulated by the hardware, so W4A4 runs with the 4-bit activation
// values stored as int8 through the mixed int8 x int4 kernel (identical integers, native speed).
#include <cuda_runtime.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/src/backend_cuda.h"
#include "cuda/src/host/layout.h"
#include "cuda/src/kernels.h"
#include "kernels/backend.h"

namespace finequant {
namespace cuda {

namespace {

using kernels::AttentionArgs;
using kernels::GemmInput;
using kernels::HeadView;
using kernels::LinearWeights;
using kernels::NormParams;
using kernels::PreparedLinear;

template <class T>
Tensor upload(const std::vector<T>& v, DType dtype, Device device) {
  return Tensor::borrow(const_cast<T*>(v.data()), dtype, {static_cast<int64_t>(v.size())}).to(device);
}

NormDev norm_dev(const NormParams& n) {
  return NormDev{n.kind == NormParams::Kind::LayerNorm ? 0 : 1, n.weight, n.bias, n.eps};
}

HeadViewDev view_dev(const HeadView& v) { return HeadViewDev{v.data, v.sb, v.sh, v.st}; }

class CudaF32Linear final : public PreparedLinear {
 public:
  Tensor w;  // F32 [N, K] on the device
};

class CudaIntLinear final : public PreparedLinear {
 public:
  Tensor w, sw, zw, cm;  // the packed layout on the device (layout.h)
  KBlocks kb;
  int bits = 8;
  bool symmetric = true;
  QuantSpec act;

  IntWeightDev view() const {
    IntWeightDev d;
    d.w = w.raw();
    d.sw = sw.data<float>();
    d.zw = zw.data<int32_t>();
    d.cm = cm.data<int32_t>();
    d.N = N;
    d.K = kb.K;
    d.G = kb.G;
    d.Gp = kb.Gp;
    d.nb = kb.nb;
    d.Kp = kb.Kp;
    d.bits = bits;
    d.symmetric = symmetric;
    return d;
  }
};

class CudaBackend final : public kernels::Backend {
 public:
  explicit CudaBackend(int index) : index_(index) {
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, index), "cudaGetDeviceProperties");
    sm_ = prop.major * 10 + prop.minor;
    name_ = "cuda:" + std::to_string(index) + " " + prop.name + " (sm" + std::to_string(sm_) + ")";
    FQ_CHECK(sm_ >= 80, ErrorKind::Unsupported,
             name_ + ": finequant's CUDA kernels need compute capability 8.0 or newer (Ampere, Ada, Hopper)");
  }

  Device device() const override { return Device::cuda(index_); }
  std::string name() const override { return name_; }

  ExecContext context(ThreadPool& pool) const override {
    check(cudaSetDevice(index_), "cudaSetDevice");
    ExecContext ctx;
    ctx.backend = this;
    ctx.device = device();
    ctx.pool = &pool;
    ctx.stream = current_stream(index_);
    return ctx;
  }

  void finish(const ExecContext& ctx) const override {
    check(cudaStreamSynchronize(stream(ctx)), "the call's kernels");
    int32_t bad = -1;
    check(cudaMemcpy(&bad, bad_row_device(), sizeof bad, cudaMemcpyDeviceToHost), "reading the NaN flag");
    if (bad >= 0) {
      const int32_t reset = -1;
      check(cudaMemcpy(bad_row_device(), &reset, sizeof reset, cudaMemcpyHostToDevice), "resetting the NaN flag");
      fail(ErrorKind::InvalidArgument,
           "input contains NaN or Inf (or an unrepresentable range) in row " + std::to_string(bad) + " of a GEMM input");
    }
  }

  std::unique_ptr<PreparedLinear> prepare_linear(const LinearWeights& lw, ThreadPool&) const override {
    check(cudaSetDevice(index_), "cudaSetDevice");
    const Device dev = device();
    std::unique_ptr<PreparedLinear> p;
    if (lw.quantized() && lw.act.bits != 0) {
      auto q = std::make_unique<CudaIntLinear>();
      const PackedIntWeight packed = pack_int_weight(lw.weight);
      q->N = packed.N;
      q->K = packed.kb.K;
      q->kb = packed.kb;
      q->bits = packed.bits;
      q->symmetric = packed.symmetric;
      q->act = lw.act;
      q->w = upload(packed.w, DType::U8, dev);
      q->sw = upload(packed.sw, DType::F32, dev);
      q->zw = upload(packed.zw, DType::I32, dev);
      q->cm = upload(packed.cm, DType::I32, dev);
      q->kernel = "cuda/" + std::string(packed.kb.nb == 1 ? "cutlass" : "blocked") + " w" +
                  std::to_string(packed.bits) + "a" + std::to_string(lw.act.bits);
      p = std::move(q);
    } else {
      const LinearWeights f = lw.quantized() ? lw.dequantized() : lw;
      auto fp = std::make_unique<CudaF32Linear>();
      fp->N = f.out_features();
      fp->K = f.in_features();
      fp->w = f.weight_f32.to(dev);
      fp->kernel = "cuda/cutlass-simt f32";
      p = std::move(fp);
    }
    p->epilogue = lw.epilogue;
    p->bias = lw.bias.to(dev);
    return p;
  }

  void linear(const ExecContext& ctx, const GemmInput& in, const PreparedLinear& w, Tensor& y) const override {
    const int64_t M = in.x.dim(0), K = in.x.dim(1);
    if (M == 0) return;
    if (in.rotation) {  // the rows (normalized first) rotated into a buffer of the call, then plain rows
      Tensor rows = Tensor::empty(DType::F32, in.x.shape(), ctx.device);
      const float* x = in.x.data<float>();
      if (in.norm) {
        norm_rows(x, M, K, norm_dev(*in.norm), rows.data<float>(), stream(ctx));
        x = rows.data<float>();
      }
      cuda::hadamard(x, rows.data<float>(), M, K, in.rotation, stream(ctx));
      linear(ctx, GemmInput{rows}, w, y);
      return;
    }
    const float* bias = w.bias.defined() ? w.bias.data<float>() : nullptr;
    if (const auto* f = dynamic_cast<const CudaF32Linear*>(&w)) {
      Tensor normed;
      const float* x = in.x.data<float>();
      if (in.norm) {
        normed = Tensor::empty(DType::F32, in.x.shape(), ctx.device);
        norm_rows(x, M, K, norm_dev(*in.norm), normed.data<float>(), stream(ctx));
        x = normed.data<float>();
      }
      gemm_f32(x, M, K, f->w.data<float>(), w.N, bias, w.epilogue, y.data<float>(), stream(ctx));
      return;
    }
    const auto& q = static_cast<const CudaIntLinear&>(w);
    const IntWeightDev wd = q.view();
    const GemmOutDev out{y.data<float>(), w.N, bias, w.epilogue};
    const bool single_block = q.kb.nb == 1;
    // Packed INT4 activations feed the INT4 x INT4 tensor cores, native on sm80/86/89 only.
    const bool packed4 = single_block && q.bits == 4 && q.act.bits == 4 && sm_ < 90;
    Tensor xq;
    IntActsDev acts = quantize(ctx, in, q, packed4, xq);
    if (single_block) {
      if (sm_ >= 90 && gemm_int_cutlass_sm90(acts, wd, out, stream(ctx))) return;
      if (gemm_int_cutlass_sm80(acts, wd, out, stream(ctx))) return;
      if (packed4) acts = quantize(ctx, in, q, false, xq);  // the blocked kernel reads int8 storage
    }
    gemm_int_blocked(acts, wd, out, stream(ctx));
  }

  void norm(const ExecContext& ctx, const Tensor& x, const NormParams& n, Tensor& y) const override {
    norm_rows(x.data<float>(), x.dim(0), x.dim(1), norm_dev(n), y.data<float>(), stream(ctx));
  }

  void add(const ExecContext& ctx, Tensor& x, const Tensor& y) const override {
    add_inplace(x.data<float>(), y.data<float>(), x.numel(), stream(ctx));
  }

  void hadamard(const ExecContext& ctx, const Tensor& x, Tensor& y, int64_t block) const override {
    cuda::hadamard(x.data<float>(), y.data<float>(), x.dim(0), x.dim(1), block, stream(ctx));
  }

  void gated_mul(const ExecContext& ctx, kernels::GateActivation act, const float* gate, int64_t gate_stride,
                 const float* up, int64_t up_stride, float* out, int64_t M, int64_t I) const override {
    cuda::gated_mul(act == kernels::GateActivation::GeluTanh, gate, gate_stride, up, up_stride, out, M, I, stream(ctx));
  }

  void softcap(const ExecContext& ctx, Tensor& x, float cap) const override {
    cuda::softcap(x.data<float>(), x.numel(), cap, stream(ctx));
  }

  void rope(const ExecContext& ctx, float* x, int64_t row_stride, int64_t M, int64_t heads, const Tensor& inv_freq,
            const Tensor& positions) const override {
    cuda::rope(x, row_stride, M, heads, 2 * inv_freq.numel(), inv_freq.data<float>(), positions.data<int64_t>(),
               stream(ctx));
  }

  void gather_rows(const ExecContext& ctx, const Tensor& table, const Tensor& ids, Tensor& out,
                   bool add) const override {
    cuda::gather_rows(table.data<float>(), table.dim(1), ids.data<int64_t>(), ids.numel(), out.data<float>(), add,
                      stream(ctx));
  }

  void kv_append(const ExecContext& ctx, const HeadView& k, const HeadView& v, Tensor& k_cache, Tensor& v_cache,
                 int64_t past, int64_t T) const override {
    cuda::kv_append(view_dev(k), view_dev(v), k_cache.data<float>(), v_cache.data<float>(), k_cache.dim(0),
                    k_cache.dim(1), k_cache.dim(2), past, T, k_cache.dim(3), stream(ctx));
  }

  void attention(const ExecContext& ctx, const AttentionArgs& a) const override {
    cuda::attention(view_dev(a.q), view_dev(a.k), view_dev(a.v), a.out, a.B, a.H, a.KVH, a.Tq, a.Tk, a.D, a.key_valid,
                    a.key_valid_stride, a.causal_offset, a.scale, a.window, a.query_positions, a.key_positions,
                    a.softcap, stream(ctx));
  }

 private:
  static cudaStream_t stream(const ExecContext& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

  // The input rows of an integer GEMM, quantized on the device into fresh buffers (xq keeps them).
  IntActsDev quantize(const ExecContext& ctx, const GemmInput& in, const CudaIntLinear& q, bool packed4,
                      Tensor& xq) const {
    const int64_t M = in.x.dim(0), K = in.x.dim(1);
    const int64_t row_bytes = packed4 ? q.kb.Kp / 2 : q.kb.Kp;  // a multiple of 16
    // One allocation for the rows and their tables, each table starting 16-byte aligned (the
    // kernels load them as vectors): sx [M], zx [M], rs [M, nb], each padded to 4 entries.
    const int64_t Mp = (M + 3) / 4 * 4, tables = 4 * (2 * Mp + (M * q.kb.nb + 3) / 4 * 4);
    xq = Tensor::empty(DType::U8, {M * row_bytes + tables}, ctx.device);
    uint8_t* base = static_cast<uint8_t*>(xq.raw());
    IntActsDev a;
    a.xq = base;
    a.sx = reinterpret_cast<float*>(base + M * row_bytes);
    a.zx = reinterpret_cast<int32_t*>(a.sx + Mp);
    a.rs = a.zx + Mp;
    a.M = M;
    a.bits = q.act.bits;
    a.symmetric = q.act.symmetric;
    a.packed4 = packed4;
    const NormDev norm = in.norm ? norm_dev(*in.norm) : NormDev{};
    quantize_rows(in.x.data<float>(), K, M, K, in.norm ? &norm : nullptr, q.kb.G, q.kb.Gp, q.kb.nb, a,
                  bad_row_device(), stream(ctx));
    return a;
  }

  // A device int32 per thread, -1 until a quantization meets NaN/Inf (finish() reads and resets it).
  int32_t* bad_row_device() const {
    thread_local std::vector<int32_t*> flags;
    if (static_cast<int>(flags.size()) <= index_) flags.resize(static_cast<size_t>(index_) + 1, nullptr);
    if (!flags[index_]) {
      int32_t* p = nullptr;
      check(cudaMalloc(&p, sizeof(int32_t)), "cudaMalloc");
      const int32_t init = -1;
      check(cudaMemcpy(p, &init, sizeof init, cudaMemcpyHostToDevice), "cudaMemcpy");
      flags[index_] = p;
    }
    return flags[index_];
  }

  int index_;
  int sm_ = 0;
  std::string name_;
};

}  // namespace
}  // namespace cuda

namespace kernels {

const Backend& cuda_backend(int index) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<cuda::CudaBackend>>* backends = new std::vector<std::unique_ptr<cuda::CudaBackend>>;
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(backends->size()) <= index) backends->resize(static_cast<size_t>(index) + 1);
  if (!(*backends)[index]) (*backends)[index] = std::make_unique<cuda::CudaBackend>(index);
  return *(*backends)[index];
}

}  // namespace kernels
}  // namespace finequant
