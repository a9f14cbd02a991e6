"""`finequant inspect`: a picture of why token-wise activations and group-wise weights matter
(ZeroQuant figure 1). The fp32 model runs in torch on a few sequences; forward hooks record, for the
input of each block GEMM, the max |x| of every token, and each weight gives the max |w| of every output
row. One scale per tensor must cover the largest of these, so when ranges vary a lot between tokens
(or rows) most of them are left with a few quantization levels."""
from __future__ import annotations

import re
from typing import Dict, Optional

import numpy as np
import torch

from . import hf
from .schemes import PARTS
from .simulate import _find_module, _linear_weight


def collect_ranges(model: torch.nn.Module, family: str, num_layers: int, ids: torch.Tensor, batch: int = 4):
    """{part: [per layer (token max-abs [tokens], row max-abs [rows])]} for the block GEMMs of `model`
    (a transformers model) run on token ids [N, T]. The Linears of one part (q/k/v, gate/up) share their
    input, so the first one's is recorded; their weight rows are pooled."""
    acts: Dict[tuple, list] = {}
    rows: Dict[tuple, list] = {}
    hooks = []
    config = {"model_type": getattr(getattr(model, "config", None), "model_type", None)}  # Phi-3: fused names
    for name, part in hf.linear_parts(family, num_layers, config).items():
        layer = int(re.search(r"(?:^|\.)(\d+)\.", name).group(1))
        module = _find_module(model, name)[1]
        rows.setdefault((part, layer), []).append(_linear_weight(module).detach().abs().amax(1))
        if (part, layer) not in acts:
            acts[(part, layer)] = []
            record = acts[(part, layer)]
            hooks.append(module.register_forward_hook(
                lambda m, inp, out, record=record: record.append(inp[0].detach().abs().amax(-1).flatten())))
    extra = {} if family == "bert" else {"use_cache": False}
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                x = ids[i:i + batch]
                model(input_ids=x, attention_mask=torch.ones_like(x), **extra)
    finally:
        for h in hooks:
            h.remove()
    return {part: [(torch.cat(acts[(part, k)]).numpy(), torch.cat(rows[(part, k)]).numpy())
                   for k in range(num_layers)] for part in PARTS}


def spread(values: np.ndarray) -> float:
    """Largest over median: how many times the range one shared scale must cover exceeds the typical."""
    med = float(np.median(values))
    return float(values.max()) / med if med > 0 else float("inf")


def plot_ranges(ranges: dict, path: str, title: str = "") -> None:
    """Box plots per layer (whiskers: min and max) of the token ranges (top) and row ranges (bottom)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    parts = list(ranges)
    layers = len(ranges[parts[0]])
    fig, axes = plt.subplots(2, len(parts), figsize=(3.2 * len(parts) + 1, 6.5), squeeze=False)
    for j, part in enumerate(parts):
        for i, (what, color) in enumerate((("input max|x| per token", "tab:blue"), ("weight max|w| per row", "tab:orange"))):
            ax = axes[i, j]
            ax.boxplot([r[i] for r in ranges[part]], whis=(0, 100), showfliers=False, widths=0.6,
                       patch_artist=True, boxprops={"facecolor": color, "alpha": 0.5},
                       medianprops={"color": "black"})
            ax.set_yscale("log")
            ax.set_title(f"{part}: {what}", fontsize=9)
            step = max(1, layers // 8)
            ax.set_xticks(range(1, layers + 1, step), [str(k) for k in range(0, layers, step)])
            ax.tick_params(labelsize=7)
            if i == 1:
                ax.set_xlabel("layer")
    fig.suptitle(title or "activation and weight ranges per layer (box: quartiles, whiskers: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inspect_model(folder: str, output: str, text_file: Optional[str] = None, samples: int = 4, seq: int = 128,
                  seed: int = 0) -> dict:
    """Plot the ranges of the Hugging Face model in `folder` to the PNG `output`; returns, per part, the
    median and the largest over layers of spread() for tokens ("token_spread", "token_spread_max") and
    weight rows ("row_spread", "row_spread_max")."""
    import os

    from .lkd import LKDOptions, load_torch_model, make_data

    config = hf.read_config(folder)
    family = hf.family_of(config)
    layers = hf.num_layers(config)
    model = load_torch_model(folder, family)
    max_pos = config.get("max_position_embeddings", config.get("n_positions"))
    seq = min(seq, int(max_pos)) if max_pos else seq
    options = LKDOptions(data=text_file or "random", batch=min(4, samples), seq=seq, samples=samples, seed=seed)
    vocab = int(config.get("vocab_size") or model.get_input_embeddings().weight.shape[0])
    ids = make_data(options.check(), model, folder, family, vocab)  # LKD's data: random ids or text windows
    ranges = collect_ranges(model, family, layers, ids)
    source = os.path.basename(text_file) if text_file else "random token ids"
    plot_ranges(ranges, output, f"{os.path.basename(os.path.normpath(folder))} on {len(ids)} x {ids.shape[1]} "
                f"tokens of {source}: ranges per layer (box: quartiles, whiskers: min-max)")
    out = {}
    for part, r in ranges.items():
        tokens, rows = [spread(a) for a, _ in r], [spread(w) for _, w in r]
        out[part] = {"token_spread": float(np.median(tokens)), "token_spread_max": float(max(tokens)),
                     "row_spread": float(np.median(rows)), "row_spread_max": float(max(rows))}
    return out
