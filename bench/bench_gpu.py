"""finequant's CUDA backend against torch on the same GPU, printed as ratios measured in this run.

    python bench/bench_gpu.py [--quick] [--out DIR]

1. GEMM y = x W^T: finequant W8A8 (per channel), W4A8 (K-blocks of 32: the blocked kernel; per channel:
   CUTLASS mixed input) and W4A4 (per channel), activation quantization and the dequantizing epilogue
   included (Linear.time_forward: x already on the device), against torch fp16 F.linear and
   torch._int_mm (raw int32 out, no quantization). TOPS = 2 M N K / time.
2. BERT-base (random weights, 12 layers) forward, finequant w8a8 vs torch fp16 (eager), both returning
   fp32 hidden states on the host.
3. GPT-2 small decode, batch 1, 64 greedy tokens: finequant w8a8 (+ INT8 head) vs torch fp16 generate.
Needs a CUDA device, torch with CUDA and transformers; results are appended to <out>/gpu.json.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import common
import models

GEMM_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (1024, 4096, 4096), (4096, 4096, 4096),
               (128, 3072, 768), (1024, 768, 3072)]
QUICK_GEMM_SHAPES = [(1, 4096, 4096), (128, 4096, 4096), (2048, 4096, 4096)]


def cuda_ms(fn, repeats: int, inner: int = 10) -> float:
    """Median milliseconds per call of a torch CUDA callable, timed with events."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def host_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_gemm(args, results, rows):
    import torch

    from finequant import _core

    for M, N, K in (QUICK_GEMM_SHAPES if args.quick else GEMM_SHAPES):
        rng = np.random.default_rng(M + N + K)
        w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
        x = rng.standard_normal((M, K)).astype(np.float32)
        ops = 2.0 * M * N * K
        wt, xt = torch.from_numpy(w).cuda().half(), torch.from_numpy(x).cuda().half()
        t = {"torch fp16": cuda_ms(lambda: torch.nn.functional.linear(xt, wt), args.repeats)}
        if M > 16:
            xi = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
            wi = torch.randint(-127, 128, (K, N), dtype=torch.int8, device="cuda")
            t["torch _int_mm"] = cuda_ms(lambda: torch._int_mm(xi, wi), args.repeats)
        systems = {"fq w8a8": (8, True, 1, 0, 8), "fq w4a8 kb32": (4, True, 1, 32, 8), "fq w4a8": (4, True, 1, 0, 8),
                   "fq w4a4": (4, True, 1, 0, 4)}
        kernels = {}
        for name, (wb, ws, rows_, kb, ab) in systems.items():
            lin = _core.Linear(w, wb, ws, rows_, kb, ab, True, None, device="cuda")
            kernels[name] = lin.kernel
            inner = max(3, min(200, int(2e9 / ops)))
            t[name] = statistics.median(lin.time_forward(x, inner) for _ in range(args.repeats)) * 1e3
        base = t["torch fp16"]
        for name, ms in t.items():
            results.add(kind="gemm", M=M, N=N, K=K, system=name, ms=ms, tops=ops / ms / 1e9,
                        kernel=kernels.get(name, ""))
            rows.append((f"GEMM {M}x{N}x{K}", name, f"{ms:.4f} ms", f"{ops / ms / 1e9:.1f} TOPS",
                         f"{base / ms:.2f}x vs fp16"))


def bench_bert(args, results, rows):
    import torch
    from transformers import BertModel

    import finequant

    src = models.random_bert(12)
    fq = finequant.Engine(models.finequant_model(src, "w8a8"), device="cuda")
    ref = BertModel.from_pretrained(src, attn_implementation="sdpa").cuda().half().eval()
    for B, T in ([(1, 128), (8, 128)] if args.quick else [(1, 32), (1, 128), (8, 128), (32, 128)]):
        ids = np.random.default_rng(B * T).integers(5, 1000, size=(B, T)).astype(np.int64)
        mask = np.ones_like(ids)
        ids_t, mask_t = torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()

        def torch_fwd():
            with torch.no_grad():
                return ref(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.float().cpu().numpy()

        t = {"torch fp16": host_ms(torch_fwd, args.repeats), "fq w8a8": host_ms(lambda: fq.forward(ids, mask), args.repeats)}
        a, b = torch_fwd(), fq.forward(ids, mask)
        cos = float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).mean())
        for name, ms in t.items():
            results.add(kind="bert", B=B, T=T, system=name, ms=ms, cosine_vs_fp16=cos)
            rows.append((f"BERT-base {B}x{T}", name, f"{ms:.2f} ms", f"cos {cos:.4f}", f"{t['torch fp16'] / ms:.2f}x vs fp16"))


def bench_decode(args, results, rows):
    import torch
    from transformers import GPT2LMHeadModel

    import finequant

    src = models.random_gpt2(12)
    new = 16 if args.quick else 64
    fq = finequant.Engine(models.finequant_model(src, "w8a8", "--parts", "qkv,attn_out,fc1,fc2,head"), device="cuda")
    ref = GPT2LMHeadModel.from_pretrained(src).cuda().half().eval()
    prompt = list(range(10, 42))
    ids_t = torch.tensor([prompt], device="cuda")

    def torch_gen():
        with torch.no_grad():
            return ref.generate(ids_t, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    t = {"torch fp16": host_ms(torch_gen, args.repeats),
         "fq w8a8": host_ms(lambda: fq.generate(prompt, max_new_tokens=new, stop_tokens=[]), args.repeats)}
    for name, ms in t.items():
        tps = new / (ms / 1e3)
        results.add(kind="decode", batch=1, new_tokens=new, system=name, ms=ms, tokens_per_s=tps)
        rows.append(("GPT-2 decode b1", name, f"{tps:.0f} tok/s", "", f"{t['torch fp16'] / ms:.2f}x vs fp16"))


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    common.finish_args(args)
    import torch

    from finequant import _core

    if not (torch.cuda.is_available() and _core.cuda_backend_built() and _core.cuda_device_count() > 0):
        print("bench_gpu: needs a CUDA device, torch with CUDA and finequant built with its CUDA backend")
        return 2
    results = common.Results(args.out, "gpu", args, {"gpu": torch.cuda.get_device_name()})
    rows = []
    for part in (bench_gemm, bench_bert, bench_decode):
        try:
            part(args, results, rows)
        except Exception as e:  # report the part that failed, keep the others
            rows.append((part.__name__, "FAILED", f"{type(e).__name__}: {e}"[:120], "", ""))
    print(f"\n{torch.cuda.get_device_name()}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 1 if any(r[1] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
