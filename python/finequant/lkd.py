"""Layer-by-layer knowledge distillation (ZeroQuant's LKD), one transformer block at a time.

For block k the teacher is the original fp32 block and the student a copy of it whose Linears are
fake-quantized as the model file will store them. Both get the ORIGINAL model's hidden states
entering block k (computed once and streamed: the teacher's output of block k is the input of block
k+1); the student is trained with straight-through rounding to match the teacher's output (MSE, or
KL on the final logits for a decoder's last block), then its weights are written back into the
model (unless it ended worse than plain PTQ of the original block: then the original stays). Only one
block's optimizer state is ever in memory. The trained fp32 weights are quantized
afterwards by the normal PTQ path (modelfile.quantize_model), so the file format does not change.

With `gptq`, each block's quantized Linears are first rounded by GPTQ (error compensation through each
Linear's input Hessian on the same samples; `gptq_weight`), and with steps = 0 that is all: GPTQ without
training, in a fraction of LKD's time (DESIGN.md section 6 has both measured).

Learned clip ranges (`learn_clip`) shrink each weight tile's range by a factor in (0, 1]; at the end
the weights are clamped to it, so PTQ of the clamped weights recomputes exactly the learned scales.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from . import hf
from .rotate import hadamard_matmul, rotate_weight
from .quantize import (_expand, _tiles, fake_quant_activation, fake_quant_weight, quant_max, quantize_tensor,
                       round_scale_to_half)
from .schemes import HEAD, LinearQuant, QuantScheme
from .simulate import _find_module, _linear_weight

# Canonical module name of block i, and the final norm before the LM head, per family.
BLOCKS = {"bert": "encoder.layer.{}", "gpt2": "h.{}", "llama": "model.layers.{}"}
FINAL_NORM = {"gpt2": "ln_f", "llama": "model.norm"}
CLIP_MIN = 0.05  # learned clip factors stay in [CLIP_MIN, 1]: a range can shrink, never grow
GENERATE_BATCH = 64  # sequences sampled at once for data "generate" (the engine's batch)
CLIP_LR_SCALE = 10.0  # clip factors are ~1 and weights ~1e-2: give the factors a larger step
# Default learning rate of a block by its narrowest quantized weights: at 3e-4 INT8-only blocks often
# ended worse than PTQ (Adam moves a weight by many INT8 steps), INT4 ones need it; a w4/8a8 block
# (INT8 attention, INT4 MLP) at 3e-4 reached 36.85 SmolLM2 perplexity, with its INT8 Linears at 1e-4
# 37.04 (bench/results/ACCURACY.md).
LR_BY_BITS = {8: 1e-4, 4: 3e-4}


@dataclass
class LKDOptions:
    # "auto" (decoders: "generate", encoders: "random"), "random" token ids, "generate" (the model's own
    # samples) or a text file path. Own samples closed 34% / 45% of SmolLM2's w4/8a8 / w4a8 PTQ gap against
    # 21% / 25% for random ids (bench/results/ACCURACY.md), for ~25 s of sampling (the engine's, _sample).
    data: str = "auto"
    steps: int = 100       # optimizer steps per block (0: no training, with gptq)
    batch: int = 4         # sequences per step
    seq: int = 128         # tokens per sequence
    samples: int = 64      # distinct sequences whose hidden states are held (rounded up to a batch multiple)
    # Adam learning rate (linearly decayed to 0 over the steps); None: by the block's weight bits (LR_BY_BITS)
    lr: Optional[float] = None
    seed: int = 0
    learn_clip: bool = False
    # each block's weights rounded by GPTQ on the samples first (alone, with steps 0, the whole method)
    gptq: bool = False
    checkpoint: Optional[str] = None  # directory of per-block checkpoints: resume from it if present
    progress: bool = True

    def check(self, max_positions: Optional[int] = None) -> "LKDOptions":
        for name in ("steps", "batch", "samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" and self.gptq else 1):
                raise ValueError(f"LKD {name} must be a positive integer, got {v!r}")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 2:
            raise ValueError(f"LKD sequence length must be an integer >= 2, got {self.seq!r}")
        if max_positions is not None and self.seq > max_positions:
            raise ValueError(f"LKD sequence length {self.seq} exceeds the model's {max_positions} positions")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"LKD learning rate must be a positive number, got {self.lr!r}")
        if self.data not in ("auto", "random", "generate") and not os.path.isfile(self.data):
            raise ValueError(f"LKD data must be 'auto', 'random', 'generate' or a text file; {self.data!r} is "
                             "none of these")
        return self


# ---- straight-through fake quantization (forward identical to quantize.fake_quant_*) --------------

class _RoundSTE(torch.autograd.Function):
    """torch.round (half to even) forward, identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _StraightThrough(torch.autograd.Function):
    """Forward: the given fake-quantized values fq (bit-exact); backward: x's gradient unchanged."""

    @staticmethod
    def forward(ctx, x, fq):
        return fq

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quant_ste(x: torch.Tensor, bits: int, symmetric: bool, tile, clip=None,
                   half_scales: bool = False) -> torch.Tensor:
    """Differentiable fake_quant_weight of a 2-D x: the same ops in the same order (so the forward
    values are bit-identical), rounding with a straight-through gradient. The range is taken from x
    without gradient; `clip` (per-tile factors: [tiles] symmetric, [2, tiles] asymmetric) scales it.
    half_scales: the scales rounded to fp16 values (straight through)."""

    def scale_of(s):
        s = torch.where(s == 0, torch.ones_like(s), s)
        return _StraightThrough.apply(s, round_scale_to_half(s.detach())) if half_scales else s

    rows, cols = int(tile[0]), int(tile[1])
    c = x.shape[1]
    t = _tiles(x.detach(), rows, cols)
    qmax = quant_max(bits, symmetric)
    if symmetric:
        hi = t.abs().amax(dim=(1, 3))
        if clip is not None:
            hi = clip * hi
            big = _expand(hi, rows, cols, c)
            x = torch.minimum(torch.maximum(x, -big), big)
        s = scale_of(hi / qmax)
        se = _expand(s, rows, cols, c)
        return torch.clamp(_RoundSTE.apply(x / se), -qmax, qmax) * se
    lo = torch.clamp(t.amin(dim=(1, 3)), max=0.0)
    hi = torch.clamp(t.amax(dim=(1, 3)), min=0.0)
    if clip is not None:
        lo, hi = clip[0] * lo, clip[1] * hi
        x = torch.minimum(torch.maximum(x, _expand(lo, rows, cols, c)), _expand(hi, rows, cols, c))
    s = scale_of((hi - lo) / qmax)
    z = torch.clamp(_RoundSTE.apply(-lo / s), 0, qmax)
    se, ze = _expand(s, rows, cols, c), _expand(z, rows, cols, c)
    return (torch.clamp(_RoundSTE.apply(x / se) + ze, 0, qmax) - ze) * se


class LKDLinear(nn.Module):
    """The trainable student of one Linear: fp32 master weight [out, in], fake-quantized (STE) on use,
    with token-wise fake-quantized inputs, as QuantLinear computes."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearQuant,
                 learn_clip: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())
        self.spec = spec
        self.clip = None
        if learn_clip and spec.weight_bits:
            n, k = self.weight.shape
            tiles = (n // spec.tile[0], -(-k // spec.tile[1]))
            self.clip = nn.Parameter(torch.ones(tiles if spec.weight_symmetric else (2,) + tiles))

    def quantized_weight(self) -> torch.Tensor:
        s = self.spec
        # The master weight stays unrotated (what the model file is made from); the file holds W H,
        # which training approximates to fp32 rounding (hadamard_matmul: the fast form, its docstring says why).
        w = hadamard_matmul(self.weight, s.rotation) if s.rotation else self.weight
        if not s.weight_bits:
            return w
        if self.clip is not None:  # the clip factors need the gradient through the scale
            return fake_quant_ste(w, s.weight_bits, s.weight_symmetric, s.tile, self.clip, s.half_scales)
        # Nothing is clamped without clips, so a plain straight-through is the same gradient, and far
        # cheaper than autograd through the elementwise ops.
        fq = fake_quant_weight(w.detach(), s.weight_bits, s.weight_symmetric, s.tile, s.half_scales)
        return _StraightThrough.apply(w, fq)

    @torch.no_grad()
    def baked_weight(self) -> torch.Tensor:
        """The weight to store: clamped to the learned clip range, so PTQ finds the learned scales."""
        w = self.weight.detach().clone()
        if self.clip is None:
            return w
        if self.spec.rotation:  # clip in the rotated domain (where the scales are), rotate back (H H = I)
            w = rotate_weight(w, self.spec.rotation)
        rows, cols = self.spec.tile
        t = _tiles(w, rows, cols)
        k = w.shape[1]
        if self.spec.weight_symmetric:
            big = _expand(self.clip * t.abs().amax(dim=(1, 3)), rows, cols, k)
            w = torch.minimum(torch.maximum(w, -big), big)
        else:
            lo = self.clip[0] * torch.clamp(t.amin(dim=(1, 3)), max=0.0)
            hi = self.clip[1] * torch.clamp(t.amax(dim=(1, 3)), min=0.0)
            w = torch.minimum(torch.maximum(w, _expand(lo, rows, cols, k)), _expand(hi, rows, cols, k))
        # (rotating back and again when the file is written may move a clipped value by an ulp)
        return rotate_weight(w, self.spec.rotation) if self.spec.rotation else w

    def prepared_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the (rotated) weight multiplies it: rotated, then fake-quantized token-wise."""
        x = x.to(torch.float32)
        s = self.spec
        if s.rotation:
            x = hadamard_matmul(x, s.rotation)
        if s.act_bits:
            x = _StraightThrough.apply(x, fake_quant_activation(x.detach(), s.act_bits, s.act_symmetric))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.prepared_input(x), self.quantized_weight(), self.bias)


# ---- GPTQ rounding (quantize --gptq; optionally LKD's starting point; DESIGN.md section 6) ---------

# Added to the Hessian's diagonal, times its mean diagonal: GPTQ's usual 0.01 fitted the own samples and lost to
# plain rounding on held-out text in later SmolLM2 blocks; 1.0 lowered every block measured (DESIGN.md 6).
GPTQ_DAMP = 1.0
GPTQ_COLUMNS = 128  # columns rounded before their errors reach the rest of the weight (GPTQ's lazy batch)
# The INT4 LM head's damping (round_head): its input, the final norm's output, has no late-block drift, and 1%
# did best on held-out text (SmolLM2-135M Emma, fp32 body: 33.81 against 34.00 at 100%; DESIGN.md section 6);
# with its input rotated (the default) 10%: Emma 32.43 against 32.63 at 1%, Moby Dick 45.05 against 45.18.
HEAD_GPTQ_DAMP, HEAD_GPTQ_DAMP_ROTATED = 0.01, 0.1


@torch.no_grad()
def gptq_weight(w: torch.Tensor, h: torch.Tensor, spec: LinearQuant, damp: float = GPTQ_DAMP) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) of a weight w [N, K] as the Linear multiplies it (rotated), for inputs
    whose second moment is h = sum_t x_t x_t^T [K, K]: the columns are rounded in order, each one's error
    spread over the columns not yet rounded through the inverse Hessian's Cholesky factor, so the output
    error over those inputs is (nearly) least squares instead of each weight's own rounding. Each tile's
    scale (and zero point) comes from its current values when the loop reaches it, and the element that
    set it keeps its end of the range, so PTQ of the result (quantize.quantize_tensor) finds the same
    scales and integers. Returns the dequantized weights [N, K], fp32."""
    w = w.detach().to(torch.float32).clone()
    n, k = w.shape
    rows, cols = int(spec.tile[0]), int(spec.tile[1])
    bits, sym = spec.weight_bits, spec.weight_symmetric
    qmax = quant_max(bits, sym)
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0  # inputs that are always 0: any weight serves, keep it
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    # Upper Cholesky factor of H^-1: row i holds how column i's error moves the columns after it.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    out = torch.empty_like(w)
    span = (GPTQ_COLUMNS // cols) * cols if cols <= GPTQ_COLUMNS else GPTQ_COLUMNS  # tiles whole in a span
    for c0 in range(0, k, span):
        c1 = min(k, c0 + span)
        ws, err = w[:, c0:c1].clone(), torch.empty(n, c1 - c0)
        for j in range(c0, c1):
            if j % cols == 0:  # a new column of tiles: its scales from the current values
                g1 = min(k, j + cols)
                cur = torch.cat([ws[:, j - c0:], w[:, c1:g1]], dim=1) if g1 > c1 else ws[:, j - c0:g1 - c0]
                qt = quantize_tensor(cur, bits, sym, (rows, g1 - j), spec.half_scales)
                s = qt.scale[:, 0].repeat_interleave(rows)
                z = None if sym else qt.zero_point[:, 0].to(torch.float32).repeat_interleave(rows)
                t = cur.reshape(n // rows, -1)  # each tile's values in a row
                if sym:
                    ends = t.abs() == t.abs().amax(1, keepdim=True)
                else:
                    ends = ((t == t.amax(1, keepdim=True)) & (t > 0)) | ((t == t.amin(1, keepdim=True)) & (t < 0))
                keep = ends.reshape(cur.shape)  # the range's ends: their integers stay at the ends
                q_ends = qt.q.to(torch.float32)
            col = ws[:, j - c0]
            q = torch.round(col / s)
            q = torch.clamp(q, -qmax, qmax) if sym else torch.clamp(q + z, 0, qmax)
            q = torch.where(keep[:, j % cols], q_ends[:, j % cols], q)
            value = q * s if sym else (q - z) * s
            out[:, j] = value
            e = (col - value) / u[j, j]
            ws[:, j - c0:] -= e[:, None] * u[j, j:c1][None, :]
            err[:, j - c0] = e
        w[:, c1:] -= err @ u[c0:c1, c1:]
    return out


@torch.no_grad()
def _gptq_student(student: nn.Module, x: torch.Tensor, y: torch.Tensor, rest, kwargs, batch: int) -> None:
    """Replace each quantized LKDLinear's weight in `student` by its GPTQ rounding for the inputs it sees
    on the samples x. Each token's input counts by 1 / |y_t|^2 (y: the teacher's block output), the
    weight relative_token_mse gives its error: a decoder's first token, ~100x the others, would
    otherwise own the Hessians of the Linears after the norms."""
    linears = [m for m in student.modules() if isinstance(m, LKDLinear) and m.spec.weight_bits]
    hessians = {id(m): torch.zeros(m.weight.shape[1], m.weight.shape[1], dtype=torch.float64) for m in linears}
    current = {}

    def hook(module, args):
        xs = module.prepared_input(args[0]).reshape(-1, module.weight.shape[1])
        xs = xs * current["weight"].reshape(-1, 1).sqrt()
        hessians[id(module)] += (xs.T @ xs).to(torch.float64)

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        for i in range(0, len(x), batch):
            norms = y[i:i + batch].pow(2).sum(-1).clamp_min(1e-30)
            current["weight"] = 1.0 / norms
            _call(student, x[i:i + batch], rest, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for m in linears:
        s = m.spec
        w = hadamard_matmul(m.weight, s.rotation) if s.rotation else m.weight
        wq = gptq_weight(w, hessians[id(m)], s)
        m.weight.copy_(rotate_weight(wq, s.rotation) if s.rotation else wq)


@torch.no_grad()
def round_head(model: hf.HFModel, scheme: QuantScheme, torch_model: Optional[nn.Module] = None) -> dict:
    """GPTQ rounding of a decoder's INT4 LM head (quantize --head-bits 4; DESIGN.md section 6): the Hessian of
    its inputs (the final norm's output, rotated and INT8-quantized as the engine will) over the model's own
    samples (LKD's default data, make_data "generate"), damping HEAD_GPTQ_DAMP (HEAD_GPTQ_DAMP_ROTATED for a
    rotated input). Sets model.tensors["lm_head.weight"] to the rounded fp32 weights, which PTQ stores exactly;
    a tied embedding table keeps its fp32 rows for the lookups. `torch_model`: the transformers model of
    model.tensors (loaded from model.folder when not given). Returns the record of the file's "head_rounding"
    metadata."""
    if model.family == "bert" or model.family in hf.SEQ2SEQ_FAMILIES:
        raise ValueError(f"GPTQ rounding of the LM head needs a decoder-only model, not {model.family}")
    name = "lm_head.weight" if "lm_head.weight" in model.tensors else hf.embedding_name(model.family)
    t = model.tensors[name]
    w = t.detach().to(torch.float32) if torch.is_tensor(t) else torch.from_numpy(np.array(t, dtype=np.float32))
    n, k = w.shape
    lq = scheme.for_linear(HEAD, n, k)
    if lq.weight_bits != 4:
        raise ValueError(f"GPTQ rounding of the LM head is for INT4 heads; this scheme's head has "
                         f"{lq.weight_bits or 'floating-point'} weights")
    if torch_model is None:
        torch_model = load_torch_model(model.folder, model.family)
    positions = _max_positions(model.config)
    o = LKDOptions(data="generate", seq=min(LKDOptions.seq, positions or LKDOptions.seq), progress=False)
    ids = make_data(o, torch_model, model.folder, model.family, n)
    h = torch.zeros(k, k, dtype=torch.float64)

    def hook(module, args):  # the inputs as the engine multiplies them: rotated, then INT8 tokens
        x = args[0].reshape(-1, k).to(torch.float32)
        if lq.rotation:
            x = hadamard_matmul(x, lq.rotation)
        if lq.act_bits:
            x = fake_quant_activation(x, lq.act_bits, lq.act_symmetric)
        h.add_((x.T @ x).to(torch.float64))

    handle = torch_model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        for i in range(0, len(ids), o.batch):
            torch_model(ids[i:i + o.batch])
    finally:
        handle.remove()
    damp = HEAD_GPTQ_DAMP_ROTATED if lq.rotation else HEAD_GPTQ_DAMP
    if lq.rotation:  # rounded as the file stores it (W H), then rotated back (H H = I): the file rotates again
        rounded = rotate_weight(gptq_weight(rotate_weight(w, lq.rotation), h, lq, damp=damp), lq.rotation)
    else:
        rounded = gptq_weight(w, h, lq, damp=damp)
    model.tensors["lm_head.weight"] = rounded if torch.is_tensor(t) else rounded.numpy()
    return {"method": "gptq", "data": f"generate {len(ids)}x{ids.shape[1]}", "damp": damp}


# ---- the torch model, its blocks and the data -----------------------------------------------------

def load_torch_model(folder: str, family: str) -> nn.Module:
    """The transformers model of a HF folder, fp32, eval mode, frozen."""
    import transformers

    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # LKD shows its own progress
    try:
        model = auto.from_pretrained(folder, dtype=torch.float32).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.requires_grad_(False)
    return model


def _max_positions(config: dict) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions"):
        if key in config:
            return int(config[key])
    return None


def make_data(options: LKDOptions, model: nn.Module, folder: str, family: str, vocab_size: int) -> torch.Tensor:
    """Token ids [N, seq], N = samples rounded up to a multiple of batch (text: at most what it holds)."""
    o = options
    if o.data == "auto":
        o = replace(o, data="random" if family == "bert" else "generate")
    n = -(-o.samples // o.batch) * o.batch
    gen = torch.Generator().manual_seed(o.seed)
    if o.data == "random":
        return torch.randint(0, vocab_size, (n, o.seq), generator=gen)
    if o.data == "generate":
        if family == "bert":
            raise ValueError("LKD data 'generate' needs a decoder; use 'random' or a text file for an encoder")
        bos = model.config.bos_token_id
        start = (torch.full((n, 1), bos) if bos is not None and 0 <= bos < vocab_size
                 else torch.randint(0, vocab_size, (n, 1), generator=gen))
        eos = model.generation_config.eos_token_id  # suppressed, as transformers' min_new_tokens does
        eos = [t for t in ([] if eos is None else [eos] if isinstance(eos, int) else eos) if 0 <= t < vocab_size]
        return torch.cat([start, _sample(folder, start, o.seq - 1, o.seed, eos)], dim=1)
    from transformers import AutoTokenizer

    with open(o.data, encoding="utf-8") as f:
        text = f.read()
    # (transformers 5 would silently build an empty tokenizer from config.json alone)
    if not set(hf.tokenizer_files(folder)) & {"tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model"}:
        raise ValueError(f"LKD text data needs the model's tokenizer, and {folder} has no tokenizer files")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    chunks = len(ids) // o.seq
    if chunks < o.batch:
        raise ValueError(f"{o.data} has {len(ids)} tokens: LKD needs at least batch x seq = "
                         f"{o.batch * o.seq}")
    n = min(n, chunks // o.batch * o.batch)
    starts = torch.randperm(chunks, generator=gen)[:n] * o.seq  # distinct windows spread over the text
    return torch.stack([ids[s:s + o.seq] for s in starts.tolist()])


def _sample(folder: str, start: torch.Tensor, new_tokens: int, seed: int, eos) -> torch.Tensor:
    """`new_tokens` tokens the fp32 model of HF folder `folder` samples after each row of `start` [N, 1]
    (temperature 1, the 50 likeliest tokens, the end-of-text ids `eos` suppressed), by the finequant engine:
    64 x 127 tokens of SmolLM2-135M in 23-28 s against transformers' generate's 124 s (2 cores, DESIGN.md
    section 6). Always the folder's weights, whatever a torch model made of them has become (smoothing keeps
    their function; LKD trains them)."""
    from .engine import Engine

    if not folder:
        raise ValueError("LKD data 'generate' needs the model's Hugging Face folder")
    engine = Engine(folder)
    rows = [np.asarray(engine._engine.generate(start[i:i + GENERATE_BATCH].numpy(), None, new_tokens, 1.0, 50, 1.0,
                                               seed + i, [], None, suppress_tokens=eos), dtype=np.int64)
            for i in range(0, len(start), GENERATE_BATCH)]
    return torch.from_numpy(np.concatenate(rows))


def _block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor, batch: int, decoder: bool):
    """Hidden states entering `block` for every batch of ids, [N, T, H], and the other arguments the
    model passes to its blocks (masks, position ids, rotary embeddings): the same for every batch,
    since all batches have the same shape and no padding."""
    class _Stop(Exception):
        pass

    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop  # only the embeddings are needed

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    hidden = []
    try:
        for i in range(0, len(ids), batch):
            x = ids[i:i + batch]
            extra = {"use_cache": False} if decoder else {}  # a KV cache would grow with each call
            try:
                with torch.no_grad():
                    model(input_ids=x, attention_mask=torch.ones_like(x), **extra)
            except _Stop:
                pass
            args, kwargs = captured["args"], dict(captured["kwargs"])
            hidden.append(args[0] if args else kwargs.pop("hidden_states"))
    finally:
        handle.remove()
    return torch.cat(hidden), tuple(args[1:]), kwargs


def _per_block_arguments(model: nn.Module, blocks, ids: torch.Tensor, decoder: bool):
    """(args after the hidden states, kwargs) the model passes to each block, from one batch: masks
    differ between blocks where the layers do (Gemma 2's and Qwen2's sliding-window layers)."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("hidden_states", None)
        captured.append((tuple(args[1:]), kwargs))

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **({"use_cache": False} if decoder else {}))
    finally:
        for h in handles:
            h.remove()
    return captured


def _call(block: nn.Module, x: torch.Tensor, rest, kwargs) -> torch.Tensor:
    out = block(x, *rest, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _student(block: nn.Module, linears: Dict[str, LinearQuant], learn_clip: bool) -> nn.Module:
    """A trainable copy of `block` with each Linear (relative name -> spec) an LKDLinear."""
    student = copy.deepcopy(block)
    for rel, spec in linears.items():
        module = student.get_submodule(rel)
        parent, _, child = rel.rpartition(".")
        owner = student.get_submodule(parent) if parent else student
        setattr(owner, child, LKDLinear(_linear_weight(module), module.bias, spec, learn_clip))
    student.requires_grad_(True)
    return student


@torch.no_grad()
def _write_back(block: nn.Module, student: nn.Module, linears) -> None:
    """Copy the trained parameters into the model's block, in its own layouts (GPT-2 Conv1D: [in, out])."""
    for rel in linears:
        lkd, orig = student.get_submodule(rel), block.get_submodule(rel)
        w = lkd.baked_weight()
        orig.weight.copy_(w.t() if type(orig).__name__ == "Conv1D" else w)
        if orig.bias is not None:
            orig.bias.copy_(lkd.bias)
    trained = dict(student.named_parameters())
    for name, p in block.named_parameters():
        if name.rpartition(".")[0] not in linears:
            p.copy_(trained[name])


def relative_token_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||out - target||^2 / ||target||^2 (last dimension: the hidden size)."""
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-30)).mean()


class _Loss:
    """Each token's squared error relative to its squared norm in the teacher's block output, averaged over
    tokens ("token_mse"), or (a decoder's last block) KL of the final logits. A decoder's first token
    carries activations ~100x the others' (SmolLM2-135M block 20: norm ~24,000 against ~220), so a plain MSE
    is almost all that one token's, while every consumer of a block's output normalizes each token; the
    relative error closed 39% / 47% of SmolLM2's w4/8a8 / w4a8 PTQ gap against 37% / 43% (DESIGN.md 6)."""

    def __init__(self, model: nn.Module, family: str, kl: bool):
        self.head = None
        self.kind = "kl" if kl else "token_mse"
        if kl:
            self.norm = model.get_submodule(_find_module(model, FINAL_NORM[family])[0])
            self.head = model.get_output_embeddings()

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return relative_token_mse(out, target)
        v = self.head.weight.shape[0]
        s = self.head(self.norm(out)).reshape(-1, v)
        with torch.no_grad():
            t = self.head(self.norm(target)).reshape(-1, v)
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")


@torch.no_grad()
def _evaluate(student, x, y, rest, kwargs, batch, loss_fn):
    """(MSE, loss) of the student over all samples."""
    mse = loss = 0.0
    for i in range(0, len(x), batch):
        out = _call(student, x[i:i + batch], rest, kwargs)
        mse += F.mse_loss(out, y[i:i + batch]).item()
        loss += loss_fn(out, y[i:i + batch]).item()
    n = -(-len(x) // batch)
    return mse / n, loss / n


def block_lr(linears: List[LKDLinear], options: LKDOptions) -> float:
    """The learning rate of a block's student: options.lr, else by its narrowest quantized weights."""
    bits = [m.spec.weight_bits for m in linears if m.spec.weight_bits]
    return options.lr or LR_BY_BITS[min(bits, default=8)]


def _train_block(student, x, y, rest, kwargs, loss_fn, options: LKDOptions, k: int, desc: str) -> float:
    o = options
    linears = [m for m in student.modules() if isinstance(m, LKDLinear)]
    clips = [m.clip for m in linears if m.clip is not None]
    lr = block_lr(linears, o)
    clip_ids = {id(c) for c in clips}
    params = [p for p in student.parameters() if id(p) not in clip_ids]
    groups = [{"params": params, "lr": lr}] + ([{"params": clips, "lr": lr * CLIP_LR_SCALE}] if clips else [])
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / o.steps)
    gen = torch.Generator().manual_seed(o.seed * 1_000_003 + k)  # per block: resuming does not shift it
    order = torch.empty(0, dtype=torch.long)
    from tqdm import tqdm

    bar = tqdm(range(o.steps), desc=desc, unit="step", leave=False, disable=not o.progress)
    loss = float("nan")
    for _ in bar:
        if len(order) < o.batch:  # a fresh shuffle of the samples each epoch
            order = torch.randperm(len(x), generator=gen)
        idx, order = order[:o.batch], order[o.batch:]
        out = _call(student, x[idx], rest, kwargs)
        l = loss_fn(out, y[idx])
        opt.zero_grad(set_to_none=True)
        l.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for c in clips:
                c.clamp_(CLIP_MIN, 1.0)
        loss = l.item()
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
    return loss


# ---- checkpoints ------------------------------------------------------------------------------------

def _fingerprint(model: nn.Module, family: str, config: dict, scheme: QuantScheme, options: LKDOptions) -> dict:
    """What a checkpoint's blocks depend on: resuming with anything else would mix two runs."""
    o = asdict(options)
    for key in ("checkpoint", "progress", "checkpoint_every"):
        o.pop(key, None)
    if o["data"] not in ("auto", "random", "generate"):  # a text file: the same file from any directory
        o["data"] = os.path.abspath(o["data"])
    with torch.no_grad():  # cheap stand-in for a hash of the weights
        weights = repr(float(sum(p.double().abs().sum() for p in model.parameters())))
    return {"family": family, "config": config, "weights": weights, "scheme": repr(scheme), "options": o,
            "loss": relative_token_mse.__name__}  # checkpoints of the earlier plain MSE are not resumed


def _open_checkpoint(directory: str, fingerprint: dict, name: str = "lkd.json") -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != json.loads(json.dumps(fingerprint)):
            raise ValueError(f"checkpoint {directory} was made for another model, scheme or options; "
                             "use a new directory (or delete it) to start over")
    else:  # written whole or not at all: a run killed here must not leave a fingerprint that fails to parse
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(fingerprint, f, indent=1)
        os.replace(path + ".tmp", path)


def _save_atomic(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # an interrupted save leaves no half checkpoint


# ---- driver -------------------------------------------------------------------------------------------

def _block_linears(model, family, full, k, parts, scheme) -> Dict[str, LinearQuant]:
    """Name relative to block k (at module path `full`) -> LinearQuant, for each Linear of the block."""
    prefix = BLOCKS[family].format(k) + "."
    block = model.get_submodule(full)
    linears = {}
    for name, part in parts.items():
        if name.startswith(prefix):
            rel = _find_module(model, name)[0][len(full) + 1:]
            linears[rel] = scheme.for_linear(part, *_linear_weight(block.get_submodule(rel)).shape)
    return linears


def _distill_block(block, linears, x, y, rest, kwargs, loss_fn, o: LKDOptions, k: int, desc: str) -> dict:
    """Train a student of `block` on (x -> y) and write its weights into `block`; returns the stats."""
    t0 = time.time()
    student = _student(block, linears, o.learn_clip).eval()  # eval: no dropout
    mse0, loss0 = _evaluate(student, x, y, rest, kwargs, o.batch, loss_fn)
    if o.gptq:
        _gptq_student(student, x, y, rest, kwargs, o.batch)
    last = _train_block(student, x, y, rest, kwargs, loss_fn, o, k, desc) if o.steps else float("nan")
    _write_back(block, student, linears)
    # Measured on what the file will hold: PTQ of the written-back weights.
    mse1, loss1 = _evaluate(_student(block, linears, False).eval(), x, y, rest, kwargs, o.batch, loss_fn)
    return {"block": k, "loss": loss_fn.kind, "mse_ptq": mse0, "mse_lkd": mse1, "loss_ptq": loss0,
            "loss_lkd": loss1, "last_step_loss": last, "seconds": time.time() - t0}


def distill(model: nn.Module, family: str, config: dict, scheme: QuantScheme, options: LKDOptions,
            folder: str = "") -> List[dict]:
    """Run LKD (or GPTQ alone: options.steps 0) on the transformers `model` in place: afterwards its block
    weights are the trained (or GPTQ-rounded) fp32 weights (clamped to learned clips). Returns per-block stats: MSE to the teacher's block output with
    plain PTQ ("mse_ptq") and after LKD ("mse_lkd"), the training loss ("loss": "kl" for a decoder's
    last block, else "token_mse") before and after ("loss_ptq", "loss_lkd"), and the seconds taken ("resumed": True
    for blocks loaded from the checkpoint). A block that training made worse than PTQ keeps its original
    weights ("kept_ptq": True; "loss_trained", "mse_trained" say what training reached)."""
    if not scheme.is_quantized:
        raise ValueError(f"LKD needs a quantized scheme, not {scheme.name}")
    o = options.check(_max_positions(config))
    n_layers = hf.num_layers(config)
    vocab = int(config.get("vocab_size") or model.get_input_embeddings().weight.shape[0])
    parts = hf.linear_parts(family, n_layers, config)
    blocks = [_find_module(model, BLOCKS[family].format(i)) for i in range(n_layers)]
    if o.checkpoint:
        _open_checkpoint(o.checkpoint, _fingerprint(model, family, config, scheme, o))

    ids = make_data(o, model, folder, family, vocab)
    x, _, _ = _block_inputs(model, blocks[0][1], ids, o.batch, family != "bert")
    arguments = _per_block_arguments(model, [b for _, b in blocks], ids[:o.batch], family != "bert")
    stats = []
    method = "LKD" if o.steps else "GPTQ"
    for k, (full, block) in enumerate(blocks):
        rest, kwargs = arguments[k]
        with torch.no_grad():  # the original block's output: the target, and the next block's input
            y = torch.cat([_call(block, x[i:i + o.batch], rest, kwargs) for i in range(0, len(x), o.batch)])
        ckpt = os.path.join(o.checkpoint, f"block_{k:03d}.pt") if o.checkpoint else None
        original = {n: t.clone() for n, t in block.state_dict().items()}
        resumed = bool(ckpt) and os.path.isfile(ckpt)
        if resumed:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            block.load_state_dict(saved["state"])
            s = {**saved["stats"], "resumed": True}
        else:
            loss_fn = _Loss(model, family, kl=family != "bert" and k == n_layers - 1)
            s = _distill_block(block, _block_linears(model, family, full, k, parts, scheme), x, y, rest, kwargs,
                               loss_fn, o, k, f"{method} block {k + 1}/{n_layers}")
        if s["loss_lkd"] > s["loss_ptq"]:
            # Training made the block worse than plain PTQ of its original weights (a learning rate too high
            # for the scheme's step: INT8 weights move by many quantization steps): keep the original.
            block.load_state_dict(original)
            s = {**s, "kept_ptq": True, "loss_trained": s["loss_lkd"], "mse_trained": s["mse_lkd"],
                 "loss_lkd": s["loss_ptq"], "mse_lkd": s["mse_ptq"]}
        if ckpt and not resumed:
            _save_atomic({"state": block.state_dict(), "stats": s}, ckpt)
        stats.append(s)
        if o.progress:
            from tqdm import tqdm

            kl = f", kl {s['loss_ptq']:.4g} -> {s['loss_lkd']:.4g}" if s["loss"] == "kl" else ""
            kept = (f"; {'training' if o.steps else 'GPTQ'} reached {s['loss']} {s['loss_trained']:.4g}, kept the "
                    "PTQ weights" if s.get("kept_ptq") else "")
            tqdm.write(f"{method} block {k + 1}/{n_layers}: mse {s['mse_ptq']:.4g} -> {s['mse_lkd']:.4g}{kl}{kept} "
                       f"({s['seconds']:.1f} s)")
        x = y
    return stats


def apply(model: hf.HFModel, scheme: QuantScheme, options: LKDOptions, torch_model: Optional[nn.Module] = None):
    """LKD on a loaded HFModel: replaces its block tensors by the trained fp32 weights, ready for
    modelfile.quantize_model. `torch_model`: the transformers model holding model.tensors (e.g. after
    smoothing); loaded from model.folder when not given. Returns (the trained transformers model,
    per-block stats)."""
    if not model.folder:
        raise ValueError("LKD needs the model's Hugging Face folder")
    if not scheme.is_quantized:
        raise ValueError(f"LKD needs a quantized scheme, not {scheme.name}")
    options.check(_max_positions(model.config))  # before the slow part
    if torch_model is None:
        torch_model = load_torch_model(model.folder, model.family)
    stats = distill(torch_model, model.family, model.config, scheme, options, folder=model.folder)
    for name, t in hf.canonicalize(model.family, model.config, torch_model.state_dict()).items():
        if name in model.tensors:
            model.tensors[name] = t
    return torch_model, stats
