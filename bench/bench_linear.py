"""finequant's CPU Linear alone (no peers): GOPS of one _core.Linear per shape and scheme, best of N,
for comparing two builds of finequant on one machine (e.g. before and after a refactor).

    python bench/bench_linear.py [--threads 2] [--rounds 5]
    PYTHONPATH=/path/to/other/build python bench/bench_linear.py ...   # the other build, alternately

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
SCHEMES = {"w8a8": (8, True, 1, 0, 8, True), "w4a8-kb32": (4, True, 1, 32, 8, True), "f32": ()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case; the best is printed")
    args = p.parse_args()
    _core.set_threads(args.threads)
    print(f"# isa {_core.active_isa()}, {args.threads} threads, {_core.__file__}")
    for M, N, K in SHAPES:
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
        x = rng.standard_normal((M, K)).astype(np.float32)
        for name, q in SCHEMES.items():
            lin = _core.Linear(w, *q)
            lin.forward(x)
            calls = max(1, int(2e8 / (M * N * K)))
            best = float("inf")
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    lin.forward(x)
                best = min(best, (time.perf_counter() - t0) / calls)
            print(f"{M} {N} {K} {name} {2 * M * N * K / best / 1e9:.1f}")


if __name__ == "__main__":
    main()
