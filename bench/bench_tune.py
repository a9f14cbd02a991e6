"""Per-shape strategy (`finequant tune`, docs/DESIGN.md section 12): tuned vs every single fixed scheme.

    python bench/bench_tune.py [--quick] [--threads 2] [--repeats 7]

Models as the CPU benchmarks build them (random weights, quantized w8a8): BERT-base forward at
bench_bert.py's (batch, seq) shapes and GPT-2 small greedy decode at bench_decode.py's (32-token
prompt, 64 new tokens, batch 1 and 8). Systems, alternated sample by sample, all from the same file:
  int   every GEMM as stored (integer kernels; strategy "off", the default without a table)
  fp32  every integer GEMM weight-only, dequantized to fp32 (a table forcing fp32 in every bucket)
  bf16  the same in bf16 (AVX512-BF16 CPUs only)
  tuned the table `finequant tune` wrote on this machine just before
Prints seconds per call (median) and ratios tuned / best fixed scheme overall (geometric mean over the
shapes) and tuned / best fixed scheme at each shape (< 1: tuned wins). Results are printed, never
written to bench/results: say under what load they were measured (the load average is printed).
"""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np

import common
import models

BERT_SHAPES, BERT_QUICK = ((1, 32), (1, 128), (8, 128), (32, 128)), ((1, 16), (2, 32))
DECODE = (32, 64, (1, 8))
DECODE_QUICK = (8, 4, (1, 2))


def engines(model: str, threads: int, tuned_table: str) -> dict:
    import finequant
    from finequant import tune

    out = {"int": finequant.Engine(model, threads=threads, strategy="off")}
    tmp = tempfile.mkdtemp(prefix="fq_bench_tune_")
    for precision in tune._float_precisions():
        path = os.path.join(tmp, f"{precision}.json")
        tune.write_table(path, {p: {"choice": [precision] * len(tune.BUCKETS)} for p in tune.PARTS}, threads)
        out[precision] = finequant.Engine(model, threads=threads, strategy=path)
    out["tuned"] = finequant.Engine(model, threads=threads, strategy=tuned_table)
    return out


def report(title: str, rows: list) -> None:
    """rows: (shape label, {system: median seconds})."""
    fixed = [s for s in rows[0][1] if s != "tuned"]
    geo = {s: math.exp(sum(math.log(r[s]) for _, r in rows) / len(rows)) for s in fixed}
    best_overall = min(geo, key=geo.get)
    print(f"\n{title}: best single fixed scheme overall: {best_overall}")
    print(f"{'shape':<16}" + "".join(f"{s:>11}" for s in fixed) + f"{'tuned':>11}  tuned/{best_overall:<6} tuned/best-here")
    for label, r in rows:
        best_here = min(fixed, key=lambda s: r[s])
        print(f"{label:<16}" + "".join(f"{r[s] * 1e3:9.2f}ms" for s in fixed) + f"{r['tuned'] * 1e3:9.2f}ms"
              f"  {r['tuned'] / r[best_overall]:11.3f}  {r['tuned'] / r[best_here]:7.3f} ({best_here})")


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    common.finish_args(args)
    from finequant import tune

    print(f"load average before: {os.getloadavg()}; threads {args.threads}, repeats {args.repeats}; "
          f"machine {tune.machine()}")
    layers = 2 if args.quick else 12
    tables = tempfile.mkdtemp(prefix="fq_bench_tables_")

    bert = models.finequant_model(models.random_bert(layers), "w8a8")
    table = os.path.join(tables, "bert.json")
    tune.tune(bert, threads=args.threads, accuracy=False, output=table, log=None)
    systems = engines(bert, args.threads, table)
    rng = np.random.default_rng(0)
    rows = []
    for b, t in BERT_QUICK if args.quick else BERT_SHAPES:
        ids = rng.integers(1000, 20000, (b, t), dtype=np.int64)
        res = common.measure({s: (lambda e=e: e.forward(ids)) for s, e in systems.items()}, args.repeats,
                             min_sample_s=0.05)
        rows.append((f"B{b} T{t}", {s: v["median_s"] for s, v in res.items()}))
    report("BERT-base-like forward (w8a8)", rows)
    print("\n".join(tune.describe(tune.read_table(table))[1:]))

    prompt, new, batches = DECODE_QUICK if args.quick else DECODE
    gpt2 = models.finequant_model(models.random_gpt2(layers), "w8a8")
    table = os.path.join(tables, "gpt2.json")
    tune.tune(gpt2, threads=args.threads, accuracy=False, output=table, log=None)
    systems = engines(gpt2, args.threads, table)
    rows = []
    for b in batches:
        ids = rng.integers(1000, 20000, (b, prompt), dtype=np.int64)
        fns = {s: (lambda e=e._engine: e.generate(ids, None, new, 0.0, 0, 1.0, 0, [], None)) for s, e in systems.items()}
        res = common.measure(fns, args.repeats)
        rows.append((f"B{b} P{prompt}+{new}", {s: v["median_s"] for s, v in res.items()}))
    report("GPT-2-small-like greedy decode (w8a8)", rows)
    print("\n".join(tune.describe(tune.read_table(table))[1:]))
    print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
