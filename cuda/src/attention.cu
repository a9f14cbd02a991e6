// kv_append and attention (kernels.h) in fp32, the CPU op's semantics: grouped-query heads,
// per-sequence key mask, causal offset, sliding window by positions, scores scaled (and soft-capped)
// before the softmax (actmath::exp), zeros for a query that sees no key. Softmax is online (running
// max and sum), so results match the CPU's two-pass softmax to fp32 rounding, not bit for bit.
//   * decode (Tq <= 4): one CTA of 8 warps per (b, h, query); groups of LPK lanes take one key
//     each (a strided share of the keys), then the groups' partial softmax states are merged.
//   * prefill: one CTA of 4 warps per (b, h, block of BQ queries), FlashAttention-style: chunks of
//     32 keys and their values staged in shared memory; each warp owns BQ / 4 query rows, lane j
//     scores key j of the chunk, then accumulates its 32-strided share of the D outputs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "finequant/error.h"
#include "kernels.h"

namespace finequant {
namespace cuda {
namespace {

constexpr float kNegInf = -__builtin_huge_valf();

struct AttnParams {
  HeadViewDev q, k, v;
  float* out = nullptr;
  int64_t B = 0, H = 0, KVH = 0, Tq = 0, Tk = 0, D = 0, group = 1;
  const uint8_t* key_valid = nullptr;
  int64_t key_valid_stride = 0, causal_offset = -1;
  float scale = 1.f;
  int64_t window = 0;  // sliding window (kernels/backend.h AttentionArgs)
  const int64_t* query_positions = nullptr;
  const int64_t* key_positions = nullptr;
  float softcap = 0.f;
};

// Inside query t's sliding window (always, without one).
__device__ __forceinline__ bool in_window(const AttnParams& p, int64_t b, int64_t t, int64_t j) {
  return p.window <= 0 || p.query_positions[b * p.Tq + t] - p.key_positions[b * p.key_valid_stride + j] < p.window;
}

// The score of a dot product: scaled, then soft-capped when asked (cap * tanh(s / cap)).
__device__ __forceinline__ float score_of(const AttnParams& p, float dot) {
  const float s = dot * p.scale;
  return p.softcap > 0.f ? tanhf(s / p.softcap) * p.softcap : s;
}

// Keys seen by query t (before the mask): causal queries stop at their own position.
__device__ __forceinline__ int64_t keys_seen(const AttnParams& p, int64_t t) {
  return (p.causal_offset >= 0 ? min(p.Tk - 1, p.causal_offset + t) : p.Tk - 1) + 1;
}

// exp(a - b) for a running max a that may still be -inf (nothing accumulated yet): 0 then.
__device__ __forceinline__ float rescale(float a, float b) { return a == kNegInf ? 0.f : kernels::actmath::exp(a - b); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- decode --------------------------------------------------------------------------------
constexpr int kDecodeThreads = 256;

template <int DMAX, int LPK>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode(const AttnParams p) {
  constexpr int NPL = DMAX / LPK;                 // values of a head row per lane
  constexpr int GROUPS = kDecodeThreads / LPK;    // keys in flight per CTA
  __shared__ float s_max[GROUPS], s_sum[GROUPS], s_w[GROUPS];
  __shared__ float s_out[GROUPS][DMAX];

  const int64_t idx = blockIdx.x, t = idx % p.Tq, bh = idx / p.Tq, h = bh % p.H, b = bh / p.H;
  const int64_t kvh = h / p.group;
  const int tid = threadIdx.x, gi = tid / LPK, li = tid % LPK;
  const int64_t D = p.D;

  const float* qrow = p.q.data + b * p.q.sb + h * p.q.sh + t * p.q.st;
  float qr[NPL], o[NPL];
#pragma unroll
  for (int u = 0; u < NPL; ++u) {
    const int d = li + u * LPK;
    qr[u] = d < D ? qrow[d] : 0.f;
    o[u] = 0.f;
  }
  const int64_t n = keys_seen(p, t);
  // Null key_valid: every key valid.
  const uint8_t* valid = p.key_valid != nullptr ? p.key_valid + b * p.key_valid_stride : nullptr;
  const float* kbase = p.k.data + b * p.k.sb + kvh * p.k.sh;
  const float* vbase = p.v.data + b * p.v.sb + kvh * p.v.sh;
  float m = kNegInf, l = 0.f;

  for (int64_t j0 = 0; j0 < n; j0 += GROUPS) {  // uniform over the CTA: shuffles below are safe
    const int64_t j = j0 + gi;
    // uniform over the group
    const bool live = j < n && (valid == nullptr || valid[j] != 0) && in_window(p, b, t, j);
    float dot = 0.f;
    if (live) {
      const float* kr = kbase + j * p.k.st;
#pragma unroll
      for (int u = 0; u < NPL; ++u) {
        const int d = li + u * LPK;
        if (d < D) dot += qr[u] * kr[d];
      }
    }
#pragma unroll
    for (int off = LPK / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (live) {
      const float s = score_of(p, dot);
      if (s > m) {
        const float c = rescale(m, s);
        l *= c;
#pragma unroll
        for (int u = 0; u < NPL; ++u) o[u] *= c;
        m = s;
      }
      const float pj = kernels::actmath::exp(s - m);
      l += pj;
      const float* vr = vbase + j * p.v.st;
#pragma unroll
      for (int u = 0; u < NPL; ++u) {
        const int d = li + u * LPK;
        if (d < D) o[u] += pj * vr[d];
      }
    }
  }

  // Merge the groups' states.
  if (li == 0) {
    s_max[gi] = m;
    s_sum[gi] = l;
  }
#pragma unroll
  for (int u = 0; u < NPL; ++u) s_out[gi][li + u * LPK] = o[u];
  __syncthreads();
  float mx = kNegInf;
  for (int g = 0; g < GROUPS; ++g) mx = fmaxf(mx, s_max[g]);
  float* orow = p.out + ((b * p.Tq + t) * p.H + h) * D;
  if (mx == kNegInf) {  // no visible key
    for (int64_t d = tid; d < D; d += kDecodeThreads) orow[d] = 0.f;
    return;
  }
  if (tid < GROUPS) s_w[tid] = rescale(s_max[tid], mx);
  __syncthreads();
  float denom = 0.f;
  for (int g = 0; g < GROUPS; ++g) denom += s_sum[g] * s_w[g];
  const float inv = 1.f / denom;
  for (int64_t d = tid; d < D; d += kDecodeThreads) {
    float acc = 0.f;
    for (int g = 0; g < GROUPS; ++g) acc += s_out[g][d] * s_w[g];
    orow[d] = acc * inv;
  }
}

// ---- prefill ---------------------------------------------------------------------------------
constexpr int kTiledThreads = 128;
constexpr int kTiledWarps = kTiledThreads / 32;
constexpr int kKeysPerChunk = 32;  // one key per lane

template <int DMAX>
struct TiledShape {
  static constexpr int BQ = DMAX <= 128 ? 32 : 16;  // queries per CTA
  static constexpr int RW = BQ / kTiledWarps;                          // query rows per warp
  static constexpr int DP = DMAX + 4;  // padded Q / K rows: float4 reads of K rows conflict-free
  static constexpr int NV = DMAX / 32;  // output values per lane and row
  static constexpr size_t kSmemFloats = static_cast<size_t>(BQ) * DP + static_cast<size_t>(kKeysPerChunk) * DP +
                                        static_cast<size_t>(kKeysPerChunk) * DMAX +
                                        static_cast<size_t>(BQ) * kKeysPerChunk;
  static constexpr size_t kSmemBytes = kSmemFloats * sizeof(float);
};

template <int DMAX>
__global__ void __launch_bounds__(kTiledThreads) attention_tiled(const AttnParams p) {
  using S = TiledShape<DMAX>;
  constexpr int BQ = S::BQ, RW = S::RW, DP = S::DP, NV = S::NV, BK = kKeysPerChunk;
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);  // [BQ][DP]
  float* ks = qs + BQ * DP;                      // [BK][DP]
  float* vs = ks + BK * DP;                      // [BK][DMAX]
  float* ps = vs + BK * DMAX;                    // [BQ][BK]

  const int64_t qtiles = (p.Tq + BQ - 1) / BQ;
  const int64_t idx = blockIdx.x, qt = idx % qtiles, bh = idx / qtiles, h = bh % p.H, b = bh / p.H;
  const int64_t kvh = h / p.group, t0 = qt * BQ, D = p.D;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int Dp4 = static_cast<int>((D + 3) / 4 * 4);

  // Q tile (zeros past D and past the last query).
  for (int r = warp; r < BQ; r += kTiledWarps) {
    const int64_t t = t0 + r;
    const float* qrow = p.q.data + b * p.q.sb + h * p.q.sh + t * p.q.st;
    for (int d = lane; d < DP; d += 32) qs[r * DP + d] = t < p.Tq && d < D ? qrow[d] : 0.f;
  }
  const int64_t n_cta = keys_seen(p, min(t0 + BQ - 1, p.Tq - 1));
  // Null key_valid: every key valid.
  const uint8_t* valid = p.key_valid != nullptr ? p.key_valid + b * p.key_valid_stride : nullptr;
  const float* kbase = p.k.data + b * p.k.sb + kvh * p.k.sh;
  const float* vbase = p.v.data + b * p.v.sb + kvh * p.v.sh;

  float m[RW], l[RW], o[RW][NV];
  int64_t n_row[RW];
#pragma unroll
  for (int i = 0; i < RW; ++i) {
    const int64_t t = t0 + warp * RW + i;
    n_row[i] = t < p.Tq ? keys_seen(p, t) : 0;
    m[i] = kNegInf;
    l[i] = 0.f;
#pragma unroll
    for (int u = 0; u < NV; ++u) o[i][u] = 0.f;
  }

  for (int64_t j0 = 0; j0 < n_cta; j0 += BK) {
    __syncthreads();  // the previous chunk is consumed (and the Q tile written, first time)
    for (int kj = warp; kj < BK; kj += kTiledWarps) {
      const int64_t j = j0 + kj;
      const bool in = j < n_cta;
      const float* kr = kbase + j * p.k.st;
      const float* vr = vbase + j * p.v.st;
      for (int d = lane; d < DMAX; d += 32) {
        const bool ok = in && d < D;
        ks[kj * DP + d] = ok ? kr[d] : 0.f;
        vs[kj * DMAX + d] = ok ? vr[d] : 0.f;
      }
    }
    __syncthreads();

    // Scores of key j0 + lane against the warp's rows.
    const int64_t j = j0 + lane;
    const bool key_ok = j < n_cta && (valid == nullptr || valid[j] != 0);
    float s[RW];
#pragma unroll
    for (int i = 0; i < RW; ++i) s[i] = 0.f;
    for (int d = 0; d < Dp4; d += 4) {
      const float4 kv = *reinterpret_cast<const float4*>(ks + lane * DP + d);
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const float4 qv = *reinterpret_cast<const float4*>(qs + (warp * RW + i) * DP + d);
        s[i] += qv.x * kv.x;
        s[i] += qv.y * kv.y;
        s[i] += qv.z * kv.z;
        s[i] += qv.w * kv.w;
      }
    }
    // Online softmax per row; probabilities to shared memory for the value product.
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      const bool vis = key_ok && j < n_row[i] && in_window(p, b, t0 + warp * RW + i, j);
      const float sc = vis ? score_of(p, s[i]) : kNegInf;
      const float cmax = warp_max(sc);
      float pj = 0.f;
      if (cmax != kNegInf) {  // warp-uniform
        const float mn = fmaxf(m[i], cmax);
        const float c = rescale(m[i], mn);
        pj = vis ? kernels::actmath::exp(sc - mn) : 0.f;
        l[i] = l[i] * c + warp_sum(pj);
#pragma unroll
        for (int u = 0; u < NV; ++u) o[i][u] *= c;
        m[i] = mn;
      }
      ps[(warp * RW + i) * BK + lane] = pj;
    }
    __syncwarp();
#pragma unroll 4
    for (int kj = 0; kj < BK; ++kj) {
      float vv[NV];
#pragma unroll
      for (int u = 0; u < NV; ++u) vv[u] = vs[kj * DMAX + lane + 32 * u];
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const float pp = ps[(warp * RW + i) * BK + kj];
#pragma unroll
        for (int u = 0; u < NV; ++u) o[i][u] += pp * vv[u];
      }
    }
  }

#pragma unroll
  for (int i = 0; i < RW; ++i) {
    const int64_t t = t0 + warp * RW + i;
    if (t >= p.Tq) continue;
    float* orow = p.out + ((b * p.Tq + t) * p.H + h) * D;
    const bool any = m[i] != kNegInf;
    const float inv = any ? 1.f / l[i] : 0.f;
#pragma unroll
    for (int u = 0; u < NV; ++u) {
      const int d = lane + 32 * u;
      if (d < D) orow[d] = any ? o[i][u] * inv : 0.f;
    }
  }
}

template <int DMAX>
void launch_attention(const AttnParams& p, cudaStream_t stream) {
  if (p.Tq <= 4) {
    constexpr int LPK = DMAX <= 128 ? 8 : 16;
    const int64_t blocks = p.B * p.H * p.Tq;
    FQ_CHECK_ARG(blocks <= 0x7fffffff, "attention: too many queries");
    attention_decode<DMAX, LPK><<<static_cast<unsigned>(blocks), kDecodeThreads, 0, stream>>>(p);
  } else {
    using S = TiledShape<DMAX>;
    const int64_t blocks = p.B * p.H * ((p.Tq + S::BQ - 1) / S::BQ);
    FQ_CHECK_ARG(blocks <= 0x7fffffff, "attention: too many query blocks");
    if (S::kSmemBytes > 48 * 1024)
      check(cudaFuncSetAttribute(attention_tiled<DMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(S::kSmemBytes)),
            "attention (shared memory size)");
    attention_tiled<DMAX><<<static_cast<unsigned>(blocks), kTiledThreads, S::kSmemBytes, stream>>>(p);
  }
}

__global__ void kv_append_kernel(HeadViewDev k, HeadViewDev v, float* kc, float* vc, int64_t KVH, int64_t cap,
                                 int64_t past, int64_t T, int64_t D, int64_t rows) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t t = r % T, bh = r / T, h = bh % KVH, b = bh / KVH;
    const int64_t dst = ((b * KVH + h) * cap + past + t) * D;
    const float* ks = k.data + b * k.sb + h * k.sh + t * k.st;
    const float* vs = v.data + b * v.sb + h * v.sh + t * v.st;
    for (int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; d < D;
         d += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      kc[dst + d] = ks[d];
      vc[dst + d] = vs[d];
    }
  }
}

}  // namespace

void kv_append(const HeadViewDev& k, const HeadViewDev& v, float* k_cache, float* v_cache, int64_t B, int64_t KVH,
               int64_t cap, int64_t past, int64_t T, int64_t D, cudaStream_t stream) {
  const int64_t rows = B * KVH * T;
  if (rows == 0 || D == 0) return;
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((D + kThreads - 1) / kThreads, 1024)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  kv_append_kernel<<<grid, kThreads, 0, stream>>>(k, v, k_cache, v_cache, KVH, cap, past, T, D, rows);
  check_launch("kv_append");
}

void attention(const HeadViewDev& q, const HeadViewDev& k, const HeadViewDev& v, float* out, int64_t B, int64_t H,
               int64_t KVH, int64_t Tq, int64_t Tk, int64_t D, const uint8_t* key_valid, int64_t key_valid_stride,
               int64_t causal_offset, float scale, int64_t window, const int64_t* query_positions,
               const int64_t* key_positions, float softcap, cudaStream_t stream) {
  if (B == 0 || H == 0 || Tq == 0 || D == 0) return;
  FQ_CHECK_ARG(D <= 256, "attention: head_dim " + std::to_string(D) + " exceeds 256");
  FQ_CHECK_ARG(KVH >= 1 && H % KVH == 0, "attention: heads must be a multiple of kv_heads");
  AttnParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.B = B;
  p.H = H;
  p.KVH = KVH;
  p.Tq = Tq;
  p.Tk = Tk;
  p.D = D;
  p.group = H / KVH;
  p.key_valid = key_valid;
  p.key_valid_stride = key_valid_stride;
  p.causal_offset = causal_offset;
  p.scale = scale;
  p.window = window;
  p.query_positions = query_positions;
  p.key_positions = key_positions;
  p.softcap = softcap;
  if (D <= 64) launch_attention<64>(p, stream);
  else if (D <= 128) launch_attention<128>(p, stream);
  else launch_attention<256>(p, stream);
  check_launch("attention");
}

}  // namespace cuda
}  // namespace finequant
