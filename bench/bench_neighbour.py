"""Decode beside a busy neighbour: GPT-2 small (random weights) w8a8 greedy decode, tokens/s on a quiet
machine and with one ordinary (nice 0) process spinning on a core, for this build and, with
--compare, other finequant builds (each a folder holding a `finequant` package), measured
alternately in the same run.

    python bench/bench_neighbour.py [--quick] [--threads 2] [--compare NAME=PATH ...]

Each measurement runs in a fresh child process (two finequant builds cannot share one process):
load the engine, one untimed generate, then `--repeats` timed ones; tokens/s = new tokens / wall
time of the generate call (prefill included), best and median. Goal (issue 11): the neighbour keeps
>= 40% of the quiet speed, and the quiet speed does not drop against the previous build.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import common
import models
from bench_decode import FQ_SCHEMES, W8

PROMPT, NEW, GOAL = 32, 64, 0.40


def worker(path: str, threads: int, new: int, repeats: int) -> None:
    """Child: prints a JSON list of seconds per generate call."""
    import numpy as np

    import finequant

    eng = finequant.Engine(path, threads=threads)._engine
    ids = np.random.default_rng(0).integers(1000, 40000, (1, PROMPT), dtype=np.int64)
    eng.generate(ids, None, new, 0.0, 0, 1.0, 0, [], None)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = eng.generate(ids, None, new, 0.0, 0, 1.0, 0, [], None)
        times.append(time.perf_counter() - t0)
        assert len(out[0]) == new
    print(json.dumps(times))


def run_child(pythonpath: str, path: str, args, new: int, neighbour: bool) -> list:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, os.path.dirname(__file__)])))
    spinner = None
    if neighbour:  # an ordinary process that never sleeps, like a busy service on the same machine
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", path, str(args.threads), str(new), str(args.repeats)],
                             env=env, capture_output=True, text=True, check=True)
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return 0
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME=PATH",
                   help="other finequant builds: NAME=folder holding a finequant package")
    args = p.parse_args()
    common.finish_args(args)
    args.repeats = 2 if args.quick else 5
    new = 8 if args.quick else NEW
    src = models.random_gpt2(2 if args.quick else 12)
    _, scheme, *extra = FQ_SCHEMES[W8]  # w8a8: its float precision (fp32) does not apply
    path = models.finequant_model(src, scheme, *extra)
    import finequant

    builds = {"this build": os.path.dirname(os.path.dirname(finequant.__file__))}
    for item in args.compare:
        name, _, folder = item.partition("=")
        builds[name] = folder
    res = common.Results(args.out, "neighbour", args, {"prompt": PROMPT, "new_tokens": new})
    cpu = common.machine_info(args.threads)["cpu"]
    print(f"{W8}, GPT-2 small (random weights), batch 1, prompt {PROMPT}, {new} new tokens, threads={args.threads}, "
          f"{args.repeats} timed calls per cell; CPU: {cpu}")
    # Alternate builds and conditions round by round, so drifts hit every cell alike.
    samples = {(b, n): [] for b in builds for n in (False, True)}
    for _ in range(2 if args.quick else 3):
        for b, folder in builds.items():
            for n in (False, True):
                samples[(b, n)] += run_child(folder, path, args, new, n)
    print(f"{'build':<16}{'quiet tok/s':>20}{'beside a spinner':>22}{'kept':>8}")
    for b in builds:
        quiet = [new / s for s in samples[(b, False)]]
        busy = [new / s for s in samples[(b, True)]]
        kept = statistics.median(busy) / statistics.median(quiet)
        print(f"{b:<16}{statistics.median(quiet):>11.1f} ({max(quiet):5.1f}){statistics.median(busy):>13.1f} "
              f"({max(busy):5.1f}){kept:>8.2f}")
        res.add(build=b, quiet_tok_s=statistics.median(quiet), quiet_best=max(quiet), busy_tok_s=statistics.median(busy),
                busy_best=max(busy), kept=kept, goal=GOAL, samples_s=samples[(b, False)],
                busy_samples_s=samples[(b, True)])
    print(f"tok/s: median (best); kept = median beside the spinner / median quiet (goal >= {GOAL:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
