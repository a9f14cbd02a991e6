"""Outlier smoothing: per-channel factors that move activation outliers into the weights (SmoothQuant,
Xiao et al. 2023), computed from data the tool makes itself.

Token-wise INT8 activations lose precision to a few input channels whose values are 10-100x the rest
(the q/k/v and MLP inputs of decoders). For a Linear y = x W^T whose input channel j can be scaled at
its producer, x_j / s_j and W[:, j] * s_j give the same y in exact arithmetic; with
    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)
the activation range shrinks and the weight (quantized per output row, so a column factor spreads
over every row's range) takes part of it. The producers are folded in place, so the model file, the
engine and its kernels are unchanged:
    q/k/v and gate/up inputs: the pre-norm's weight (and bias) / s  (pre-norm blocks: llama, gpt2)
    o_proj / c_proj input:    the value projection's rows (and bias) / s (grouped-query attention: one
                              factor per value channel, the largest over the query heads sharing it)
    down_proj input:          up_proj's rows / s (llama: down's input is silu(gate) * up)
A post-norm block (BERT) has its norms on the residual stream, so only its attention output is
smoothed there; GPT-2's c_proj of the MLP follows a GeLU and is left alone.

max|x_j| comes from a forward pass of the fp32 model over token ids made without user data (random
ids, or the model's own samples: lkd.make_data), recorded at each Linear's input.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from . import hf

if TYPE_CHECKING:  # torch is imported where the calibration runs: smoothable_parts works without it
    import torch

# alpha: the share of the outlier range moved into the weights. SmolLM2-135M W8A8 perplexity on
# held-out text over alpha 0.3-0.9: best at 0.7 (docs/DESIGN.md section 6, bench/results/ACCURACY.md).
DEFAULT_ALPHA = 0.7
# the activation sample: random token ids (the model's own samples measured no better), seeded
DEFAULT_SAMPLES, DEFAULT_SEQ = 64, 256
# factors are clamped to [1 / MAX_FACTOR, MAX_FACTOR]: a channel that never fired in the sample
# (max ~ 0) must not blow its weights up
MAX_FACTOR = 1e4


def _groups(family: str, config: dict, i: int) -> List[Tuple[str, str, List[str], str]]:
    """(part, producer kind, consumer Linear names, producer name) for block i, producer kind one of
    'norm' (a norm weight [+ bias]), 'rows' (a Linear's output rows [+ bias], possibly a slice)."""
    if family == "llama":
        p = f"model.layers.{i}."
        # Gemma 2's MLP input norm is pre_feedforward_layernorm (its post_attention_layernorm normalizes
        # the attention output); Phi-3's q/k/v and gate/up are one Linear each (rows [q; k; v], [gate; up]).
        mlp_norm = "pre_feedforward_layernorm" if config.get("model_type") == "gemma2" else "post_attention_layernorm"
        if hf.fused_phi3(config):
            return [("qkv", "norm", [p + "self_attn.qkv_proj"], p + "input_layernorm"),
                    ("fc1", "norm", [p + "mlp.gate_up_proj"], p + mlp_norm),
                    ("attn_out", "rows", [p + "self_attn.o_proj"], p + "self_attn.qkv_proj"),
                    ("fc2", "rows", [p + "mlp.down_proj"], p + "mlp.gate_up_proj")]
        return [("qkv", "norm", [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                 p + "input_layernorm"),
                ("fc1", "norm", [p + "mlp.gate_proj", p + "mlp.up_proj"], p + mlp_norm),
                ("attn_out", "rows", [p + "self_attn.o_proj"], p + "self_attn.v_proj"),
                ("fc2", "rows", [p + "mlp.down_proj"], p + "mlp.up_proj")]
    if family == "gpt2":
        p = f"h.{i}."
        return [("qkv", "norm", [p + "attn.c_attn"], p + "ln_1"),
                ("fc1", "norm", [p + "mlp.c_fc"], p + "ln_2"),
                ("attn_out", "rows", [p + "attn.c_proj"], p + "attn.c_attn")]
    if family == "bert":
        p = f"encoder.layer.{i}."
        return [("attn_out", "rows", [p + "attention.output.dense"], p + "attention.self.value")]
    raise NotImplementedError(f"smoothing: unsupported family {family!r}")


def collect_input_maxima(model: torch.nn.Module, ids: torch.Tensor, batch: int,
                         names: List[str]) -> Dict[str, torch.Tensor]:
    """max |x| per input channel of each named Linear over every token of `ids` [N, T]."""
    import torch

    modules = dict(model.named_modules())
    # transformers' causal-LM classes wrap the base model (GPT-2: "transformer.h.0...", canonical "h.0...")
    prefix = "transformer." if "transformer.h.0" in modules else ""
    maxima: Dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = modules.get(prefix + name, modules.get(name))
        if module is None:
            raise ValueError(f"smoothing: the model has no module {name}")

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            maxima[name] = x if name not in maxima else torch.maximum(maxima[name], x)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                x = ids[i:i + batch]
                model(input_ids=x, attention_mask=torch.ones_like(x))
    finally:
        for h in handles:
            h.remove()
    return maxima


def consumers(family: str, config: dict, parts) -> List[str]:
    """The Linears whose input maxima smoothing needs, for the given quantized parts."""
    return [c for i in range(hf.num_layers(config)) for part, _, cs, _ in _groups(family, config, i)
            if part in parts for c in cs]


def _value_rows(family: str, config: dict, producer: str, t: Dict[str, torch.Tensor]) -> slice:
    """Rows of the producer Linear that feed the consumer's input: the value projection's (attention
    output) or the up projection's (Llama's down_proj input)."""
    if family == "gpt2":  # c_attn rows are [q; k; v]
        hidden = t[producer + ".weight"].shape[1]
        return slice(2 * hidden, 3 * hidden)
    if producer.endswith(".qkv_proj"):  # Phi-3: [q; k; v]
        heads, kv_heads = _heads(config)
        hd = int(config.get("head_dim") or t[producer + ".weight"].shape[1] // heads)
        return slice((heads + kv_heads) * hd, (heads + 2 * kv_heads) * hd)
    if producer.endswith(".gate_up_proj"):  # Phi-3: [gate; up]
        n = t[producer + ".weight"].shape[0]
        return slice(n // 2, n)
    return slice(None)


def _heads(config: dict) -> Tuple[int, int]:
    heads = int(config.get("num_attention_heads", config.get("n_head", 1)))
    return heads, int(config.get("num_key_value_heads", heads))


def factors(config: dict, part: str, x_max: torch.Tensor, weights: List[torch.Tensor], alpha: float) -> torch.Tensor:
    """s per input channel of the consumers (their weights [N, K]) given max |x| per channel."""
    import torch

    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    heads, kv_heads = _heads(config)
    group = heads // kv_heads if part == "attn_out" else 1
    if group > 1:  # one factor per value channel: the consumer's channels (h, d) of a group share it
        hd = x_max.numel() // heads
        x_max = x_max.view(kv_heads, group, hd).amax(1).repeat_interleave(group, 0).reshape(-1)
        w_max = w_max.view(kv_heads, group, hd).amax(1).repeat_interleave(group, 0).reshape(-1)
    s = x_max.clamp_min(1e-8).pow(alpha) / w_max.clamp_min(1e-8).pow(1 - alpha)
    return s.clamp(1 / MAX_FACTOR, MAX_FACTOR)


def _fold(model: hf.HFModel, i: int, part: str, s: torch.Tensor) -> None:
    """Consumers' columns * s, the producer / s (model.tensors, in place)."""
    t, family = model.tensors, model.family
    (kind, linears, producer), = [(k, c, p) for q, k, c, p in _groups(family, model.config, i) if q == part]
    for n in linears:
        t[n + ".weight"] = t[n + ".weight"] * s[None, :]
    if kind == "norm":
        if model.config.get("model_type") in ("gemma", "gemma2"):  # the norm multiplies by (1 + weight)
            t[producer + ".weight"] = (1 + t[producer + ".weight"]) / s - 1
        else:
            t[producer + ".weight"] = t[producer + ".weight"] / s
        if producer + ".bias" in t:
            t[producer + ".bias"] = t[producer + ".bias"] / s
        return
    heads, kv_heads = _heads(model.config)
    group = heads // kv_heads if part == "attn_out" else 1
    per_row = s.view(kv_heads, group, -1)[:, 0, :].reshape(-1) if group > 1 else s
    rows = _value_rows(family, model.config, producer, t)
    w = t[producer + ".weight"].clone()
    w[rows] = w[rows] / per_row[:, None]
    t[producer + ".weight"] = w
    if producer + ".bias" in t:
        b = t[producer + ".bias"].clone()
        b[rows] = b[rows] / per_row
        t[producer + ".bias"] = b


def apply(model: hf.HFModel, maxima: Dict[str, torch.Tensor], alphas: Dict[Tuple[int, str], Optional[float]]) -> Dict[str, float]:
    """Fold the factors of alphas[(block, part)] (None: leave it) into model.tensors in place.
    Returns per part the mean reduction of the largest input channel over the average one (before /
    after), for reports."""
    report: Dict[str, List[float]] = {}
    for i in range(model.num_layers):
        for part, _, linears, _ in _groups(model.family, model.config, i):
            alpha = alphas.get((i, part))
            if alpha is None:
                continue
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
            x_max = maxima[linears[0]]
            s = factors(model.config, part, x_max, [model.tensors[n + ".weight"] for n in linears], alpha)
            _fold(model, i, part, s)
            report.setdefault(part, []).append(float((x_max.max() / x_max.mean()) / ((x_max / s).max() / (x_max / s).mean())))
    return {p: sum(v) / len(v) for p, v in report.items()}


def smoothable_parts(model: hf.HFModel, scheme) -> List[str]:
    """The parts this family can smooth whose activations the scheme quantizes."""
    t, parts = model.tensors, model.linear_parts()
    out = []
    for part, _, linears, _ in _groups(model.family, model.config, 0):
        if all(scheme.for_linear(parts[n], *t[n + ".weight"].shape).act_bits for n in linears):
            out.append(part)
    return out


def smooth_model(model: hf.HFModel, scheme, torch_model: torch.nn.Module, alpha: float = DEFAULT_ALPHA,
                 samples: int = DEFAULT_SAMPLES, seq: int = DEFAULT_SEQ, seed: int = 0, batch: int = 8) -> dict:
    """Smooth every block of `model` (in place) for `scheme` and copy the result into `torch_model`
    (the same model as transformers loads it, e.g. for LKD afterwards). Returns what was done, for
    the model file's metadata."""
    import torch

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    parts = smoothable_parts(model, scheme)
    if not parts:
        return {}
    for key in ("max_position_embeddings", "n_positions"):
        if key in model.config:
            seq = min(seq, int(model.config[key]))
    vocab = int(model.config.get("vocab_size") or model.tensors[hf.embedding_name(model.family)].shape[0])
    ids = torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(seed))
    maxima = collect_input_maxima(torch_model, ids, batch, consumers(model.family, model.config, parts))
    reduction = apply(model, maxima, {(i, p): alpha for i in range(model.num_layers) for p in parts})
    hf.copy_into_torch(model, torch_model)
    return {"alpha": alpha, "parts": parts, "data": f"random ids {samples}x{seq} seed {seed}",
            "outlier_reduction": {p: round(r, 2) for p, r in reduction.items()}}
