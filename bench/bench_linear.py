"""finequant's CPU Linear alone (no peers): GOPS of one _core.Linear per shape and scheme, best of N,
for comparing two builds of finequant on one machine (e.g. before and after a refactor).

    python bench/bench_linear.py [--threads 2] [--rounds 5] [--isa LEVEL] [--stream MB] [--shapes M,N,K;...]
    PYTHONPATH=/path/to/other/build python bench/bench_linear.py ...   # the other build, alternately

--stream MB cycles through copies of the weight totalling at least MB megabytes, one call each, so that
every call reads its weight from DRAM as decode does (without it the weight stays in cache).

Prints one line per (shape, scheme): M N K scheme GOPS (activation quantization and epilogue
included). Run the two builds alternately, several times, and compare the best of each: short
GEMMs on a shared 2-core VM vary by tens of percent from run to run.
"""
import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from finequant import _core  # noqa: E402

SHAPES = [(1, 768, 768), (1, 3072, 768), (8, 3072, 768), (128, 768, 768), (128, 3072, 768), (1024, 768, 3072),
          (1024, 3072, 768)]
SCHEMES = {"w8a8": (8, True, 1, 0, 8, True), "w8a8-a-asym": (8, True, 1, 0, 8, False),
           "w4a8-kb32": (4, True, 1, 32, 8, True), "w4a8-kb32-a-asym": (4, True, 1, 32, 8, False), "f32": ()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case; the best is printed")
    p.add_argument("--isa", help="force an instruction-set level (ref, avx2, avxvnni, avx512vnni, amx)")
    p.add_argument("--stream", type=float, default=0, metavar="MB",
                   help="cycle through weight copies of at least MB megabytes (DRAM-bound, like decode)")
    p.add_argument("--shapes", help="M,N,K;M,N,K... instead of the default shapes")
    p.add_argument("--schemes", help="comma-separated subset of " + ",".join(SCHEMES))
    args = p.parse_args()
    _core.set_threads(args.threads)
    if args.isa:
        _core.set_isa(args.isa)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")] if args.shapes else SHAPES
    schemes = {k: SCHEMES[k] for k in args.schemes.split(",")} if args.schemes else SCHEMES
    print(f"# isa {_core.active_isa()}, {args.threads} threads, {_core.__file__}")
    for M, N, K in shapes:
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
        x = rng.standard_normal((M, K)).astype(np.float32)
        for name, q in schemes.items():
            copies = max(1, int(args.stream * 1e6 / (N * K))) if args.stream else 1  # ~1 byte per weight
            lins = [_core.Linear(w, *q) for _ in range(copies)]
            lins[0].forward(x)
            calls = max(copies, int(2e8 / (M * N * K)) // copies * copies)
            best = float("inf")
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                for i in range(calls):
                    lins[i % copies].forward(x)
                best = min(best, (time.perf_counter() - t0) / calls)
            print(f"{M} {N} {K} {name} {2 * M * N * K / best / 1e9:.1f} GOPS {best * 1e6:.1f} us")


if __name__ == "__main__":
    main()
