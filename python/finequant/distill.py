"""Quantization-aware distillation of a whole encoder (`finequant quantize --distill`).

LKD (lkd.py) trains one block at a time against the original block's output; at W4A4 that leaves
all-MiniLM-L6-v2's sentence embeddings far from fp32, because every block's error compounds with the
next. Here the student is the WHOLE encoder, every block Linear an `lkd.LKDLinear` (weights
fake-quantized with straight-through rounding, optional learned clips, token-wise fake-quantized inputs,
optional block-Hadamard input rotation: exactly what the engine's integer path computes), trained end to
end against the fp32 teacher on the same inputs:

    loss = sum over layers of MSE(student hidden, teacher hidden) / mean(teacher hidden^2)
           + COSINE_WEIGHT * (1 - cosine of the mean-pooled sentence embeddings)

(intermediate-layer distillation as in TinyBERT, the pooled term for what users embed with). The data
is unlabelled: windows of a text file, or random token ids, drawn fresh each step (nothing is held in
memory), wrapped in the tokenizer's [CLS] ... [SEP] when the folder has a tokenizer. Adam, learning
rate decayed linearly to 0; the embeddings stay frozen (the engine keeps them fp32). Checkpoints every
`checkpoint_every` steps hold the student, the optimizer, the schedule and the data generator, so a run
killed at any point resumes to the same result as an uninterrupted one.

At the end the trained weights (clamped to learned clips) replace the model's and are quantized by the
normal PTQ path, so the file format does not change. If the trained student scores worse than plain
PTQ on held-out batches, the original weights are kept (as LKD does per block).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from . import hf
from .lkd import (CLIP_MIN, CLIP_LR_SCALE, LKDLinear, _fingerprint, _max_positions, _open_checkpoint,
                  _save_atomic, _student, _write_back, load_torch_model)
from .schemes import QuantScheme
from .simulate import _find_module, _linear_weight

FAMILIES = ("bert",)  # encoders: the loss is on hidden states and pooled embeddings
COSINE_WEIGHT = 10.0  # the pooled-embedding term against the per-layer hidden-state terms (each ~0.1-1)
EVAL_BATCHES = 4  # held-out batches (their own seed) scoring PTQ against the trained student


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"--distill trains encoders ({', '.join(FAMILIES)}), not {family}; use --lkd for decoders")


@dataclass
class DistillOptions:
    data: str = "random"   # "random" token ids or a text file path
    steps: int = 400       # optimizer steps
    # 32 x 32 tokens and learned clips: MiniLM W4A4 embedding cosine 0.9614 (16 x 64, no clips) -> 0.9664 on
    # Rotten Tomatoes snippets (median 26 tokens); docs/DESIGN.md section 8
    batch: int = 32        # sequences per step
    seq: int = 32          # tokens per sequence, [CLS] and [SEP] included
    lr: float = 2e-4       # Adam learning rate, decayed linearly to 0
    seed: int = 0
    learn_clip: bool = True
    checkpoint: Optional[str] = None  # directory: resume from it if it holds a checkpoint of this run
    checkpoint_every: int = 50        # steps between checkpoints
    progress: bool = True

    def check(self, max_positions: Optional[int] = None) -> "DistillOptions":
        for name in ("steps", "batch", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"distillation {name} must be a positive integer, got {v!r}")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 3:
            raise ValueError(f"distillation sequence length must be an integer >= 3, got {self.seq!r}")
        if max_positions is not None and self.seq > max_positions:
            raise ValueError(f"distillation sequence length {self.seq} exceeds the model's {max_positions} positions")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"distillation learning rate must be a positive number, got {self.lr!r}")
        if self.data != "random" and not os.path.isfile(self.data):
            raise ValueError(f"distillation data must be 'random' or a text file; {self.data!r} is neither")
        return self


class _Batches:
    """Token id batches [batch, seq] drawn from a seeded generator (its state is checkpointed)."""

    def __init__(self, options: DistillOptions, folder: str, vocab: int, seed: int):
        o = options
        self.batch, self.seq, self.vocab = o.batch, o.seq, vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.cls = self.sep = None
        tok = None
        if set(hf.tokenizer_files(folder)) & {"tokenizer.json", "vocab.txt", "vocab.json"}:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(folder)
            self.cls, self.sep = tok.cls_token_id, tok.sep_token_id
        self.text = None
        if o.data != "random":
            if tok is None:
                raise ValueError(f"distillation text data needs the model's tokenizer, and {folder} has none")
            with open(o.data, encoding="utf-8") as f:
                ids = tok(f.read(), add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) < o.seq * o.batch:
                raise ValueError(f"{o.data} has {len(ids)} tokens: distillation needs at least batch x seq = "
                                 f"{o.batch * o.seq}")
            self.text = torch.tensor(ids, dtype=torch.long)

    def __call__(self) -> torch.Tensor:
        wrap = self.cls is not None and self.sep is not None
        n = self.seq - 2 if wrap else self.seq
        if self.text is None:
            x = torch.randint(0, self.vocab, (self.batch, n), generator=self.gen)
        else:
            starts = torch.randint(0, len(self.text) - n + 1, (self.batch,), generator=self.gen)
            x = torch.stack([self.text[s:s + n] for s in starts.tolist()])
        if wrap:
            x = torch.cat([torch.full((self.batch, 1), self.cls), x, torch.full((self.batch, 1), self.sep)], 1)
        return x


def _pooled(h: torch.Tensor) -> torch.Tensor:
    return h.mean(1)  # no padding in the training batches


def _loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean pooled cosine) of the student on ids x."""
    mask = torch.ones_like(x)
    with torch.no_grad():
        t = teacher(input_ids=x, attention_mask=mask, output_hidden_states=True)
    s = student(input_ids=x, attention_mask=mask, output_hidden_states=True)
    loss = sum(F.mse_loss(hs, ht) / ht.pow(2).mean().clamp_min(1e-12)
               for hs, ht in zip(s.hidden_states[1:], t.hidden_states[1:]))
    cos = F.cosine_similarity(_pooled(s.last_hidden_state), _pooled(t.last_hidden_state), dim=-1).mean()
    return loss + COSINE_WEIGHT * (1 - cos), cos.detach()


def _train_step(student, teacher, x, opt, sched, clips) -> Tuple[float, float]:
    loss, cos = _loss(student, teacher, x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        for c in clips:
            c.clamp_(CLIP_MIN, 1.0)
    return loss.item(), cos.item()


@torch.no_grad()
def _evaluate(student, teacher, batches) -> Tuple[float, float]:
    scores = [_loss(student, teacher, x) for x in batches]
    return (sum(float(l) for l, _ in scores) / len(scores), sum(float(c) for _, c in scores) / len(scores))


def _linears(model: nn.Module, family: str, config: dict, scheme: QuantScheme) -> dict:
    """Module path in `model` -> LinearQuant, for every block Linear of the file."""
    out = {}
    for name, part in hf.linear_parts(family, hf.num_layers(config)).items():
        full, module = _find_module(model, name)
        out[full] = scheme.for_linear(part, *_linear_weight(module).shape)
    return out


def distill(torch_model: nn.Module, family: str, config: dict, scheme: QuantScheme, options: DistillOptions,
            folder: str) -> dict:
    """Train `torch_model` (a transformers encoder, fp32) in place as described in the module docstring;
    its weights afterwards are the trained fp32 weights (clamped to learned clips), or unchanged if training
    did not beat PTQ. Returns stats: held-out loss and pooled cosine with PTQ and after training, steps,
    seconds, whether the PTQ weights were kept and from which step a checkpoint resumed."""
    check_family(family)
    if not scheme.is_quantized:
        raise ValueError(f"distillation needs a quantized scheme, not {scheme.name}")
    o = options.check(_max_positions(config))
    t0 = time.time()
    vocab = int(config.get("vocab_size") or torch_model.get_input_embeddings().weight.shape[0])
    teacher = load_torch_model(folder, family)  # the original fp32 model (torch_model may be smoothed)
    linears = _linears(torch_model, family, config, scheme)
    student = _student(torch_model, linears, o.learn_clip).eval()  # eval: no dropout
    student.get_input_embeddings().requires_grad_(False)
    for name, module in student.named_modules():  # the embeddings stay fp32 and frozen in the engine
        if name.endswith("embeddings"):
            module.requires_grad_(False)
    held_out = _Batches(o, folder, vocab, seed=o.seed * 1_000_003 + 1)
    eval_batches = [held_out() for _ in range(EVAL_BATCHES)]
    loss_ptq, cos_ptq = _evaluate(student, teacher, eval_batches)

    clips = [m.clip for m in student.modules() if isinstance(m, LKDLinear) and m.clip is not None]
    clip_ids = {id(c) for c in clips}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in clip_ids]
    groups = [{"params": params, "lr": o.lr}] + ([{"params": clips, "lr": o.lr * CLIP_LR_SCALE}] if clips else [])
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / o.steps)
    batches = _Batches(o, folder, vocab, seed=o.seed)

    start, path = 0, None
    if o.checkpoint:
        _open_checkpoint(o.checkpoint, _fingerprint(torch_model, family, config, scheme, o), "distill.json")
        path = os.path.join(o.checkpoint, "distill.pt")
        if os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            student.load_state_dict(saved["student"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["schedule"])
            batches.gen.set_state(saved["generator"])
            start = int(saved["step"])

    def save(step: int) -> None:
        _save_atomic({"student": student.state_dict(), "optimizer": opt.state_dict(),
                      "schedule": sched.state_dict(), "generator": batches.gen.get_state(), "step": step}, path)

    from tqdm import tqdm

    bar = tqdm(range(start, o.steps), desc="distill", unit="step", leave=False, disable=not o.progress,
               initial=start, total=o.steps)
    for step in bar:
        loss, cos = _train_step(student, teacher, batches(), opt, sched, clips)
        bar.set_postfix(loss=f"{loss:.4g}", cos=f"{cos:.4f}", refresh=False)
        if path and ((step + 1) % o.checkpoint_every == 0 or step + 1 == o.steps):
            save(step + 1)

    # Scored on what the file will hold: PTQ of the written-back weights.
    trained = _student(torch_model, linears, False)
    _write_back(trained, student, linears)
    loss_lkd, cos_lkd = _evaluate(trained.eval(), teacher, eval_batches)
    stats = {"loss_ptq": loss_ptq, "cosine_ptq": cos_ptq, "loss_trained": loss_lkd, "cosine_trained": cos_lkd,
             "steps": o.steps, "resumed_at": start, "seconds": time.time() - t0,
             "kept_ptq": loss_lkd > loss_ptq}
    if not stats["kept_ptq"]:
        _write_back(torch_model, student, linears)
    if o.progress:
        kept = "; kept the PTQ weights (training did not beat them)" if stats["kept_ptq"] else ""
        tqdm.write(f"distilled {o.steps} steps: held-out loss {loss_ptq:.4g} -> {loss_lkd:.4g}, pooled cosine "
                   f"{cos_ptq:.4f} -> {cos_lkd:.4f}{kept} ({stats['seconds']:.0f} s)")
    return stats


def apply(model: hf.HFModel, scheme: QuantScheme, options: DistillOptions,
          torch_model: Optional[nn.Module] = None):
    """Distill a loaded HFModel: replaces its block tensors by the trained fp32 weights, ready for
    modelfile.quantize_model. `torch_model`: the transformers model holding model.tensors (e.g. after
    smoothing); loaded from model.folder when not given. Returns (the transformers model, stats)."""
    check_family(model.family)
    if not model.folder:
        raise ValueError("distillation needs the model's Hugging Face folder")
    options.check(_max_positions(model.config))  # before the slow part
    if torch_model is None:
        torch_model = load_torch_model(model.folder, model.family)
    stats = distill(torch_model, model.family, model.config, scheme, options, model.folder)
    for name, t in hf.canonicalize(model.family, model.config, torch_model.state_dict()).items():
        if name in model.tensors:
            model.tensors[name] = t
    return torch_model, stats
