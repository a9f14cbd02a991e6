"""`make demo`: quantize the two real models with the main schemes and report size and weight error.

Prints, per model and scheme: file size, compression vs fp32 and the mean relative weight error
||W - deq(Q(W))||_F / ||W||_F over the quantized Linears.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prepare_models import cache_dir, prepare  # noqa: E402

from finequant import hf  # noqa: E402
from finequant.modelfile import load_info, quantize_model, save  # noqa: E402
from finequant.schemes import parse_scheme  # noqa: E402

# (label, scheme name, options for parse_scheme)
SCHEMES = [
    ("fp32", "fp32", {}),
    ("w8a8", "w8a8", {}),
    ("w8a8 asym", "w8a8", {"weight_symmetric": False, "act_symmetric": False}),
    ("w4a8 kblock=32", "w4a8", {"grouping": ("kblock", 32)}),
    ("w4/8a8", "w4/8a8", {}),
    ("w4a4", "w4a4", {}),
]
MODELS = [("minilm", "all-MiniLM-L6-v2"), ("smollm2", "SmolLM2-135M-Instruct")]


def main() -> int:
    out_root = os.path.join(os.path.dirname(cache_dir().rstrip(os.sep)), "demo")
    for key, title in MODELS:
        src = prepare(key)
        t0 = time.time()
        model = hf.load(src)
        print(f"\n== {title} ({model.family}, {model.num_layers} layers) from {src}")
        print(f"{'scheme':<18}{'file MB':>10}{'vs fp32':>10}{'weight err':>12}")
        for label, name, opts in SCHEMES:
            scheme = parse_scheme(name, **opts)
            errors: dict = {}
            tensors, metadata = quantize_model(model, scheme, errors=errors)
            out = os.path.join(out_root, key, label.replace(" ", "_").replace("/", "-"))
            save(out, tensors, metadata, tokenizer_src=src)
            info = load_info(out)
            err = sum(errors.values()) / len(errors) if errors else 0.0
            print(f"{metadata['scheme']:<18}{info['file_size'] / 2**20:>10.1f}"
                  f"{info['compression']:>9.2f}x{err:>12.4f}")
        print(f"({time.time() - t0:.0f} s; model files under {os.path.join(out_root, key)})")
    print("\nNext: the C++ inference engine runs these files (perplexity / embedding agreement).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
