"""GEMM y = x W^T + b: finequant W8A8 against torch._int_mm and the machine's measured INT8 peak.

    python bench/bench_gemm.py [--quick] [--threads 2] [--isa auto|ref|avx2|avxvnni|avx512vnni|amx]

finequant's Linear.forward is timed end to end: fp32 x in, per-token INT8 quantization, integer
GEMM, fused dequantization epilogue (scales + bias), fp32 y out. torch._int_mm is timed as the bare
int8 x int8 -> int32 kernel (oneDNN; the strictest baseline, no quantization or dequantization), and
for context also inside the same full path in eager torch ("torch int8 e2e") and torch fp32 F.linear.
GOPS = 2*M*N*K / median time. The peak is that of the active level's unit: tdpbssd tiles when it is
amx, else vpdpbusd (_core.int8_peak_gops). Goals: with AMX >= 50% of its peak at M >= 128 and >= 1.3x
torch._int_mm; with AVX512-VNNI >= 85% of its peak at M >= 128; >= torch._int_mm everywhere. "of peak"
is against the peak sampled in the same rounds as the shape (median); the run's peak before / after is
recorded too. With AMX the run also measures the tile loop with its loads (unit "amx-loads": 4 tile
loads from L1 per 4 tdpbssd, what a 2 x 2 GEMM tile loop needs), the ceiling of a tile-loop GEMM on the
machine.
"""
from __future__ import annotations

import statistics
import sys

import numpy as np

import common

MS = (1, 8, 128, 1024)
SHAPES = ((768, 768), (3072, 768), (768, 3072))  # (N, K)
QUICK_MS = (1, 128)
QUICK_SHAPES = ((768, 768), (3072, 768))


def torch_int_mm_fn(torch, xq, wt):
    """torch._int_mm on CPU takes any 2-D int8 shapes (the CUDA limits M > 16, K and N % 8 do not
    apply); should a build refuse a shape, M is padded to 32 and the padding counted as wasted work."""
    try:
        torch._int_mm(xq, wt)
        return (lambda: torch._int_mm(xq, wt)), None
    except RuntimeError as e:
        m = xq.shape[0]
        xp = torch.zeros((max(32, m), xq.shape[1]), dtype=torch.int8)
        xp[:m] = xq
        torch._int_mm(xp, wt)
        return (lambda: torch._int_mm(xp, wt)), f"M padded {m}->{xp.shape[0]} ({str(e).splitlines()[0]})"


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--isa", help="finequant kernel level: auto, ref, avx2, avxvnni, avx512vnni, amx (default: auto)")
    args = p.parse_args()
    common.finish_args(args)
    common.set_threads(args.threads)
    import torch
    import torch.nn.functional as F

    from finequant import _core

    missing = [n for n in ("Linear", "set_threads", "int8_peak_gops") if not hasattr(_core, n)]
    if missing:
        print(f"NOTE: finequant._core lacks {', '.join(missing)} (rebuild needed): finequant rows skipped")
    have_fq = "Linear" not in missing
    if hasattr(_core, "set_threads"):
        _core.set_threads(args.threads)
    if args.isa and hasattr(_core, "set_isa"):
        _core.set_isa(args.isa)
    isa = _core.active_isa() if hasattr(_core, "active_isa") else "unknown"

    peak_s = 0.2 if args.quick else 1.0

    unit = "amx" if isa == "amx" else "vnni"

    def peak(seconds: float = peak_s) -> float | None:
        if not hasattr(_core, "int8_peak_gops"):
            return None
        try:
            return _core.int8_peak_gops(args.threads, seconds, unit)
        except TypeError:  # a build before the unit argument: VNNI only
            return _core.int8_peak_gops(args.threads, seconds) if unit == "vnni" else None

    def tile_loop() -> float | None:
        # AMX only: the 2 x 2 tile loop with its four operand loads per step from L1, the ceiling of any
        # tile-loop GEMM on this CPU (tile loads cost time the register-only peak does not show).
        try:
            return _core.int8_peak_gops(args.threads, peak_s, "amx-loads") if unit == "amx" else None
        except ValueError:  # a build before the unit
            return None

    peaks, loops = [peak()], [tile_loop()]
    ms, shapes = (QUICK_MS, QUICK_SHAPES) if args.quick else (MS, SHAPES)
    res = common.Results(args.out, "gemm", args, {"isa": isa})
    print(f"threads={args.threads} isa={isa} {unit.upper()} peak={peaks[0] and f'{peaks[0]:.0f} GOPS'} "
          + (f"tile loop with loads={loops[0]:.0f} GOPS " if loops[0] else "") + f"repeats={args.repeats}")
    print("torch._int_mm on CPU takes any 2-D int8 shapes (CUDA's M > 16 and K, N % 8 limits do not apply): "
          "no padding unless noted per row")
    hdr = (f"{'M':>5} {'N':>5} {'K':>5} | {'fq w8a8':>8} {'_int_mm':>8} {'int8 e2e':>8} {'fp32':>8} {'fq w4a8':>8}"
           f" GOPS | {'vs _int_mm':>10} {'of peak':>8} {'rel err':>8}")
    print(hdr)
    rng = np.random.default_rng(0)
    for n, k in shapes:
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32) * 0.1
        wt_f, bt = torch.from_numpy(w), torch.from_numpy(b)
        w_scale = wt_f.abs().amax(1) / 127  # torch int8 path: per-channel symmetric weights
        wq = torch.round(wt_f / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        wq_t = wq.t()  # [K, N] view of the [N, K] weight, as a Linear stores it
        fq8 = _core.Linear(w, 8, True, 1, k, 8, True, b) if have_fq else None
        fq4 = _core.Linear(w, 4, True, 1, 32, 8, True, b) if have_fq else None
        for m in ms:
            x = rng.standard_normal((m, k)).astype(np.float32)
            xt = torch.from_numpy(x)
            x_scale = xt.abs().amax(1) / 127
            xq = torch.round(xt / x_scale[:, None]).clamp(-127, 127).to(torch.int8)
            int_mm, note = torch_int_mm_fn(torch, xq, wq_t)

            def torch_e2e(xt=xt):
                s = xt.abs().amax(1, keepdim=True) / 127
                q = torch.round(xt / s).clamp(-127, 127).to(torch.int8)
                return torch._int_mm(q, wq_t).float() * (s * w_scale) + bt

            fns = {}
            if have_fq:
                fns["finequant w8a8"] = lambda: fq8.forward(x)
            fns["torch._int_mm"] = int_mm
            fns["torch int8 e2e"] = torch_e2e
            fns["torch fp32"] = lambda: F.linear(xt, wt_f, bt)
            if have_fq:
                fns["finequant w4a8"] = lambda: fq4.forward(x)
            # The peak as one more system of the rounds: a shared VM's clock moves between minutes, so each
            # shape is compared with the peak of its own rounds (median).
            shape_peaks = []
            if peaks[0] is not None:
                fns["peak"] = lambda: shape_peaks.append(peak(0.05))
            with torch.inference_mode():
                t = common.measure(fns, args.repeats, warmup=2, min_sample_s=0.005 if args.quick else 0.05)
            t.pop("peak", None)
            shape_peak = statistics.median(shape_peaks) if shape_peaks else None
            ops = 2.0 * m * n * k
            gops = {s: ops / t[s]["median_s"] / 1e9 for s in t}
            err = None
            if have_fq:
                ref = F.linear(xt, wt_f, bt).numpy()
                err = float(np.linalg.norm(fq8.forward(x) - ref) / np.linalg.norm(ref))
            for s in t:
                res.add(m=m, n=n, k=k, system=s, gops=gops[s], gops_best=ops / t[s]["min_s"] / 1e9,
                        note=note if s == "torch._int_mm" else None, rel_err=err if s == "finequant w8a8" else None,
                        shape_peak_gops=shape_peak,
                        **{kk: v for kk, v in t[s].items()})
            fq = gops.get("finequant w8a8")
            vs = common.fmt_ratio(fq / gops["torch._int_mm"] if fq else None)
            of_peak = f"{fq / shape_peak:.0%}" if fq and shape_peak else "-"
            cell = lambda s: f"{gops[s]:8.0f}" if s in gops else f"{'-':>8}"  # noqa: E731
            print(f"{m:>5} {n:>5} {k:>5} | {cell('finequant w8a8')} {cell('torch._int_mm')} "
                  f"{cell('torch int8 e2e')} {cell('torch fp32')} {cell('finequant w4a8')}      | {vs:>10} "
                  f"{of_peak:>8} {('-' if err is None else f'{err:.4f}'):>8}" + (f"  [{note}]" if note else ""),
                  flush=True)
    peaks.append(peak())
    loops.append(tile_loop())
    if peaks[0] is not None:
        # The peak is a best case: keep the higher of the two measurements (before and after).
        res.add(system=f"{unit} peak", gops=max(peaks), peaks=peaks)
        print(f"{unit.upper()} peak before/after: {peaks[0]:.0f} / {peaks[1]:.0f} GOPS")
    if loops[0] is not None:
        res.add(system="amx tile loop", gops=max(loops), peaks=loops)
        print(f"AMX tile loop with loads before/after: {loops[0]:.0f} / {loops[1]:.0f} GOPS")
    print(f"results appended to {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
