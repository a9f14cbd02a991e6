"""`make demo`: quantize the two real models with the main schemes, run them in the C++ engine,
and print quality and speed against fp32 measured in the same run.

Per model and scheme: file size, compression vs fp32, the mean relative weight error
||W - deq(Q(W))||_F / ||W||_F over the quantized Linears; then, in the engine, SmolLM2's perplexity
on Austen's Emma and greedy decode speed, MiniLM's embedding cosine to fp32 and throughput.
The engine runs on a GPU when one is present (FINEQUANT_DEVICE=auto, the default; "cpu" forces the CPU).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prepare_models import cache_dir, prepare  # noqa: E402
from prepare_text import prepare as prepare_text  # noqa: E402
from prepare_text import rotten_tomatoes  # noqa: E402

from finequant import Engine, _core, hf, rotate, smooth  # noqa: E402
from finequant.lkd import load_torch_model, round_head  # noqa: E402
from finequant.evaluate import cosine_agreement, perplexity  # noqa: E402
from finequant.modelfile import load_info, quantize_model, save  # noqa: E402
from finequant.schemes import default_head_bits, default_parts, parse_scheme  # noqa: E402

# (label, scheme name, options for parse_scheme); the DEFAULTS are what `finequant quantize SRC -o OUT
# [--scheme w4a8]` makes: outlier smoothing first (finequant.smooth), then asymmetric activations, a decoder's
# LM head with its input rotated (W8A8: INT8; W4A8: INT4, GPTQ-rounded on the model's own samples), and for INT4
# the block-Hadamard rotation and fp16 scales.
DEFAULT = "w8a8 default"
DEFAULT_W4 = "w4a8 default"
DEFAULTS = (DEFAULT, DEFAULT_W4)
SCHEMES = [
    ("fp32", "fp32", {}),
    (DEFAULT, "w8a8", {"act_symmetric": False}),
    ("w8a8", "w8a8", {}),
    ("w8a8 asym", "w8a8", {"weight_symmetric": False, "act_symmetric": False}),
    ("w4a8 kblock=32", "w4a8", {"grouping": ("kblock", 32)}),
    (DEFAULT_W4, "w4a8", {"act_symmetric": False, "rotation": rotate.DEFAULT_BLOCK, "scale_dtype": "fp16"}),
    ("w4/8a8", "w4/8a8", {}),
    ("w4a4", "w4a4", {}),
]
MODELS = [("minilm", "all-MiniLM-L6-v2"), ("smollm2", "SmolLM2-135M-Instruct")]


DEVICE = os.environ.get("FINEQUANT_DEVICE", "auto")
PPL_TOKENS = 4096  # first tokens of Emma scored (windows of 512): 1024 could not rank the w8a8 variants (+-1%)
PROMPT = "The capital of France is"
SNIPPETS = 200  # Rotten Tomatoes snippets embedded by MiniLM


def run_engines(key: str, dirs: dict) -> None:
    """Quality and speed of each quantized file in the C++ engine, against fp32 in the same run."""
    backend = Engine(next(iter(dirs.values())), device=DEVICE).backend
    print(f"\n-- {key} in the finequant engine ({backend}; CUDA backend "
          f"{'built' if _core.cuda_backend_built() else 'not built'}, {_core.cuda_device_count()} GPU(s))")
    if key == "smollm2":
        emma = (prepare_text() / "emma.txt").read_text()
        print(f"{'scheme':<18}{'ppl':>9}{'vs fp32':>9}{'decode tok/s':>14}{'vs fp32':>9}  greedy continuation")
        base = None
        for label, path in dirs.items():
            engine = Engine(path, device=DEVICE)
            ppl = perplexity(engine, emma, ctx=512, max_tokens=PPL_TOKENS)["perplexity"]
            engine.generate(PROMPT, max_new_tokens=2, stop_tokens=[])  # warm up
            tps = 0.0
            for _ in range(3):  # the best of 3: one 32-token call moved by +-10% between runs
                t0 = time.perf_counter()
                text = engine.generate(PROMPT, max_new_tokens=32, stop_tokens=[])
                tps = max(tps, 32 / (time.perf_counter() - t0))
            base = base or (ppl, tps)
            print(f"{label:<18}{ppl:>9.2f}{ppl / base[0]:>8.3f}x{tps:>14.1f}{tps / base[1]:>8.2f}x  "
                  f"{text[:40]!r}")
    else:
        texts = rotten_tomatoes()[0][:SNIPPETS]
        print(f"{'scheme':<18}{'cosine to fp32 (mean / min)':>30}{'snippets/s':>12}{'vs fp32':>9}")
        base = None
        for label, path in dirs.items():
            engine = Engine(path, device=DEVICE)
            t0 = time.perf_counter()
            emb = engine.embed(texts)
            rate = len(texts) / (time.perf_counter() - t0)
            base = base or (emb, rate)
            cos = cosine_agreement(emb, base[0])
            print(f"{label:<18}{cos.mean():>21.4f} / {cos.min():.4f}{rate:>12.1f}{rate / base[1]:>8.2f}x")


def main() -> int:
    out_root = os.path.join(os.path.dirname(cache_dir().rstrip(os.sep)), "demo")
    for key, title in MODELS:
        src = prepare(key)
        t0 = time.time()
        model = hf.load(src)
        print(f"\n== {title} ({model.family}, {model.num_layers} layers) from {src}")
        print(f"{'scheme':<18}{'file MB':>10}{'vs fp32':>10}{'weight err':>12}")
        dirs = {}
        for label, name, opts in SCHEMES:
            if label in DEFAULTS:  # the parts `quantize` gives it (a decoder's LM head too, rotated)
                parts = default_parts(name, model.family)
                head = {"head_rotation": rotate.DEFAULT_BLOCK, "head_bits": default_head_bits(name)}
                opts = {**opts, "parts": parts, **(head if parts else {})}
            scheme = parse_scheme(name, **opts)
            errors: dict = {}
            quantized = model
            if label in DEFAULTS:
                quantized = model.copy()
                torch_model = load_torch_model(src, model.family)
                smooth.smooth_model(quantized, scheme, torch_model)
                if scheme.int4_head:
                    round_head(quantized, scheme, torch_model)
            tensors, metadata = quantize_model(quantized, scheme, errors=errors)
            out = os.path.join(out_root, key, label.replace(" ", "_").replace("/", "-"))
            save(out, tensors, metadata, tokenizer_src=src)
            dirs[label] = out
            info = load_info(out)
            err = sum(errors.values()) / len(errors) if errors else 0.0
            print(f"{label:<18}{info['file_size'] / 2**20:>10.1f}"
                  f"{info['compression']:>9.2f}x{err:>12.4f}")
        print(f"({time.time() - t0:.0f} s; model files under {os.path.join(out_root, key)})")
        run_engines(key, dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
