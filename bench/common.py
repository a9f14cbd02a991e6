"""Shared helpers of the benchmarks: thread setup, interleaved timing, JSON Lines results.

Every bench script measures finequant and its peers in the same process and run, alternating the
systems sample by sample (a noisy neighbour then hurts all of them alike), and reports median and min.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
QUICK_RESULTS_DIR = os.path.join(RESULTS_DIR, "quick")  # git-ignored: smoke-test output only

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access on these machines
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# NumPy's OpenBLAS threads spin after each BLAS call and steal a core from whatever is timed next
# (measured: finequant GEMM 470 -> 670 GOPS without them); no system timed here uses them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Prefer the source tree when it has a built extension (a developer's python/finequant/_core*.so links
# to the build), so the Python side need not be reinstalled; else use the installed package.
SOURCE_PYTHON = os.path.join(ROOT, "python")
if glob.glob(os.path.join(SOURCE_PYTHON, "finequant", "_core*.so")) and SOURCE_PYTHON not in sys.path:
    sys.path.insert(0, SOURCE_PYTHON)


def python_env() -> dict:
    """Environment for child Pythons (the finequant CLI) that imports finequant as this process does."""
    if SOURCE_PYTHON not in sys.path:
        return dict(os.environ)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [SOURCE_PYTHON, os.environ.get("PYTHONPATH")])))


def cache_dir() -> str:
    """Where generated random-weight models and converted peer models live (reused across runs)."""
    base = os.environ.get("FINEQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finequant", "models")
    return os.path.join(os.path.dirname(base.rstrip(os.sep)), "bench")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats (smoke test; results go to "
                   "bench/results/quick)")
    p.add_argument("--threads", type=int, default=2, help="threads for every system (default 2)")
    p.add_argument("--repeats", type=int, help="timed samples per system (default: 7, quick: 2)")
    p.add_argument("--out", help="results directory (default bench/results, quick: bench/results/quick)")
    return p


def finish_args(args) -> None:
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.out = args.out or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR)


def set_threads(n: int) -> None:
    """Same thread count for torch and finequant (ORT and CT2 take it per session/model)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)  # allowed once, before any inter-op work
    except RuntimeError:
        pass


def _sample(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def measure(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
            min_sample_s: float = 0.0, settle: bool = True) -> Dict[str, dict]:
    """Time each callable, alternating systems: round r runs one sample of every system in turn.

    A sample is `inner` back-to-back calls (chosen in warm-up so a sample lasts >= min_sample_s, which
    keeps microsecond GEMMs above timer noise), after one untimed call when `settle` (calls of many
    milliseconds do not need it); seconds per call are reported as median and min.
    """
    inner = {}
    for name, fn in fns.items():
        t = min([_sample(fn, 1) for _ in range(warmup)], default=min_sample_s)  # seconds per call
        n = 1
        while t * n < min_sample_s and n < 1_000_000:
            n *= 2
        inner[name] = n
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:  # one untimed call: the previous system's thread pool may still spin on the cores
                fn()
            samples[name].append(_sample(fn, inner[name]))
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "samples_s": s, "inner": inner[name]}
            for name, s in samples.items()}


def machine_info(threads: int) -> dict:
    import torch

    cpu = platform.processor() or ""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first CPU is enough
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    if "cpu family" in fields:  # "AMD EPYC" alone names Zen 3 and Zen 4 alike
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        from finequant import _core

        info["isa"] = _core.active_isa()
    except ImportError:
        pass
    return info


class Results:
    """Appends one JSON record per line to <out>/<bench>.json; all records of a run share `run`."""

    def __init__(self, out_dir: str, bench: str, args, extra: Optional[dict] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"{bench}.json")
        self.run = time.strftime("%Y%m%dT%H%M%S")
        self.meta = {"bench": bench, "run": self.run, "quick": bool(args.quick), **machine_info(args.threads),
                     **(extra or {})}

    def add(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**self.meta, **record}) + "\n")


def bert_goal(isa: str) -> float:
    """The issue's BERT goal: finequant latency <= 0.6x the fastest peer with AMX, <= 0.85x without."""
    return 0.6 if isa == "amx" else 0.85


def load_latest(path: str) -> dict:
    """Records of the latest run on each ISA level (the kernels a run used) in a JSON Lines results file:
    {isa: records}, {} if missing. Records from before the level was recorded are left out."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        records = [r for r in (json.loads(line) for line in f if line.strip()) if r.get("isa")]
    latest = {}
    for r in records:
        latest[r["isa"]] = max(latest.get(r["isa"], ""), r["run"])
    return {isa: [r for r in records if r["isa"] == isa and r["run"] == run] for isa, run in latest.items()}


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"
