"""Accuracy study: the ZeroQuant / INT4-paper schemes on real models, as plain PTQ and with LKD, measured
through the C++ engine. Writes bench/results/ACCURACY.md and bench/results/accuracy.png.

- SmolLM2-135M: perplexity on Austen's Emma (LKD text: Pride and Prejudice, never the evaluated text).
- all-MiniLM-L6-v2: Rotten Tomatoes fresh/rotten probe accuracy (probe trained once on the fp32
  model's embeddings, applied to each model's) and embedding cosine to fp32; W4A4 variants (asymmetric,
  block-Hadamard rotation) as PTQ and with whole-encoder distillation (`quantize --distill`).
- ZeroQuant table 9 style ablation on SmolLM2 (w4/8a8): per-tensor vs group-wise weights, per-tensor vs
  token-wise activations, with and without LKD. The engine only does token-wise activations, so the
  per-tensor-activation cells run in the torch simulation (finequant.simulate) and are labelled so.

Every measured configuration is appended to bench/results/accuracy.jsonl under a key holding everything
the number depends on (model, scheme, LKD budget, evaluation budget), so an interrupted or repeated run
resumes where it stopped, and the report shows the runs of the budget asked for.

    python bench/accuracy_study.py --reduced      # ~1 h on 2 cores: 4096 tokens, LKD 50 steps on w4/8a8, w4a8
    python bench/accuracy_study.py --ppl-tokens 16384 --lkd-steps 50 --lkd-samples 32
                                                  # the committed ACCURACY.md (`make study`): ~2 h on 2 cores
    python bench/accuracy_study.py                # the full default budget: many hours of CPU
    python bench/accuracy_study.py --report-only  # rewrite ACCURACY.md / accuracy.png from the cache
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from finequant.quantize import QuantLinear, fake_quant_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = os.path.join(ROOT, "bench", "results")
# Per-block LKD checkpoints, one folder per LKD configuration: a changed evaluation budget re-evaluates
# the trained blocks instead of training them again (SmolLM2: ~0.4 GB per folder).
LKD_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "finequant", "study", "lkd")
# Version of LKD's behaviour in the result keys: 2 = blocks that training made worse keep their PTQ weights.
# Not part of the checkpoint folder's key: a checkpoint holds trained blocks, and lkd.distill applies the rule
# when it loads them.
LKD_VERSION = 2

# label -> (scheme name, parse_scheme options). Defaults: INT8 weights per channel, INT4 K-blocks of 32.
SCHEMES = {
    "fp32": ("fp32", {}),
    "w8a16": ("w8a16", {}),
    "w8a8": ("w8a8", {}),
    "w8a8 a-asym": ("w8a8", {"act_symmetric": False}),
    "w8a8 smooth": ("w8a8", {}),
    "w8a8 a-asym smooth": ("w8a8", {"act_symmetric": False}),
    # what `finequant quantize` makes: also the INT8 LM head, its input rotated (an encoder has no head)
    "w8a8 a-asym smooth + head (default)": ("w8a8", {"act_symmetric": False, "parts": "qkv,attn_out,fc1,fc2,head",
                                                     "head_rotation": 64}),
    "w4/8a16": ("w4/8a16", {}),
    "w4/8a8": ("w4/8a8", {}),
    "w4a8 kblock=32": ("w4a8", {"grouping": ("kblock", 32)}),
    "w4a4": ("w4a4", {}),
    # block-Hadamard input rotation, which `finequant quantize` applies to smoothed INT4 schemes (these rows: unsmoothed)
    "w4/8a8 rotate=64": ("w4/8a8", {"rotation": 64}),
    "w4a8 kblock=32 rotate=64": ("w4a8", {"grouping": ("kblock", 32), "rotation": 64}),
}
# Labels quantized after outlier smoothing (finequant.smooth, its defaults: alpha 0.7, random ids): what
# `finequant quantize` does unless --no-smooth.
SMOOTHED = ("w8a8 smooth", "w8a8 a-asym smooth", "w8a8 a-asym smooth + head (default)")
# LKD from random token ids, from the model's own samples (decoders), and from another Austen novel
LKD_DATA = ("random", "generate", "text")
ENCODER_LKD_DATA = ("random", "text")
# MiniLM W4A4 with whole-encoder distillation (`quantize --distill`, finequant.distill): label -> scheme
DISTILL_SCHEMES = {
    "w4a4": ("w4a4", {}),
    "w4a4 asym": ("w4a4", {"weight_symmetric": False, "act_symmetric": False}),
    "w4a4 asym rotate=64": ("w4a4", {"weight_symmetric": False, "act_symmetric": False, "rotation": 64}),
}
# ... and from the Rotten Tomatoes snippets of the probe's train split, without their labels (in-domain
# unlabelled text; the cosine and the probe are measured on the test split, which distillation never sees)
DISTILL_DATA = ("random", "text", "reviews")
ABLATION_SCHEME = "w4/8a8"
ABLATION_GROUPS = 64  # ZeroQuant row groups: divides every output dimension of both models
ABLATION_WEIGHTS = {"per-tensor": "tensor", f"group-wise (G={ABLATION_GROUPS})": ("rows", ABLATION_GROUPS)}
ABLATION_ACTS = ("per-tensor", "token-wise")
NOTES_MARKER = "## Notes"  # a hand-written section of ACCURACY.md from here on is kept on rewrite


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,minilm")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="labels of SCHEMES, comma-separated")
    p.add_argument("--lkd", default="random,generate,text",
                   help="LKD data variants to run: random,generate,text (or none; generate: decoders only)")
    p.add_argument("--lkd-schemes", help="schemes that get LKD (default: all quantized ones)")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--ablation-lkd", default="text", help="LKD data for the ablation's LKD cells (none: no LKD cells)")
    p.add_argument("--ppl-tokens", type=int, default=32768, help="Emma tokens scored (windows of --ctx)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--probe-texts", type=int, default=0, help="Rotten Tomatoes snippets used (0: all 12,808)")
    p.add_argument("--lkd-steps", type=int, default=100)
    p.add_argument("--lkd-samples", type=int, default=64)
    p.add_argument("--lkd-batch", type=int, default=4)
    p.add_argument("--lkd-seq", type=int, default=128)
    p.add_argument("--lkd-lr", type=float, default=3e-4)
    p.add_argument("--distill", default="random,text,reviews",
                   help="MiniLM W4A4 distillation data variants to run: random,text,reviews (or none)")
    p.add_argument("--distill-schemes", default="w4a4 asym rotate=64",
                   help="labels of DISTILL_SCHEMES that get distilled, comma-separated (PTQ rows: all of them; "
                        "default: the best PTQ one, ~8 min per data variant)")
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--distill-batch", type=int, default=32)
    p.add_argument("--distill-seq", type=int, default=32)
    p.add_argument("--distill-lr", type=float, default=2e-4)
    p.add_argument("--distill-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="distillation also learns the weight clip ranges (finequant.distill's default)")
    p.add_argument("--eval-text", default="emma")
    p.add_argument("--lkd-text", default="prideprejudice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reduced", action="store_true",
                   help="--ppl-tokens 4096 --lkd-steps 50 --lkd-schemes 'w4/8a8,w4a8 kblock=32'")
    p.add_argument("--out", default=RESULTS, help="results directory")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.reduced:
        args.ppl_tokens, args.lkd_steps = 4096, 50
        args.lkd_schemes = args.lkd_schemes or "w4/8a8,w4a8 kblock=32"
    args.models = [m for m in args.models.split(",") if m]
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.lkd = [d for d in args.lkd.split(",") if d in LKD_DATA]
    args.distill = [d for d in args.distill.split(",") if d in DISTILL_DATA]
    args.distill_schemes = [s for s in args.distill_schemes.split(",") if s]
    if any(s not in DISTILL_SCHEMES for s in args.distill_schemes):
        p.error(f"unknown distillation scheme label(s); known: {list(DISTILL_SCHEMES)}")
    quantized = [s for s in args.schemes if s != "fp32" and s not in SMOOTHED]  # LKD: the unsmoothed schemes
    args.lkd_schemes = [s for s in args.lkd_schemes.split(",") if s] if args.lkd_schemes else quantized
    unknown = [s for s in args.schemes + args.lkd_schemes if s not in SCHEMES]
    if unknown:
        p.error(f"unknown scheme label(s) {unknown}; known: {list(SCHEMES)}")
    return args


# ---- one configuration --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    model: str                 # "smollm2" | "minilm"
    scheme: str                # label in SCHEMES, or the ablation's "w4/8a8 <weights>"
    grouping: object = None    # overrides the scheme's grouping (ablation)
    lkd: str = "none"          # "none" | "random" | "generate" | "text"; table "distill": "none" or the distill data
    acts: str = "token-wise"   # "per-tensor" runs in the torch simulation
    table: str = "main"        # "main" | "ablation" | "distill"

    @property
    def backend(self) -> str:
        return "torch simulation" if self.acts == "per-tensor" else "engine"


def budget(cfg: Config, args) -> dict:
    """Everything besides the configuration that a result depends on."""
    b = {"seed": args.seed}
    if cfg.model == "smollm2":
        b.update(ppl_text=args.eval_text, ppl_tokens=args.ppl_tokens, ctx=args.ctx)
    else:
        b.update(probe_texts=args.probe_texts)
    if cfg.table == "distill" and cfg.lkd != "none":
        b.update(distill_steps=args.distill_steps, distill_batch=args.distill_batch, distill_seq=args.distill_seq,
                 distill_lr=args.distill_lr)
        if args.distill_clip:  # keyed only when on: the cells measured without clips keep their keys
            b["distill_clip"] = True
        if cfg.lkd == "text":
            b["distill_text"] = args.lkd_text
        elif cfg.lkd == "reviews":
            b["distill_text"] = "rotten tomatoes train split"
    elif cfg.lkd != "none":
        b.update(lkd_steps=args.lkd_steps, lkd_samples=args.lkd_samples, lkd_batch=args.lkd_batch,
                 lkd_seq=args.lkd_seq, lkd_lr=args.lkd_lr, lkd_version=LKD_VERSION)
        if cfg.lkd == "text":
            b["lkd_text"] = args.lkd_text
    return b


def key_of(cfg: Config, args) -> str:
    return json.dumps({**dataclasses.asdict(cfg), "grouping": repr(cfg.grouping), **budget(cfg, args)},
                      sort_keys=True)


def lkd_folder(cfg: Config, args) -> str:
    """The checkpoint folder of cfg's LKD run: keyed by everything the training depends on, not the evaluation."""
    train = {k: v for k, v in budget(cfg, args).items()
             if k in ("seed", "lkd_text") or k.startswith("lkd_") and k != "lkd_version"}
    key = json.dumps({**dataclasses.asdict(cfg), "grouping": repr(cfg.grouping), "table": None, **train},
                     sort_keys=True)
    return os.path.join(LKD_CACHE, hashlib.sha1(key.encode()).hexdigest()[:16])


def scheme_of(cfg: Config):
    from finequant.schemes import parse_scheme

    name, opts = (DISTILL_SCHEMES if cfg.table == "distill" else SCHEMES).get(cfg.scheme, (ABLATION_SCHEME, {}))
    if cfg.grouping is not None:
        opts = {**opts, "grouping": cfg.grouping}
    return parse_scheme(name, **opts)


def _per_tensor_fake_quant(x, bits, symmetric):
    """ONE dynamic scale for the whole activation tensor (all tokens of the call), instead of one per token."""
    flat = x.reshape(-1, x.shape[-1])
    return fake_quant_weight(flat, bits, symmetric, tuple(flat.shape)).reshape(x.shape)


class _PerTensorActLinear(QuantLinear):
    """Simulation only: the input quantized with one dynamic scale for the whole tensor."""

    def forward(self, x):
        x = _per_tensor_fake_quant(x.float(), self.spec.act_bits, self.spec.act_symmetric)
        return F.linear(x, self.weight, self.bias)


class _TorchDecoder:
    """What evaluate.perplexity needs of an engine, from a (simulated) transformers model."""

    is_decoder = True

    def __init__(self, model, folder: str):
        from tokenizers import Tokenizer

        self.model, self.max_positions = model, model.config.max_position_embeddings
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tokenizer.no_padding()  # as finequant.Engine does
        self.tokenizer.no_truncation()

    def _need_tokenizer(self):
        return self.tokenizer

    def forward(self, ids):
        with torch.no_grad():
            return self.model(torch.from_numpy(ids), use_cache=False).logits.numpy()


class Study:
    def __init__(self, args):
        self.args = args
        self.models = {}     # key -> HFModel (fp32, never modified)
        self.encoder_eval = None
        self.texts = {}

    def model(self, key: str):
        from prepare_models import prepare

        from finequant import hf

        if key not in self.models:
            self.models[key] = hf.load(prepare(key))
        return self.models[key]

    def text(self, name: str) -> str:
        from prepare_text import prepare

        if name not in self.texts:
            self.texts[name] = (prepare() / f"{name}.txt").read_text()
        return self.texts[name]

    def lkd(self, model, scheme, cfg: Config, per_tensor_acts: bool):
        """LKD on a copy of `model`: returns (the HFModel with trained tensors, the trained torch model, seconds)."""
        from prepare_text import prepare

        from finequant import lkd

        a = self.args
        data = cfg.lkd if cfg.lkd in ("random", "generate") else str(prepare() / f"{a.lkd_text}.txt")
        folder = lkd_folder(cfg, a)
        options = lkd.LKDOptions(data=data, steps=a.lkd_steps, batch=a.lkd_batch, seq=a.lkd_seq,
                                 samples=a.lkd_samples, lr=a.lkd_lr, seed=a.seed, progress=not a.quiet,
                                 checkpoint=folder)
        trained = model.copy()  # apply() replaces entries, not tensors
        # The student must see the activation quantization it will be evaluated with.
        patch = (contextlib.nullcontext() if not per_tensor_acts else
                 _patched(lkd, "fake_quant_activation", _per_tensor_fake_quant))
        timing = os.path.join(folder, "wall_seconds.json")  # the first, uninterrupted run's wall time
        t0 = time.time()
        with patch:
            torch_model, stats = lkd.apply(trained, scheme, options)
        seconds = time.time() - t0
        if os.path.isfile(timing):
            with open(timing, encoding="utf-8") as f:
                seconds = json.load(f)["seconds"]
        elif not any(s.get("resumed") for s in stats):
            with open(timing, "w", encoding="utf-8") as f:
                json.dump({"seconds": seconds}, f)
        else:  # resumed from an interrupted run: the blocks' own training times
            seconds = sum(s["seconds"] for s in stats)
        ratio = sum(s["loss_lkd"] / s["loss_ptq"] for s in stats if s["loss_ptq"] > 0) / len(stats)
        kept = sum(bool(s.get("kept_ptq")) for s in stats)
        return trained, torch_model, seconds, ratio, kept

    def distill(self, model, scheme, cfg: Config):
        """Whole-encoder distillation of a copy of `model`: (the HFModel with trained tensors, seconds, stats)."""
        from prepare_text import prepare

        from finequant import distill

        a = self.args
        data = ("random" if cfg.lkd == "random" else self.review_text() if cfg.lkd == "reviews"
                else str(prepare() / f"{a.lkd_text}.txt"))
        options = distill.DistillOptions(data=data, steps=a.distill_steps, batch=a.distill_batch, seq=a.distill_seq,
                                         lr=a.distill_lr, learn_clip=a.distill_clip, seed=a.seed,
                                         progress=not a.quiet)
        trained = model.copy()
        t0 = time.time()
        _, stats = distill.apply(trained, scheme, options)
        return trained, time.time() - t0, stats

    def review_text(self) -> str:
        """A text file of the probe's train-split Rotten Tomatoes snippets (no labels), one per line."""
        from finequant.evaluate import probe_split, rotten_tomatoes

        texts, _ = rotten_tomatoes()
        train, _ = probe_split(len(texts), self.args.probe_texts or None, seed=self.args.seed)
        path = os.path.join(os.path.dirname(LKD_CACHE), f"rotten-tomatoes-train-{self.args.seed}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(texts[i] for i in train))
        return path

    def measure(self, cfg: Config) -> dict:
        from finequant import Engine
        from finequant.evaluate import perplexity
        from finequant.modelfile import quantize_model, save

        a = self.args
        model = self.model(cfg.model)
        scheme = scheme_of(cfg)
        out = {}
        torch_model = None
        if cfg.scheme in SMOOTHED:
            from finequant import smooth
            from finequant.lkd import load_torch_model

            model = model.copy()  # the study's loaded models are shared by the cells
            torch_model = load_torch_model(model.folder, model.family)
            out["smoothing"] = smooth.smooth_model(model, scheme, torch_model)
        if cfg.table == "distill" and cfg.lkd != "none":
            model, seconds, stats = self.distill(model, scheme, cfg)
            out.update(distill_seconds=seconds, distill_kept_ptq=stats["kept_ptq"])
        elif cfg.lkd != "none":
            if cfg.scheme in SMOOTHED:
                raise ValueError("the study runs LKD on unsmoothed models only")
            model, torch_model, seconds, ratio, kept = self.lkd(model, scheme, cfg, cfg.acts == "per-tensor")
            out.update(lkd_seconds=seconds, lkd_loss_ratio=ratio, lkd_blocks_kept_ptq=kept)
        t0 = time.time()
        if cfg.acts == "per-tensor":  # not in the engine: the torch simulation, with one scale per tensor
            out.update(perplexity(self.simulated(model, scheme, torch_model), self.text(a.eval_text), ctx=a.ctx,
                                  max_tokens=a.ppl_tokens))
        else:
            tmp = tempfile.mkdtemp(prefix="finequant-study-")
            try:
                tensors, metadata = quantize_model(model, scheme)
                engine = Engine(save(tmp, tensors, metadata, tokenizer_src=model.folder), threads=a.threads)
                if cfg.model == "smollm2":
                    out.update(perplexity(engine, self.text(a.eval_text), ctx=a.ctx, max_tokens=a.ppl_tokens))
                else:
                    out.update(self.encoder(engine))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        out["eval_seconds"] = time.time() - t0
        return out

    def simulated(self, model, scheme, torch_model=None):
        from finequant import hf
        from finequant.lkd import load_torch_model
        from finequant.simulate import simulate

        if torch_model is None:
            torch_model = load_torch_model(model.folder, model.family)
        records = {name: scheme.for_linear(part, *model.tensors[name + ".weight"].shape)
                   for name, part in model.linear_parts().items()}
        simulate(torch_model, records)
        for m in torch_model.modules():
            if isinstance(m, QuantLinear) and m.spec.act_bits:
                m.__class__ = _PerTensorActLinear
        return _TorchDecoder(torch_model, model.folder)

    def encoder(self, engine) -> dict:
        from finequant import Engine
        from finequant.evaluate import EncoderEval, rotten_tomatoes

        if self.encoder_eval is None:  # the probe is trained once, on the fp32 model's embeddings
            texts, labels = rotten_tomatoes()
            ref = Engine(self.model("minilm").folder, threads=self.args.threads)
            self.encoder_eval = EncoderEval(ref, texts, labels, self.args.probe_texts or None, self.args.seed)
        return self.encoder_eval(engine)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---- the plan, in priority order ----------------------------------------------------------------------

def plan(args):
    main_rows = [Config(m, s) for m in args.models for s in args.schemes]
    lkd_rows = [Config(m, s, lkd=d) for d in ("text", "random", "generate") if d in args.lkd
                for m in ("smollm2", "minilm") if m in args.models and (m == "smollm2" or d in ENCODER_LKD_DATA)
                for s in args.lkd_schemes]
    ablation = []  # in order: the cheap PTQ cells go before the LKD rows, the ablation's LKD cells last
    if "smollm2" in args.models and not args.no_ablation:
        for lkd in ["none"] + [d for d in LKD_DATA if d == args.ablation_lkd]:
            for wlabel, grouping in ABLATION_WEIGHTS.items():
                for acts in ABLATION_ACTS:
                    ablation.append(Config("smollm2", f"{ABLATION_SCHEME} {wlabel}", grouping, lkd, acts, "ablation"))
    distill = ([Config("minilm", s, table="distill") for s in DISTILL_SCHEMES]
               + [Config("minilm", s, lkd=d, table="distill") for d in args.distill for s in args.distill_schemes]
               if "minilm" in args.models and args.distill else [])
    return (main_rows + [c for c in ablation if c.lkd == "none"] + [c for c in distill if c.lkd == "none"]
            + lkd_rows + [c for c in distill if c.lkd != "none"] + [c for c in ablation if c.lkd != "none"])


def load_cache(path: str) -> dict:
    cache = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    cache[r["key"]] = r
    return cache


# ---- the report -----------------------------------------------------------------------------------------

def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def report(args, cache: dict) -> str:
    configs = plan(args)
    res = {c: cache.get(key_of(c, args)) for c in configs}
    get = lambda c, k: (res.get(c) or {}).get(k)  # noqa: E731
    lines = ["# Accuracy study", "",
             "Generated by `bench/accuracy_study.py` ("
             + " ".join([a for a in sys.argv[1:] if a != "--report-only"] or ["defaults"]) + "); numbers "
             "from the C++ engine unless marked *simulated*. Cells `-` were not run (yet) at this budget.", "",
             f"Budget: perplexity on the first {args.ppl_tokens} tokens of `{args.eval_text}` in windows of "
             f"{args.ctx}; probe on {args.probe_texts or 'all'} Rotten Tomatoes snippets (70/30 split, seed "
             f"{args.seed}); LKD {args.lkd_steps} steps x batch {args.lkd_batch} x {args.lkd_seq} tokens per block, "
             f"{args.lkd_samples} samples, lr {args.lkd_lr}; LKD text `{args.lkd_text}`.", ""]
    fp = {m: Config(m, "fp32") for m in args.models}
    gaps = {}
    if "smollm2" in args.models:
        base = get(fp["smollm2"], "perplexity")
        lines += ["## SmolLM2-135M: perplexity", "",
                  "| scheme | PTQ | vs fp32 | LKD random | LKD own samples | LKD Austen | gap closed (random / own "
                  "samples / Austen) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for s in args.schemes:
            ptq = get(Config("smollm2", s), "perplexity")
            lk = {d: get(Config("smollm2", s, lkd=d), "perplexity") for d in LKD_DATA}
            closed = {d: (ptq - lk[d]) / (ptq - base) if None not in (ptq, lk[d], base) and ptq != base else None
                      for d in LKD_DATA}
            gaps[s] = closed
            lines.append(f"| {s} | {_fmt(ptq)} | {_fmt(ptq / base if ptq and base else None, '{:.3f}x')} | "
                         f"{_fmt(lk['random'])} | {_fmt(lk['generate'])} | {_fmt(lk['text'])} | "
                         + " / ".join(_fmt(closed[d], '{:.0%}') for d in LKD_DATA) + " |")
        lines.append("")
    if "minilm" in args.models:
        lines += ["## all-MiniLM-L6-v2: Rotten Tomatoes probe accuracy and cosine to fp32", "",
                  "Probe (logistic regression) trained once on the fp32 embeddings of the train split, applied to each "
                  "model's test embeddings; cosine: mean over the test snippets.", "",
                  "| scheme | probe PTQ | probe LKD random | probe LKD Austen | cosine PTQ | cosine LKD random | "
                  "cosine LKD Austen |", "|---|---:|---:|---:|---:|---:|---:|"]
        for s in args.schemes:
            cs = [Config("minilm", s)] + [Config("minilm", s, lkd=d) for d in ENCODER_LKD_DATA]
            acc = [_fmt(get(c, "probe_accuracy") and 100 * get(c, "probe_accuracy"), "{:.2f}%") for c in cs]
            cos = [_fmt(get(c, "cosine_mean"), "{:.4f}") for c in cs]
            lines.append(f"| {s} | " + " | ".join(acc + cos) + " |")
        test = get(fp["minilm"], "test")
        lines += ["", f"(test split: {test} snippets; one snippet is {100 / test:.3f} points)" if test else "", ""]
    dis = [c for c in configs if c.table == "distill"]
    if dis:
        lines += ["## all-MiniLM-L6-v2 W4A4: whole-encoder distillation (`quantize --distill`)", "",
                  f"finequant.distill: the whole quantized encoder trained against fp32 (per-layer hidden states + pooled "
                  f"cosine), {args.distill_steps} steps x batch {args.distill_batch} x {args.distill_seq} tokens, lr "
                  f"{args.distill_lr}{', learned weight clips' if args.distill_clip else ''}, from random token ids, "
                  f"`{args.lkd_text}`, or the Rotten Tomatoes snippets of the probe's train split without their labels "
                  "(reviews: unlabelled in-domain text; the test split, where probe and cosine are measured, is never "
                  "seen); asym = asymmetric INT4 weights and "
                  "activations, rotate=64 = block-Hadamard input rotation (finequant.rotate). Probe and cosine as above, "
                  "through the engine's W4A4 integer path.", "",
                  "| scheme | probe PTQ | probe distilled random | probe distilled Austen | probe distilled reviews | "
                  "cosine PTQ | cosine distilled random | cosine distilled Austen | cosine distilled reviews | "
                  "seconds (random / Austen / reviews) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in DISTILL_SCHEMES:
            cs = [Config("minilm", s, lkd=d, table="distill") for d in ("none",) + DISTILL_DATA]
            acc = [_fmt(get(c, "probe_accuracy") and 100 * get(c, "probe_accuracy"), "{:.2f}%") for c in cs]
            cos = [_fmt(get(c, "cosine_mean"), "{:.4f}") for c in cs]
            secs = " / ".join(_fmt(get(c, "distill_seconds"), "{:.0f}") for c in cs[1:])
            lines.append(f"| {s} | " + " | ".join(acc + cos) + f" | {secs} |")
        lines.append("")
    abl = [c for c in configs if c.table == "ablation"]
    if abl:
        lines += [f"## Ablation (ZeroQuant table 9 style): SmolLM2-135M {ABLATION_SCHEME}, perplexity", "",
                  f"Weights per tensor or in {ABLATION_GROUPS} groups of output rows (both INT8 attention and INT4 MLP); "
                  "activations token-wise (the engine) or with one dynamic scale per tensor (per 512-token window), "
                  "which the engine does not do: those cells are the **torch simulation** (finequant.simulate with "
                  f"per-tensor fake quantization; LKD then also trains with it). LKD data: {args.ablation_lkd}.", "",
                  "| weights | activations | LKD | perplexity | vs fp32 | computed by |", "|---|---|---|---:|---:|---|"]
        base = get(fp.get("smollm2"), "perplexity") if "smollm2" in fp else None
        for c in abl:
            p = get(c, "perplexity")
            label = "simulated" if c.backend != "engine" else "engine"
            lines.append(f"| {c.scheme.split(' ', 1)[1]} | {c.acts} | {c.lkd} | {_fmt(p)} | "
                         f"{_fmt(p / base if p and base else None, '{:.3f}x')} | {label} |")
        lines.append("")
    timed = [(c, res[c]) for c in configs if res.get(c) and "lkd_seconds" in res[c]]
    if timed:
        lines += ["## LKD wall time on this machine", "",
                  f"`nproc` = {os.cpu_count()}, torch threads {args.threads}; all blocks, {args.lkd_steps} steps each, "
                  "including loading the model and computing the hidden states. Blocks kept at PTQ: training ended "
                  "worse than plain PTQ of the original block, which LKD then keeps.", "",
                  "| model | scheme | LKD data | seconds | mean block loss after / before | blocks kept at PTQ |",
                  "|---|---|---|---:|---:|---:|"]
        for c, r in timed:
            lines.append(f"| {c.model} | {c.scheme} ({c.acts} acts) | {c.lkd} | {r['lkd_seconds']:.0f} | "
                         f"{r['lkd_loss_ratio']:.2f} | {r.get('lkd_blocks_kept_ptq', '-')} |")
        lines.append("")
    lines += ["## Targets", ""] + targets(args, get, fp, gaps) + [""]
    return "\n".join(lines)


def targets(args, get, fp, gaps):
    out = []
    if "smollm2" in args.models:
        base = get(fp["smollm2"], "perplexity")
        def within(what, q, limit):
            if not (base and q):
                return f"- {what} within {limit:.0%} of fp32: not measured"
            r = q / base - 1
            return (f"- {what} within {limit:.0%} of fp32: {q:.2f} vs {base:.2f} ({r:+.2%}): "
                    + ("**met**" if r <= limit else f"**missed** by {r - limit:.2%}"))

        for s, lkd in (("w8a8", "none"), ("w8a8", "text"), ("w8a8 a-asym", "none"), ("w8a8 a-asym", "text")):
            what = f"SmolLM2 {s}{'' if lkd == 'none' else ' + LKD (' + lkd + ')'} perplexity"
            out.append(within(what, get(Config("smollm2", s, lkd=lkd), "perplexity"), 0.02))
        out.append(within("SmolLM2 w8a8 as `finequant quantize` makes it by default (issue 12)",
                          get(Config("smollm2", "w8a8 a-asym smooth + head (default)"), "perplexity"), 0.01))
        for s in [s for s in ("w4/8a8", "w4a8 kblock=32", "w4/8a8 rotate=64", "w4a8 kblock=32 rotate=64")
                  if s in args.schemes]:
            for d in LKD_DATA:
                g = gaps.get(s, {}).get(d)
                what = f"- LKD ({d}) closes >= 50% of the PTQ-to-fp32 perplexity gap for {s}: "
                out.append(what + ("not measured" if g is None else f"{g:.0%}: " +
                                   ("**met**" if g >= 0.5 else f"**missed** by {0.5 - g:.0%} of the gap")))
    if "minilm" in args.models:
        base, q = get(fp["minilm"], "probe_accuracy"), get(Config("minilm", "w8a8"), "probe_accuracy")
        if base is not None and q is not None:
            d = 100 * (q - base)
            out.append(f"- MiniLM w8a8 probe accuracy within 0.5 points of fp32: {100 * q:.2f}% vs {100 * base:.2f}% "
                       f"({d:+.2f} points): " + ("**met**" if abs(d) <= 0.5 or d > 0 else
                                                 f"**missed** by {abs(d) - 0.5:.2f} points"))
        else:
            out.append("- MiniLM w8a8 probe accuracy within 0.5 points of fp32: not measured")
        cells = [(c, get(c, "probe_accuracy"), get(c, "cosine_mean")) for c in plan(args)
                 if c.table == "distill" and c.lkd != "none"]
        cells = [x for x in cells if x[1] is not None and x[2] is not None]
        what = "- MiniLM W4A4 distilled (best cell): probe within 1 point of fp32 and cosine >= 0.97 (issue 12): "
        if base is None or not cells:
            out.append(what + "not measured")
        else:
            c, acc, cos = max(cells, key=lambda x: x[2])
            d = 100 * (acc - base)
            ok = (d >= -1.0, cos >= 0.97)
            out.append(what + f"{c.scheme}, {c.lkd}: probe {100 * acc:.2f}% ({d:+.2f} points, "
                       f"{'met' if ok[0] else 'missed'}), cosine {cos:.4f} ({'met' if ok[1] else 'missed'}): "
                       + ("**met**" if all(ok) else "**missed**"))
    return out


def figure(args, cache: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    get = lambda c, k: (cache.get(key_of(c, args)) or {}).get(k)  # noqa: E731
    panels = [(m, k, t) for m, k, t in (("smollm2", "perplexity", "SmolLM2-135M perplexity (Emma, lower is better)"),
                                        ("minilm", "probe_accuracy", "MiniLM Rotten Tomatoes probe accuracy"))
              if m in args.models]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (m, k, title) in zip(axes[:, 0], panels):
        x = np.arange(len(args.schemes))
        shown = []
        for i, (lkd, label) in enumerate((("none", "PTQ"), ("random", "LKD random"), ("text", "LKD Austen"))):
            vals = [get(Config(m, s, lkd=lkd), k) for s in args.schemes]
            shown += [v for v in vals if v is not None]
            ax.bar(x + (i - 1) * 0.27, [np.nan if v is None else v for v in vals], 0.27, label=label)
        base = get(Config(m, "fp32"), k)
        if base:
            ax.axhline(base, color="black", lw=0.8, ls="--", label="fp32")
        if k == "perplexity":
            ax.set_yscale("log")
        elif shown:  # accuracies differ by tenths of a point: start the axis near the lowest bar
            ax.set_ylim(min(shown) - 0.01, max(shown) + 0.005)
        ax.set_xticks(x, args.schemes, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args, cache: dict) -> None:
    md = os.path.join(args.out, "ACCURACY.md")
    notes = ""
    if os.path.isfile(md):  # keep the hand-written notes
        old = open(md, encoding="utf-8").read()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER):]
    text = report(args, cache) + "\n![accuracy](accuracy.png)\n\n" + notes
    with open(md + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(md + ".tmp", md)
    figure(args, cache, os.path.join(args.out, "accuracy.png"))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cache_path = os.path.join(args.out, "accuracy.jsonl")
    cache = load_cache(cache_path)
    if args.report_only:
        write_report(args, cache)
        return 0
    torch.set_num_threads(args.threads)
    study = Study(args)
    todo = [c for c in plan(args) if key_of(c, args) not in cache]
    print(f"{len(todo)} configurations to measure ({len(plan(args)) - len(todo)} cached)", file=sys.stderr)
    for n, cfg in enumerate(todo, 1):
        t0 = time.time()
        print(f"[{n}/{len(todo)}] {cfg.model} {cfg.scheme} lkd={cfg.lkd} acts={cfg.acts}", file=sys.stderr, flush=True)
        r = {"key": key_of(cfg, args), **study.measure(cfg), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(cache_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")
        cache[r["key"]] = r
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "key"}
        print(f"    {shown} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        write_report(args, cache)  # after every result: an interrupted run leaves a valid report
    write_report(args, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
