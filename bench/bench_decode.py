"""Greedy decode of GPT-2 small (random weights) and SmolLM2-135M: finequant against HF and CTranslate2.

    python bench/bench_decode.py [--quick] [--threads 2] [--models gpt2,smollm2]

Per model and batch (1 and 8): a random 32-token prompt per row, 64 new tokens forced (no early stop:
finequant without stop tokens, HF with min_new_tokens, CT2 with min_length), greedy everywhere.
tokens/s = batch * new tokens / wall time of the whole generate call (prefill included).
Systems: finequant fp32, fp32 with float_precision="bf16", w8a8, w4a8 (kblock 32; both with the INT8 LM head),
w4a8 head4 (with `--head-bits 4`: an INT4 LM head, K-blocks of 16, GPTQ-rounded; `quantize --scheme w4a8`'s
default head where torch is installed); HF
transformers fp32 and dynamic int8
(torch quantize_dynamic of every Linear, GPT-2's Conv1D swapped for Linear first); CTranslate2 int8.
Goals: finequant w8a8 >= 2x the fastest peer at batch 1; w4a8 >= 1.4x w8a8 (printed for both heads); and,
against the DRAM read bandwidth (_core.dram_read_gbps, one sweep per round alternated with the systems: a
shared VM's bandwidth moves by a third from minute to minute), the weight bytes a decode step reads x steps/s
>= 80% of its median (the memory limit of decode). Two measures: over the whole generate call (prefill in the
wall time, so a floor) and over the decode steps alone (each finequant model also runs the prompt + 1 token in
every round; a step = the difference of the two calls' times in the round / (new - 1), median over the rounds):
the prompt's forward pass is compute-bound and reads the weights once for all its tokens, so the steps are what
the memory limit is about.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import sys
import warnings

import numpy as np

import common
import models

PROMPT, NEW, BATCHES = 32, 64, (1, 8)
QUICK_PROMPT, QUICK_NEW, QUICK_BATCHES = 8, 4, (1, 2)
# The quantized finequant models quantize the LM head too (INT8), as the int8 peers do.
WITH_HEAD = ("--parts", "qkv,attn_out,fc1,fc2,head")
# name -> (float_precision, scheme, quantize options)
FQ_SCHEMES = {"finequant fp32": ("fp32", "fp32"), "finequant fp32 bf16": ("bf16", "fp32"),
              "finequant w8a8": ("fp32", "w8a8", *WITH_HEAD),
              "finequant w4a8": ("fp32", "w4a8", "--kblock", "32", *WITH_HEAD, "--head-bits", "8"),
              # the INT4 LM head option: K-blocks of 16, GPTQ-rounded on own samples (DESIGN.md section 6)
              "finequant w4a8 head4": ("fp32", "w4a8", *WITH_HEAD, "--head-bits", "4")}
W8, W4, W4H4 = "finequant w8a8", "finequant w4a8", "finequant w4a8 head4"
PEER_GOAL, W4_GOAL = 2.0, 1.4


def conv1d_to_linear(model):
    """GPT-2 stores its projections as transformers' Conv1D (weight [in, out]); quantize_dynamic only
    knows nn.Linear, so without this swap only the LM head would be quantized."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight = torch.nn.Parameter(child.weight.detach().t().contiguous())
                lin.bias = child.bias
                setattr(module, name, lin)
    return model


def build_systems(src: str, threads: int, new: int) -> tuple:
    """name -> callable(ids int64 [B, T]) -> list of B lists of new token ids; each finequant model's weight
    bytes per step; and its prompt + 1 token callable (the prefill a decode-step time subtracts)."""
    import ctranslate2
    import torch
    from transformers import AutoModelForCausalLM

    import finequant
    from finequant import _core

    systems, step_bytes, first = {}, {}, {}
    for name, (precision, scheme, *extra) in FQ_SCHEMES.items():
        path = models.finequant_model(src, scheme, *extra)
        # bf16: the engine keeps the fp32 file's Linear weights as bf16 where the CPU can (else fp32).
        halved = precision == "bf16" and _core.bf16_available()
        step_bytes[name] = bytes_per_step(path) // (2 if halved else 1)
        eng = finequant.Engine(path, threads=threads, float_precision=precision)
        # The C++ engine's generate takes a [B, T] batch (finequant.Engine.generate: one prompt), so
        # call the binding directly: max_new_tokens, temperature 0 (greedy), top_k, top_p, seed, no stops.
        systems[name], first[name] = ((lambda ids, e=eng._engine, n=n: [list(r) for r in e.generate(
            ids, None, n, 0.0, 0, 1.0, 0, [], None)]) for n in (new, 1))

    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(conv1d_to_linear(copy.deepcopy(hf)), {torch.nn.Linear},
                                                     dtype=torch.qint8)
    pad = hf.config.eos_token_id if isinstance(hf.config.eos_token_id, int) else 0

    def hf_fn(model):
        def run(ids):
            t = torch.from_numpy(ids)
            with torch.inference_mode():
                out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=pad)
            return out[:, ids.shape[1]:].tolist()
        return run

    systems["HF fp32"] = hf_fn(hf)
    systems["HF dynamic int8"] = hf_fn(dyn)

    ct2_path = models.ct2_model(src, "int8")
    vocab = models.ct2_vocabulary(ct2_path)
    gen = ctranslate2.Generator(ct2_path, device="cpu", compute_type="int8", intra_threads=threads,
                                inter_threads=1)

    def ct2_fn(ids):
        # include_prompt_in_result=False: the prompt is one forward pass (prefill), as in the others.
        out = gen.generate_batch([[vocab[i] for i in row] for row in ids], max_length=new, min_length=new,
                                 include_prompt_in_result=False, sampling_topk=1)
        return [r.sequences_ids[0] for r in out]

    systems["CT2 int8"] = ct2_fn
    return systems, step_bytes, first


EMBEDDING_TABLES = ("wte.weight", "wpe.weight", "embed_tokens.weight")
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8}


def bytes_per_step(model_dir: str) -> int:
    """Weight bytes one decode step reads: every tensor of the finequant model file but the embedding
    tables (a step gathers one row of those), plus the word embeddings when the LM head is tied to them;
    scales that the file marks as fp16 values (scale_dtype) count 2 bytes, as the kernels hold them."""
    from safetensors import safe_open

    total, names = 0, []
    with safe_open(os.path.join(model_dir, "model.safetensors"), "np") as f:
        quant = json.loads(f.metadata().get("quantization", "{}"))
        half = {m + ".weight_scale" for m, r in quant.items() if r.get("scale_dtype") == "fp16"}
        for name in f.keys():
            sl = f.get_slice(name)
            nbytes = int(np.prod(sl.get_shape())) * (2 if name in half else DTYPE_BYTES[sl.get_dtype()])
            names.append(name)
            if not name.endswith(EMBEDDING_TABLES):
                total += nbytes
            elif name.endswith(("wte.weight", "embed_tokens.weight")):
                word_embeddings = nbytes
    if not any(n.startswith("lm_head.") for n in names):
        total += word_embeddings
    return total


def agreement(a: list, b: list) -> float:
    """Mean length of the common prefix of two batches of greedy continuations, as a fraction."""
    def prefix(x, y):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n
    return float(np.mean([prefix(x, y) / max(len(x), 1) for x, y in zip(a, b)]))


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,smollm2", help="comma-separated: gpt2, smollm2")
    args = p.parse_args()
    common.finish_args(args)
    common.set_threads(args.threads)
    prompt, new, batches = (QUICK_PROMPT, QUICK_NEW, QUICK_BATCHES) if args.quick else (PROMPT, NEW, BATCHES)
    res = common.Results(args.out, "decode", args, {"prompt": prompt, "new_tokens": new})
    print(f"greedy decode, prompt {prompt}, {new} new tokens, threads={args.threads}, repeats={args.repeats}; "
          f"tokens/s median (best); ratio = finequant w8a8 / system tokens/s")
    from finequant import _core

    dram_mb, dram_s = (64, 0.1) if args.quick else (512, 0.5)
    rng = np.random.default_rng(0)
    for key in args.models.split(","):
        if key == "gpt2":
            src, title = models.random_gpt2(2 if args.quick else 12), "GPT-2 small (random weights)"
        elif key == "smollm2":
            src, title = models.smollm2(), "SmolLM2-135M"
        else:
            raise SystemExit(f"unknown model {key!r}")
        systems, step_bytes, first = build_systems(src, args.threads, new)
        peers = [s for s in systems if not s.startswith("finequant")]
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(src).vocab_size
        for batch in batches:
            ids = rng.integers(1000, vocab_size - 1000, (batch, prompt), dtype=np.int64)
            outs = {s: fn(ids) for s, fn in systems.items()}  # also the warm-up
            for s, o in outs.items():
                lengths = {len(r) for r in o}
                if len(o) != batch or lengths != {new}:
                    raise RuntimeError(f"{s} returned {len(o)} rows of lengths {lengths}, expected {batch} x {new}")
            agree = {s: agreement(outs[s], outs["HF fp32"]) for s in systems}
            # The DRAM ceiling as one more system of the rounds: the bandwidth of the same minutes.
            sweeps = []
            fns = {s: (lambda fn=fn: fn(ids)) for s, fn in systems.items()}
            fns.update({f"{s} [prompt + 1]": (lambda fn=fn: fn(ids)) for s, fn in first.items()})
            fns["DRAM sweep"] = lambda: sweeps.append(_core.dram_read_gbps(args.threads, dram_mb, dram_s))
            t = common.measure(fns, args.repeats, warmup=0, settle=False)
            dram = statistics.median(sweeps)
            tps = {s: batch * new / t[s]["median_s"] for s in systems}
            # Weight bytes read per second: a step reads the weights once for the whole batch. Decode steps
            # alone: the two calls of a round differ by new - 1 steps.
            step_s = {s: statistics.median(a - b for a, b in zip(t[s]["samples_s"], t[f"{s} [prompt + 1]"]["samples_s"]))
                      / (new - 1) for s in step_bytes}
            read_gbps = {s: step_bytes[s] * tps[s] / batch / 1e9 for s in step_bytes}
            steps_gbps = {s: step_bytes[s] / step_s[s] / 1e9 for s in step_bytes}
            for s in systems:
                extra = {}
                if s in step_bytes:
                    extra = dict(bytes_per_step=step_bytes[s], weights_read_gbps=read_gbps[s], dram_read_gbps=dram,
                                 dram_sweeps_gbps=sweeps,
                                 fraction_of_dram=read_gbps[s] / dram, decode_step_s=step_s[s],
                                 prompt_plus_one_s=t[f"{s} [prompt + 1]"]["median_s"],
                                 steps_read_gbps=steps_gbps[s], steps_fraction_of_dram=steps_gbps[s] / dram)
                res.add(model=key, model_dir=os.path.basename(src), batch=batch, system=s, tokens_per_s=tps[s],
                        tokens_per_s_best=batch * new / t[s]["min_s"], agreement_with_hf_fp32=agree[s], **extra,
                        **t[s])
            fastest = max(peers, key=tps.get)
            print(f"\n{title}, batch {batch}: fastest peer {fastest}; DRAM read bandwidth on {args.threads} threads, "
                  f"median of the rounds {dram:.1f} GB/s ({min(sweeps):.1f}-{max(sweeps):.1f})")
            for s in systems:
                memory = (f"  {step_bytes[s] / 1e6:6.1f} MB/step -> {read_gbps[s]:5.1f} GB/s = "
                          f"{read_gbps[s] / dram:4.0%} of DRAM; decode steps {1e3 * step_s[s]:.2f} ms -> "
                          f"{steps_gbps[s] / dram:4.0%}" if s in step_bytes else "")
                print(f"  {s:<21}{tps[s]:9.1f} ({batch * new / t[s]['min_s']:.1f}) tok/s"
                      f"  w8a8/this {tps[W8] / tps[s]:5.2f}x  greedy agreement with HF fp32 {agree[s]:.0%}{memory}",
                      flush=True)
            r_peer = tps[W8] / tps[fastest]
            if batch == 1:
                print(f"  goal w8a8 >= {PEER_GOAL}x fastest peer: {r_peer:.2f}x "
                      f"{'PASS' if r_peer >= PEER_GOAL else 'FAIL'}")
            for w4, head in ((W4, "INT8 head"), (W4H4, "INT4 head")):
                r_w4 = tps[w4] / tps[W8]
                print(f"  goal w4a8 >= {W4_GOAL}x w8a8 ({head}): {r_w4:.2f}x {'PASS' if r_w4 >= W4_GOAL else 'FAIL'}")
        del systems
        gc.collect()
    print(f"\nresults appended to {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
