// The CPU backend: the kernel record of kernels/backend.h over the registered CPU kernels. GEMM
// weights are prepared by the best integer / FP32 kernel for the active level (cpu_isa.h) and run
// themselves; attention takes its inner products from the best registered kernel per call.
#include <cstdlib>
#include <string>

#include "kernels/backend.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/gemm.h"

namespace finequant {
namespace kernels {

namespace {

// Calls of at most this many rows (decode) have the pool's idle threads prefetch the next weight
// (DESIGN 5.5); FINEQUANT_IDLE_PREFETCH=0 turns that off.
constexpr int64_t kIdlePrefetchRows = 8;
bool idle_prefetch() {
  static const bool on = [] {
    const char* e = std::getenv("FINEQUANT_IDLE_PREFETCH");
    return !(e && e[0] == '0');
  }();
  return on;
}

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu(); }
  std::string name() const override { return std::string("cpu (") + isa_name(active_isa()) + ")"; }

  ExecContext context(ThreadPool& pool) const override {
    ExecContext ctx;
    ctx.backend = this;
    ctx.device = Device::cpu();
    ctx.pool = &pool;
    return ctx;
  }
  void finish(const ExecContext&) const override {}  // CPU kernels report bad input as they run

  std::unique_ptr<PreparedLinear> prepare_linear(const LinearWeights& w, ThreadPool& pool) const override {
    const CpuIsa level = active_isa();
    std::unique_ptr<CpuLinear> p;
    std::string kernel;
    if (w.quantized() && w.act.bits != 0) {
      const IntGemmKernel& k = select_kernel(int_gemm_kernels(), level);
      p = k.prepare(make_int_weight(w.weight, w.act, pool), pool);
      kernel = std::string("cpu/") + isa_name(k.level) + " int";
    } else {
      const LinearWeights f = w.quantized() ? w.dequantized() : w;
      if (w.precision == FloatPrecision::BF16 && bf16_kernel_eligible(level)) {
        p = f32_gemm_bf16_avx512().prepare(f.weight_f32, pool);
        kernel = "cpu/avx512bf16 bf16";
      } else {
        const F32GemmKernel& k = select_kernel(f32_gemm_kernels(), level);
        p = k.prepare(f.weight_f32, pool);
        kernel = std::string("cpu/") + isa_name(k.level) + " f32";
      }
    }
    p->epilogue = w.epilogue;
    p->bias = w.bias;
    if (p->kernel.empty()) p->kernel = kernel;  // a kernel that handed the weight on names the one that runs it
    return p;
  }

  void linear(const ExecContext& ctx, const GemmInput& in, const PreparedLinear& w, Tensor& y) const override {
    const RowInput rows{in.x.data<float>(), in.x.dim(0), in.x.dim(1), in.norm, row_rotation(in.rotation, in.x.dim(1))};
    if (rows.rows == 0) return;
    if (in.next && rows.rows <= kIdlePrefetchRows && idle_prefetch()) {
      const std::vector<MemorySpan>& next = static_cast<const CpuLinear*>(in.next)->streamed;
      ctx.threads().prefetch_when_idle(next.data(), static_cast<int>(next.size()));
    }
    static_cast<const CpuLinear&>(w).run(ctx, rows, y.data<float>());
  }

  void norm(const ExecContext& ctx, const Tensor& x, const NormParams& norm, Tensor& y) const override {
    normalize_rows(norm, x.data<float>(), x.dim(0), y.data<float>(), ctx.threads());
  }

  void add(const ExecContext& ctx, Tensor& x, const Tensor& y) const override {
    add_inplace(x.data<float>(), y.data<float>(), x.numel(), ctx.threads());
  }

  void hadamard(const ExecContext& ctx, const Tensor& x, Tensor& y, int64_t block) const override {
    hadamard_rows(x.data<float>(), y.data<float>(), x.dim(0), x.dim(1), block, ctx.threads());
  }

  void gated_mul(const ExecContext& ctx, GateActivation act, const float* gate, int64_t gate_stride, const float* up,
                 int64_t up_stride, float* out, int64_t M, int64_t I) const override {
    kernels::gated_mul(act, gate, gate_stride, up, up_stride, out, M, I, ctx.threads());
  }

  void softcap(const ExecContext& ctx, Tensor& x, float cap) const override {
    kernels::softcap(x.data<float>(), x.numel(), cap, ctx.threads());
  }

  void rope(const ExecContext& ctx, float* x, int64_t row_stride, int64_t M, int64_t heads, const Tensor& inv_freq,
            const Tensor& positions) const override {
    kernels::rope(x, row_stride, M, heads, inv_freq.data<float>(), inv_freq.numel(), positions.data<int64_t>(),
                  ctx.threads());
  }

  void gather_rows(const ExecContext&, const Tensor& table, const Tensor& ids, Tensor& out, bool add) const override {
    kernels::gather_rows(table.data<float>(), table.dim(1), ids.data<int64_t>(), ids.numel(), out.data<float>(), add);
  }

  void kv_append(const ExecContext&, const HeadView& k, const HeadView& v, Tensor& k_cache, Tensor& v_cache,
                 int64_t past, int64_t T) const override {
    kernels::kv_append(k, v, k_cache.data<float>(), v_cache.data<float>(), k_cache.dim(0), k_cache.dim(1),
                       k_cache.dim(2), past, T, k_cache.dim(3));
  }

  void attention(const ExecContext& ctx, const AttentionArgs& args) const override {
    kernels::attention(ctx, args, select_kernel(attention_kernels(), active_isa()));
  }
};

}  // namespace

const Backend& cpu_backend() {
  static const CpuBackend* backend = new CpuBackend;  // never destroyed: models may outlive statics
  return *backend;
}

}  // namespace kernels
}  // namespace finequant
