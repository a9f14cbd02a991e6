"""Per-shape strategy (`finequant tune`, docs/DESIGN.md section 12).

Whether an integer GEMM beats a floating-point one depends on its shape and on M, the rows of the
call (tokens: B x T in a prefill or an encoder forward, B in a decode step). `tune` times each GEMM
part of a quantized model (qkv, attn_out, fc1, fc2, head) as stored (integer kernel, activations
quantized per row) and dequantized to a weight-only floating-point Linear (fp32, and bf16 where the
CPU has AVX512-BF16), at a few M per token-count bucket, on this machine, and writes
`strategy.json` to the model directory. The engine reads it at load (Engine(strategy="auto")) and
each integer Linear of a part the table sends to a float kernel for some bucket also holds its
weight dequantized (memory stated), picking per call by M.

A weight-only choice changes the numerics (no activation quantization: usually closer to the fp32
model, never bit-identical to the integer path): tune reports its effect on the model's output per
part so the choice is an explicit accuracy/speed trade. The integer path stays the default: a bucket
goes to a float kernel only when it is faster at every M measured there by more than the margin.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _core

STRATEGY_FILE = "strategy.json"
FORMAT = "finequant-strategy"
PARTS = ("qkv", "attn_out", "fc1", "fc2", "head")
# Token-count buckets [lo, hi] (hi None: no bound) and the M measured in each.
BUCKETS: List[Tuple[int, Optional[int]]] = [(1, 1), (2, 8), (9, 64), (65, None)]
SAMPLE_ROWS = {0: (1,), 1: (2, 8), 2: (16, 64), 3: (128, 512)}


def model_folder(model: str) -> str:
    return model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))


def machine() -> Tuple[str, str]:
    """(CPU model name, CPU backend name) as the engine checks them at load."""
    cpu, backend = _core.strategy_machine()
    return cpu, backend


def part_shapes(model: str) -> Dict[str, dict]:
    """Per tunable part: the GEMM the engine runs for it in the first layer (merged q/k/v and gate/up
    summed along N), {"N", "K", "quant": LinearQuant}. Parts stored as floating point or weight-only have
    one kernel only and are left out."""
    from .modelfile import _read_header, load_info

    info = load_info(model)
    header = _read_header(info["path"])
    groups: Dict[Tuple[str, str], dict] = {}
    for module, lq in info["linears"].items():
        if not lq.weight_bits or not lq.act_bits:
            continue
        shape = header[module + ".weight"]["shape"]
        n, k = shape[0], shape[1] * (2 if lq.weight_bits == 4 else 1)
        parent = module.rpartition(".")[0]
        g = groups.setdefault((lq.part, parent), {"N": 0, "K": k, "quant": lq, "module": module})
        g["N"] += n
    shapes: Dict[str, dict] = {}

    def layer_of(parent: str) -> int:
        m = re.search(r"\.(\d+)(\.|$)", parent)
        return int(m.group(1)) if m else -1

    for (part, parent), g in sorted(groups.items(), key=lambda kv: (layer_of(kv[0][1]), kv[0][1])):
        shapes.setdefault(part, g)
    return shapes


def _float_precisions() -> List[str]:
    """fp32, plus bf16 where the CPU backend has a bf16 kernel (else bf16 runs as fp32)."""
    w = np.zeros((16, 32), np.float32)
    if _core.Linear(w, precision="bf16").kernel != _core.Linear(w).kernel:
        return ["fp32", "bf16"]
    return ["fp32"]


def _time(lin, x: np.ndarray, rounds: int) -> float:
    m, k = x.shape
    iters = max(2, min(200, int(3e7 / max(1, m * k * lin.out_features))))
    return min(lin.time_forward(x, iters) for _ in range(rounds))


def measure(shapes: Dict[str, dict], rounds: int = 3, precisions: Optional[Sequence[str]] = None,
            log=None) -> Dict[str, Dict[str, Dict[int, float]]]:
    """Seconds per call {part: {"int" | "fp32" | "bf16": {M: s}}} with random weights of each part's shape
    and quantization (a kernel's speed depends on the shape and scheme, not on the values)."""
    precisions = list(precisions or _float_precisions())
    rng = np.random.default_rng(0)
    out: Dict[str, Dict[str, Dict[int, float]]] = {}
    for part, s in shapes.items():
        lq, n, k = s["quant"], s["N"], s["K"]
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        tile = lq.tile or (1, 0)
        kernels = {"int": _core.Linear(w, lq.weight_bits, lq.weight_symmetric, tile[0], tile[1], lq.act_bits,
                                       lq.act_symmetric, rotation=lq.rotation)}
        for p in precisions:
            kernels[p] = _core.Linear(w, precision=p, rotation=lq.rotation)
        out[part] = {name: {} for name in kernels}
        for rows in SAMPLE_ROWS.values():
            for m in rows:
                x = rng.standard_normal((m, k)).astype(np.float32)
                for name, lin in kernels.items():
                    out[part][name][m] = _time(lin, x, rounds)
                if log:
                    log(f"  {part:<9} [{n} x {k}] M {m:<4} " + "  ".join(
                        f"{name} {out[part][name][m] * 1e6:9.1f} us" for name in kernels))
    return out


def choose(times: Dict[str, Dict[int, float]], margin: float = 0.05) -> List[str]:
    """Per bucket "int" or one float precision (the same for all of the part's buckets: a Linear holds one
    alternative kernel): a float kernel only where it is faster than the integer one at every M measured in
    the bucket by more than `margin`."""
    floats = [p for p in times if p != "int"]

    def wins(p: str, b: int) -> bool:
        return all(times[p][m] < times["int"][m] * (1 - margin) for m in SAMPLE_ROWS[b])

    best, best_key = None, None
    for p in floats:
        won = [b for b in range(len(BUCKETS)) if wins(p, b)]
        key = (len(won), -sum(times[p][m] for b in won for m in SAMPLE_ROWS[b]))
        if won and (best_key is None or key > best_key):
            best, best_key = p, key
    return [best if best and wins(best, b) else "int" for b in range(len(BUCKETS))]


def write_table(path: str, parts: Dict[str, dict], threads: int) -> dict:
    cpu, backend = machine()
    table = {"format": FORMAT, "version": 1, "cpu": cpu, "backend": backend, "threads": threads,
             "buckets": [list(b) for b in BUCKETS], "parts": parts,
             "note": "a part on fp32/bf16 runs its dequantized weight with float activations (weight-only): "
                     "different numerics from the integer path, see each part's accuracy"}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)
    return table


def _forced_table(folder: str, part: str, precision: str, threads: int) -> str:
    """A table sending `part` to `precision` in every bucket (for measuring its accuracy effect)."""
    path = os.path.join(tempfile.mkdtemp(prefix="fq_tune_"), STRATEGY_FILE)
    write_table(path, {part: {"choice": [precision] * len(BUCKETS)}}, threads)
    return path


def accuracy_effect(model: str, parts: Dict[str, str], threads: int, batch: int = 2, seq: int = 16,
                    seed: int = 0) -> Dict[str, float]:
    """Max relative difference max|y - y_int| / max|y_int| of the model's output (logits or hidden states)
    on random token ids, each part alone on its float precision vs every part as stored."""
    from .engine import Engine

    base = Engine(model, threads=threads, strategy="off")
    ids = np.random.default_rng(seed).integers(0, base.vocab_size, (batch, min(seq, base.max_positions)))
    ref = base.forward(ids)
    out = {}
    for part, precision in parts.items():
        table = _forced_table(model_folder(model), part, precision, threads)
        try:
            y = Engine(model, threads=threads, strategy=table).forward(ids)
        finally:
            os.remove(table)
            os.rmdir(os.path.dirname(table))
        out[part] = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
    return out


def tune(model: str, threads: int = 0, rounds: int = 3, margin: float = 0.05, accuracy: bool = True,
         output: Optional[str] = None, log=print) -> dict:
    """Measures, chooses and writes the strategy table (default: MODEL/strategy.json); returns it."""
    threads = threads or _core.default_threads()
    _core.set_threads(threads)
    shapes = part_shapes(model)
    path = output or os.path.join(model_folder(model), STRATEGY_FILE)
    cpu, backend = machine()
    if log:
        log(f"tuning {model} on {cpu} / {backend}, {threads} threads")
    if not shapes and log:
        log("no integer GEMM with quantized activations: nothing to choose (the table keeps every part as stored)")
    start = time.perf_counter()
    times = measure(shapes, rounds, log=log)
    parts = {}
    for part, s in shapes.items():
        choice = choose(times[part], margin)
        lq = s["quant"]
        parts[part] = {"choice": choice, "shape": [s["N"], s["K"]],
                       "scheme": f"w{lq.weight_bits}a{lq.act_bits}", "weight_only_bytes_per_linear":
                       s["N"] * s["K"] * (2 if "bf16" in choice else 4),
                       "seconds": {k: {str(m): t for m, t in v.items()} for k, v in times[part].items()}}
    if accuracy and parts:
        precisions = {p: next((c for c in e["choice"] if c != "int"), "fp32") for p, e in parts.items()}
        for part, err in accuracy_effect(model, precisions, threads).items():
            parts[part]["accuracy"] = {"precision": precisions[part], "max_rel_output_diff": err}
    table = write_table(path, parts, threads)
    if log:
        log(f"measured in {time.perf_counter() - start:.1f} s; wrote {path}")
        for line in describe(table):
            log(line)
    return table


def read_table(path: str) -> dict:
    """The table at `path` (ValueError naming the file when it is not one)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except ValueError as e:
        raise ValueError(f"strategy table {path}: not valid JSON: {e}") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("parts"), dict):
        raise ValueError(f"strategy table {path}: not a finequant strategy table")
    return table


def _range(b: Sequence) -> str:
    lo, hi = b
    return f"{lo}+" if hi is None else str(lo) if lo == hi else f"{lo}-{hi}"


def describe(table: dict) -> List[str]:
    """Lines for `finequant info` / `tune`: per part the kernel of each bucket, speed-up and accuracy."""
    cpu, backend = machine()
    lines = [f"strategy:      measured on {table.get('cpu')} / {table.get('backend')}, {table.get('threads')} threads"]
    if (table.get("cpu"), table.get("backend")) != (cpu, backend):
        lines.append(f"               ignored here: this is {cpu} / {backend} (rerun `finequant tune`)")
    buckets = table.get("buckets", [])
    extra = 0
    for part in PARTS:
        e = table["parts"].get(part)
        if not e:
            continue
        cells = []
        for i, b in enumerate(buckets):
            c = e["choice"][i]
            cell = f"M {_range(b)} {c}"
            secs = e.get("seconds", {})
            if c != "int" and secs:
                ms = [str(m) for m in SAMPLE_ROWS.get(i, ()) if str(m) in secs.get(c, {})]
                if ms:
                    cell += " ({:.2f}x)".format(min(secs["int"][m] / secs[c][m] for m in ms))
            cells.append(cell)
        acc = e.get("accuracy")
        acc_s = f"; {acc['precision']} weight-only: max rel output diff {acc['max_rel_output_diff']:.2e}" if acc else ""
        lines.append(f"  {part:<9} " + ", ".join(cells) + acc_s)
        if any(c != "int" for c in e["choice"]):
            extra += 1
    if extra:
        lines.append(f"               {extra} part(s) hold a weight-only copy of their weights (float activations)")
    return lines
