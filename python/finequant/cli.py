"""`finequant` command line: quantize Hugging Face models, inspect finequant model files, run and
evaluate them."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter

PROG = "finequant"


_FLOAT_HELP = ("how Linears with floating-point inputs (fp32 models, weight-only schemes, an unquantized LM "
               "head) multiply: fp32 (default, exact) or bf16 (bf16 weights and inputs, fp32 sums; CPUs with "
               "AVX512-BF16)")
_DEVICE_HELP = 'where the engine runs: "cpu" (default), "cuda", "cuda:N" or "auto" (a CUDA device when present, else the CPU)'


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


# --lkd-* option -> LKDOptions field
_LKD_OPTIONS = {"lkd_data": "data", "lkd_steps": "steps", "lkd_batch": "batch", "lkd_seq": "seq",
                "lkd_samples": "samples", "lkd_lr": "lr", "lkd_clip": "learn_clip",
                "lkd_checkpoint": "checkpoint", "seed": "seed"}
_DISTILL_OPTIONS = {"distill_data": "data", "distill_steps": "steps", "distill_batch": "batch",
                    "distill_seq": "seq", "distill_lr": "lr", "distill_clip": "learn_clip",
                    "distill_checkpoint": "checkpoint", "seed": "seed"}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="INT8/INT4 post-training quantization "
                                "(ZeroQuant) and an integer inference engine.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a Hugging Face model folder into a finequant model")
    q.add_argument("src", metavar="SRC", help="Hugging Face model folder (config.json + weights)")
    q.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    q.add_argument("--scheme", default="w8a8",
                   help="fp32, bf16, w8a16, w4a16, w8a8, w4a8, w4/8a8, w4/8a16, w4a4 (default w8a8)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", action="store_true", help="symmetric weights and activations")
    sym.add_argument("--asym", action="store_true", help="asymmetric weights and activations")
    q.add_argument("--w-asym", action="store_true", help="asymmetric weights (default: symmetric)")
    act_sym = q.add_mutually_exclusive_group()
    act_sym.add_argument("--a-asym", action="store_true",
                         help="asymmetric activations (the default: a zero point per token)")
    act_sym.add_argument("--a-sym", action="store_true", help="symmetric activations")
    grp = q.add_mutually_exclusive_group()
    grp.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor")
    grp.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    grp.add_argument("--group", type=_positive_int, metavar="G",
                     help="ZeroQuant groups: G groups of consecutive output rows per weight")
    grp.add_argument("--kblock", type=_positive_int, metavar="G",
                     help="one scale per output channel and block of G input columns")
    q.add_argument("--parts", metavar="LIST",
                   help="comma-separated GEMMs to quantize: qkv,attn_out,fc1,fc2, plus head for a decoder's LM "
                        "head (bits: --head-bits). Default: the four, plus head for schemes with integer activations "
                        "(w8a8, w4a8, w4/8a8, w4a4; BART: those with INT4 weights)")
    q.add_argument("--head-bits", type=int, choices=(4, 8),
                   help="with head in the parts: the LM head's weight bits (8: per channel; 4: K-blocks of 16 unless "
                        "--kblock/--group/... say otherwise, rounded as --head-rounding says). Default: 4 for w4a8 "
                        "and w4a4 (INT4 in every block GEMM) where it can be GPTQ-rounded (torch installed, a "
                        "decoder-only model), 8 otherwise")
    q.add_argument("--head-rounding", choices=("gptq", "nearest"),
                   help="an INT4 LM head's rounding: gptq (default; error compensation on ~8k tokens the model "
                        "samples itself, ~1-2 min on 2 cores for SmolLM2-135M; needs torch, else nearest with a "
                        "note) or nearest")
    q.add_argument("--encoder-scheme", metavar="S",
                   help="encoder-decoder models (BART): scheme of the encoder's Linears instead of --scheme, same "
                        "options (e.g. --scheme w8a8 --encoder-scheme w4a4: W4A4 encoder, W8A8 decoder)")
    q.add_argument("--decoder-scheme", metavar="S",
                   help="encoder-decoder models: scheme of the decoder's Linears instead of --scheme")
    q.add_argument("--rotate", type=_positive_int, nargs="?", const=64, metavar="B",
                   help="rotate the inputs of the quantized block GEMMs by a block-Hadamard matrix of B x B blocks "
                        "(default 64; a power of two dividing every such GEMM's input width) and their weights to "
                        "match: outlier channels spread over their block. On by default where outlier smoothing "
                        "runs on a scheme with INT4 weights (block 64, or the largest power of two >= 8 dividing "
                        "the widths); off for the others (W8A8: its prefill would be 5-10%% slower). A decoder's "
                        "quantized LM head has its input rotated by default whatever the scheme (its own block)")
    q.add_argument("--no-rotate", action="store_true",
                   help="no rotation, also for INT4 schemes and the LM head (e.g. for `finequant export`, which "
                        "cannot express it)")
    q.add_argument("--scale-dtype", choices=("fp32", "fp16"),
                   help="weight scales as any fp32 value, or rounded to fp16 values (half the scale bytes a step "
                        "reads; the integers are computed from the rounded scale). Default: fp16 for schemes "
                        "with INT4 weights, whose K-block scales are a fifth of their bytes; fp32 otherwise")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    sm = q.add_argument_group("outlier smoothing (on by default where activations are quantized; needs torch)")
    sm.add_argument("--no-smooth", action="store_true",
                    help="do not move activation outliers into the weights")
    sm.add_argument("--smooth-alpha", type=float, metavar="A",
                    help="share of each input channel's range moved into the weights, 0..1 (default 0.7)")
    lkd = q.add_argument_group("layer-by-layer distillation (ZeroQuant LKD; needs torch)")
    lkd.add_argument("--lkd", action="store_true",
                     help="train each block's quantized copy to match the original block before quantizing")
    lkd.add_argument("--lkd-data", metavar="SRC",
                     help="generate (the model's own samples; the default for decoders), random (token ids; "
                          "the default for encoders) or a text file")
    lkd.add_argument("--lkd-steps", type=_positive_int, metavar="N",
                     help="optimizer steps per block (default 100)")
    lkd.add_argument("--lkd-batch", type=_positive_int, metavar="B", help="sequences per step (default 4)")
    lkd.add_argument("--lkd-seq", type=_positive_int, metavar="T", help="tokens per sequence (default 128)")
    lkd.add_argument("--lkd-samples", type=_positive_int, metavar="N",
                     help="distinct sequences held in memory (default 64)")
    lkd.add_argument("--lkd-lr", type=_positive_float, metavar="LR",
                     help="Adam learning rate, decayed linearly to 0 (default: 3e-4 for blocks with INT4 weights, "
                          "1e-4 for INT8-only ones)")
    lkd.add_argument("--lkd-clip", action="store_true", help="also learn the weight clip ranges")
    lkd.add_argument("--gptq", action="store_true",
                     help="round each block's weights with GPTQ's error compensation, on the same samples LKD "
                          "uses (no data needed); alone it is the whole method (no training, ~40%% of --lkd's "
                          "time), with --lkd the training starts from it")
    lkd.add_argument("--lkd-checkpoint", metavar="DIR",
                     help="save each trained block here and resume from it if interrupted")
    lkd.add_argument("--seed", type=int, help="LKD / distillation data and shuffling seed (default 0)")
    dis = q.add_argument_group("quantization-aware distillation of a whole encoder (needs torch)")
    dis.add_argument("--distill", action="store_true",
                     help="encoders: train the whole quantized model end to end to match the fp32 model's hidden "
                          "states and pooled embeddings (instead of --lkd's block by block)")
    dis.add_argument("--distill-data", metavar="SRC", help="random (token ids, the default) or a text file")
    dis.add_argument("--distill-steps", type=_positive_int, metavar="N", help="optimizer steps (default 400)")
    dis.add_argument("--distill-batch", type=_positive_int, metavar="B", help="sequences per step (default 32)")
    dis.add_argument("--distill-seq", type=_positive_int, metavar="T", help="tokens per sequence (default 32)")
    dis.add_argument("--distill-lr", type=_positive_float, metavar="LR",
                     help="Adam learning rate, decayed linearly to 0 (default 2e-4)")
    dis.add_argument("--distill-clip", action=argparse.BooleanOptionalAction,
                     help="also learn the weight clip ranges (default: on)")
    dis.add_argument("--distill-checkpoint", metavar="DIR",
                     help="save the training state here every 50 steps and resume from it if interrupted")

    i = sub.add_parser("info", help="describe a finequant model directory")
    i.add_argument("path", metavar="OUT", help="finequant model directory or model.safetensors")

    tu = sub.add_parser("tune", help="time each GEMM part as stored (integer) and weight-only (fp32/bf16) per "
                        "token-count bucket on this machine and write MODEL/strategy.json, which the engine reads")
    tu.add_argument("model", metavar="MODEL", help="finequant model directory")
    tu.add_argument("--threads", type=_positive_int, help="CPU threads to tune for (default: the engine's default)")
    tu.add_argument("--rounds", type=_positive_int, default=3, help="timed rounds per case, best kept (default 3)")
    tu.add_argument("--margin", type=float, default=0.05,
                    help="a float kernel must be this much faster at every measured M of a bucket (default 0.05)")
    tu.add_argument("--no-accuracy", action="store_true", help="skip measuring each part's effect on the output")
    tu.add_argument("-o", "--output", metavar="FILE", help="where to write the table (default MODEL/strategy.json)")

    ex = sub.add_parser("export", help="write a finequant model as a compressed-tensors checkpoint that vLLM "
                        "and transformers load (needs torch; pip install finequant[export])")
    ex.add_argument("model", metavar="MODEL", help="finequant model directory")
    ex.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors",))
    ex.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    ex.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")

    model_help = "finequant model directory, or a Hugging Face folder (run in fp32)"
    r = sub.add_parser("run", help="generate text with a decoder (encoder-decoders: the output for the prompt)")
    r.add_argument("model", metavar="MODEL", help=model_help)
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-tokens", type=_positive_int, default=64, help="new tokens at most (default 64)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=_positive_int)
    r.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    r.add_argument("--float-precision", choices=("fp32", "bf16"), default="fp32", help=_FLOAT_HELP)

    e = sub.add_parser("embed", help="sentence embeddings of an encoder (mean-pooled, normalized)")
    e.add_argument("model", metavar="MODEL", help=model_help)
    e.add_argument("texts", nargs="+", metavar="TEXT")
    e.add_argument("--threads", type=_positive_int)
    e.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    e.add_argument("--float-precision", choices=("fp32", "bf16"), default="fp32", help=_FLOAT_HELP)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                        "/v1/embeddings, /v1/models, /health) with continuous batching (pip install finequant[serve])")
    sv.add_argument("model", metavar="MODEL", help=model_help)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=_positive_int, default=8000, help="default 8000")
    sv.add_argument("--slots", type=_positive_int, default=8, help="requests decoded together (default 8)")
    sv.add_argument("--max-length", type=_positive_int, default=2048, help="prompt + new tokens of one request "
                    "(default 2048, at most the model's positions): sizes the shared KV cache")
    sv.add_argument("--name", help="the model name clients send (default: MODEL's folder name)")
    sv.add_argument("--threads", type=_positive_int)
    sv.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    sv.add_argument("--float-precision", choices=("fp32", "bf16"), default="fp32", help=_FLOAT_HELP)

    pp = sub.add_parser("ppl", help="perplexity of a decoder on a text file (encoder-decoders: of reconstructing "
                        "the text given the same text as encoder input, BART's denoising objective without noise)")
    pp.add_argument("model", metavar="MODEL", help=model_help)
    pp.add_argument("text_file", metavar="TEXT_FILE")
    pp.add_argument("--ctx", type=_positive_int, default=512, help="window length in tokens (default 512)")
    pp.add_argument("--max-tokens", type=_positive_int, help="use the first N tokens of the text")
    pp.add_argument("--threads", type=_positive_int)
    pp.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    pp.add_argument("--float-precision", choices=("fp32", "bf16"), default="fp32", help=_FLOAT_HELP)

    ev = sub.add_parser("eval", help="quality of one or more models: perplexity (decoders), embedding "
                        "cosine and a linear probe (encoders)")
    ev.add_argument("models", nargs="+", metavar="MODEL", help=model_help)
    ev.add_argument("--text", metavar="FILE", help="decoders: perplexity on this text file")
    ev.add_argument("--ctx", type=_positive_int, default=512, help="perplexity window in tokens (default 512)")
    ev.add_argument("--max-tokens", type=_positive_int, help="perplexity on the first N tokens of the text")
    ev.add_argument("--cosine-vs", metavar="REF", help="encoders: cosine of the embeddings to this (fp32) "
                    "model's; with --probe the probe is trained on REF's embeddings")
    ev.add_argument("--probe", action="store_true", help="encoders: Rotten Tomatoes fresh/rotten "
                    "logistic-regression probe (trained on REF's, or else each model's own, embeddings)")
    ev.add_argument("--texts", metavar="FILE", help="encoders, --cosine-vs without --probe: one text per "
                    "line (default: the Rotten Tomatoes snippets)")
    ev.add_argument("--limit", type=_positive_int, help="encoders: use N texts (split 70/30 train/test)")
    ev.add_argument("--seed", type=int, default=0, help="train/test split and probe seed (default 0)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.add_argument("--threads", type=_positive_int)
    ev.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    ev.add_argument("--float-precision", choices=("fp32", "bf16"), default="fp32", help=_FLOAT_HELP)

    ins = sub.add_parser("inspect", help="plot per-token activation ranges and per-row weight ranges "
                         "per layer (ZeroQuant figure 1) to a PNG (needs torch and matplotlib)")
    ins.add_argument("model", metavar="MODEL", help="Hugging Face model folder")
    ins.add_argument("-o", "--output", required=True, metavar="PNG")
    ins.add_argument("--text", metavar="FILE", help="run on this text (default: random token ids)")
    ins.add_argument("--samples", type=_positive_int, default=4, help="sequences (default 4)")
    ins.add_argument("--seq", type=_positive_int, default=128, help="tokens per sequence (default 128)")
    ins.add_argument("--seed", type=int, default=0)
    return p


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _cmd_quantize(args) -> int:
    from . import hf
    from .modelfile import check_output_dir, publish, quantize_model
    from .schemes import HEAD, default_head_bits, default_parts, parse_scheme

    grouping = None
    if args.per_tensor:
        grouping = "tensor"
    elif args.per_channel:
        grouping = "channel"
    elif args.group:
        grouping = ("rows", args.group)
    elif args.kblock:
        grouping = ("kblock", args.kblock)
    if args.a_sym and args.asym:
        raise ValueError("--a-sym contradicts --asym (asymmetric weights and activations); use --w-asym --a-sym")
    if args.a_asym and args.sym:
        raise ValueError("--a-asym contradicts --sym (symmetric weights and activations)")
    if args.no_smooth and args.smooth_alpha is not None:
        raise ValueError("--smooth-alpha contradicts --no-smooth")
    if args.smooth_alpha is not None and not 0.0 <= args.smooth_alpha <= 1.0:
        raise ValueError(f"--smooth-alpha must be in [0, 1], got {args.smooth_alpha}")
    if args.rotate and args.no_rotate:
        raise ValueError("--rotate contradicts --no-rotate")
    if args.rotate:
        from .rotate import check_block

        try:
            check_block(args.rotate, args.rotate)
        except ValueError as e:
            raise ValueError(f"--rotate {args.rotate}: {e}") from None
    # Without --parts / --head-bits, the default LM head (the family is not known until the model is read).
    parts = args.parts if args.parts is not None else default_parts(args.scheme)

    def head_bits_for(family=None) -> int:  # encoder-decoder models: their head is not GPTQ-rounded (yet)
        if args.head_bits is not None:
            return args.head_bits
        if not parts or HEAD not in parse_scheme(args.scheme, parts=parts).parts or family in hf.SEQ2SEQ_FAMILIES:
            return 8
        return default_head_bits(args.scheme)

    head_bits = head_bits_for()
    rotations = {"rotation": args.rotate or 0, "head_rotation": 0}  # defaults set once the model is read

    # Activations default to asymmetric: with smoothing, W8A8 on SmolLM2-135M costs +0.5-0.75% perplexity
    # against +0.7-1.3% symmetric (docs/DESIGN.md section 6).
    def scheme_with(scale_dtype="fp32"):
        return parse_scheme(args.scheme, weight_symmetric=not (args.asym or args.w_asym),
                            act_symmetric=args.sym or args.a_sym, grouping=grouping,
                            parts=parts, head_bits=head_bits, encoder=args.encoder_scheme,
                            decoder=args.decoder_scheme, scale_dtype=scale_dtype, **rotations)

    scheme = scheme_with()
    # INT4 schemes default to fp16 scales: at K-blocks of 32, fp32 scales are 4 of every 20 bytes a decode
    # step reads; rounding them moved SmolLM2-135M's W4A8 perplexity by noise (docs/DESIGN.md section 2).
    scale_dtype = args.scale_dtype or ("fp16" if scheme.has_int4_weights else "fp32")
    scheme = scheme_with(scale_dtype)
    given = {field: getattr(args, opt) for opt, field in _LKD_OPTIONS.items()
             if getattr(args, opt) not in (None, False)}
    given_distill = {field: getattr(args, opt) for opt, field in _DISTILL_OPTIONS.items()
                     if getattr(args, opt) is not None}
    blockwise = args.lkd or args.gptq  # block by block, on LKD's samples
    blockwise_flag = "--lkd" if args.lkd else "--gptq"
    if blockwise and args.distill:
        raise ValueError(f"--distill and {blockwise_flag} are two ways of fitting the "
                         "quantized weights: choose one")
    if blockwise or args.distill:  # these run in torch; plain PTQ needs neither (DESIGN.md section 2)
        hf.require_torch(blockwise_flag if blockwise else "--distill")
    if given and not args.lkd:
        training = {"steps", "lr", "learn_clip"}  # what GPTQ alone does not use
        allowed = set(given) - training if args.gptq else {"seed"} if args.distill else set()
        bad = set(given) - allowed
        if bad:
            names = [f"--{opt.replace('_', '-')}" for opt, field in _LKD_OPTIONS.items() if field in bad]
            raise ValueError(f"{', '.join(names)} only apply with --lkd" + ("" if bad & training else " or --gptq"))
    if given_distill and not args.distill and not (args.lkd and set(given_distill) == {"seed"}):
        names = [f"--{opt.replace('_', '-')}" for opt, field in _DISTILL_OPTIONS.items() if field in given_distill]
        raise ValueError(f"{', '.join(names)} only apply with --distill")
    if args.distill:
        from .distill import DistillOptions

        distill_options = DistillOptions(progress=not args.quiet, **given_distill).check()
        if not scheme.is_quantized:
            raise ValueError(f"--distill needs a quantized scheme, not {scheme.name}")
    if blockwise:
        from .lkd import LKDOptions

        lkd_options = LKDOptions(progress=not args.quiet, gptq=args.gptq, **given,
                                 **({} if args.lkd else {"steps": 0})).check()
        if not scheme.is_quantized:
            raise ValueError(f"{blockwise_flag} needs a quantized scheme, not {scheme.name}")
    check_output_dir(args.output, args.overwrite)  # before any slow work
    progress = not args.quiet
    if progress:
        print(f"reading {args.src}", file=sys.stderr)
    model = hf.load(args.src, tensors="numpy")
    if model.family == "bert" and args.head_bits not in (None, 8) and args.parts is None:
        raise ValueError(f"--head-bits {args.head_bits}: {args.src} is an encoder ({model.family}) and has no LM head")
    if args.parts is None:
        # encoders have no LM head: the default's is dropped ('head' in --parts is ignored); W8A8
        # encoder-decoder models keep theirs floating point
        parts = default_parts(args.scheme, model.family)
    head_bits = head_bits_for(model.family)
    if head_bits == 4 and args.head_bits is None and args.head_rounding != "nearest" and not hf.torch_available():
        # The INT4 head is a default only where GPTQ rounds it: rounded to nearest it costs SmolLM2-135M W4A8
        # +8.8% perplexity instead of +1.0% (docs/DESIGN.md section 6).
        head_bits = 8
        if progress:
            print(f"note: the default INT4 LM head needs torch for its GPTQ rounding ({hf.TORCH_EXTRA}): keeping "
                  "it INT8 (--head-bits 8 silences this note)", file=sys.stderr)
    scheme = scheme_with(scale_dtype)
    if args.head_rounding and not scheme.int4_head:
        raise ValueError("--head-rounding applies to an INT4 LM head (--head-bits 4)")
    if args.distill:
        from .distill import check_family

        check_family(model.family)  # before smoothing loads the torch model
    torch_model, smoothing = None, {}
    if model.family in hf.SEQ2SEQ_FAMILIES:  # smoothing and LKD know decoder-only and encoder-only blocks
        if blockwise:
            raise ValueError(f"{blockwise_flag} is not supported for {model.family} "
                             "(encoder-decoder) models")
        if args.smooth_alpha is not None:
            raise ValueError(f"outlier smoothing is not supported for {model.family} (encoder-decoder) models")
        if not args.no_smooth and scheme.is_quantized and progress:
            print(f"note: outlier smoothing is not implemented for {model.family}: quantizing without it "
                  "(--no-smooth silences this note)", file=sys.stderr)
    elif not args.no_smooth and scheme.is_quantized:
        from . import smooth

        if not smooth.smoothable_parts(model, scheme):
            pass
        elif args.smooth_alpha is None and not hf.torch_available():
            # The calibration pass is a torch forward: without torch the default recipe quantizes as
            # --no-smooth does, says so, and records it (docs/DESIGN.md section 2, "Quantizing without torch").
            smoothing = {"skipped": "torch not installed"}
            if progress:
                print(f"note: outlier smoothing needs torch for its calibration pass ({hf.TORCH_EXTRA}): "
                      "quantizing without it, as --no-smooth does (--no-smooth silences this note)",
                      file=sys.stderr)
        else:
            if args.smooth_alpha is not None:
                hf.require_torch("--smooth-alpha (outlier smoothing)")
            from .lkd import load_torch_model

            model = model.to_torch()
            torch_model = load_torch_model(model.folder, model.family)
            alpha = smooth.DEFAULT_ALPHA if args.smooth_alpha is None else args.smooth_alpha
            smoothing = smooth.smooth_model(model, scheme, torch_model, alpha=alpha)
            if progress and smoothing:
                ratios = ", ".join(f"{p} {r:.1f}x" for p, r in smoothing["outlier_reduction"].items())
                print(f"smoothed activation outliers (alpha {alpha}, {smoothing['data']}): peak/mean "
                      f"input range down {ratios}", file=sys.stderr)
    if args.rotate is None and not args.no_rotate and scheme.has_int4_weights and smoothing \
            and "skipped" not in smoothing:
        # Smoothed INT4 schemes are rotated unless told otherwise: smoothing moves activation outliers into
        # weight columns, which INT4 K-blocks then lose; the rotation spreads them. SmolLM2-135M W4A8 39.5 ->
        # 36.6, W4/8A8 37.8 -> 35.4 (fp32 32.0); unsmoothed W4A8 it made worse, 41.8 -> 44.6 (DESIGN.md section 6).
        from .rotate import default_block

        block = default_block(model.tensors[m + ".weight"].shape[1] for m in model.linear_parts())
        if block:
            rotations["rotation"] = block
            scheme = scheme_with(scale_dtype)
    if not args.no_rotate and HEAD in scheme.parts and scheme.act_bits \
            and model.family != "bert" and model.family not in hf.SEQ2SEQ_FAMILIES:
        # A quantized LM head's input is rotated unless told otherwise: the final norm's output has outlier
        # channels that its token-wise INT8 activations lose, and that weigh the INT4 head's rounding errors in
        # their columns. SmolLM2-135M W8A8 with the INT8 head 32.35 -> 32.27 (fp32 32.00; 32.22 with an fp32 head),
        # W4A8 36.8 -> 36.7; the GPTQ-rounded INT4 head (fp32 body) 33.62 -> 32.63 (docs/DESIGN.md section 6).
        from .rotate import default_block

        head = "lm_head.weight" if "lm_head.weight" in model.tensors else hf.embedding_name(model.family)
        block = default_block([model.tensors[head].shape[1]])
        if block:
            rotations["head_rotation"] = block
            scheme = scheme_with(scale_dtype)
    if blockwise or args.distill:
        model = model.to_torch()
    if blockwise:
        from .lkd import apply

        apply(model, scheme, lkd_options, torch_model=torch_model)
    if args.distill:
        from . import distill

        _, stats = distill.apply(model, scheme, distill_options, torch_model=torch_model)
    head_rounding = _round_int4_head(args, model, scheme, torch_model, progress)
    tensors, metadata = quantize_model(model, scheme, progress=progress)
    if smoothing:
        metadata["smoothing"] = json.dumps(smoothing)
    if head_rounding:
        metadata["head_rounding"] = json.dumps(head_rounding)
    if args.distill:
        o = distill_options
        metadata["distillation"] = json.dumps({
            "data": o.data if o.data == "random" else os.path.basename(o.data), "steps": o.steps, "batch": o.batch,
            "seq": o.seq, "lr": o.lr, "seed": o.seed, "learn_clip": o.learn_clip, "kept_ptq": stats["kept_ptq"],
            "held_out_cosine": [round(stats["cosine_ptq"], 4), round(stats["cosine_trained"], 4)]})
    path = publish(args.output, tensors, metadata, tokenizer_src=args.src)
    if progress:
        print(f"wrote {path} ({model.family}, {model.num_layers} layers, scheme "
              f"{metadata['scheme']})", file=sys.stderr)
    return 0


def _round_int4_head(args, model, scheme, torch_model, progress: bool) -> dict:
    """GPTQ rounding of an INT4 LM head (the default for --head-bits 4, DESIGN.md section 6): sets the
    head's weights in model.tensors; returns the file's "head_rounding" record ({} when the head is not
    INT4 or --head-rounding nearest)."""
    import time

    from . import hf

    if not scheme.int4_head or model.family == "bert" or args.head_rounding == "nearest":
        return {}
    why = ("not implemented for encoder-decoder models" if model.family in hf.SEQ2SEQ_FAMILIES
           else "torch not installed" if not hf.torch_available() else None)
    if why:
        if args.head_rounding == "gptq":
            raise ValueError(f"--head-rounding gptq: {why}" + (f" ({hf.TORCH_EXTRA})" if "torch" in why else ""))
        if progress:
            print(f"note: the INT4 LM head is rounded to nearest: GPTQ rounding is {why} "
                  "(--head-rounding nearest silences this note)", file=sys.stderr)
        return {"skipped": why}
    from .lkd import round_head

    t0 = time.time()
    record = round_head(model, scheme, torch_model)
    if progress:
        print(f"rounded the INT4 LM head by GPTQ on the model's own samples ({record['data']}, "
              f"{time.time() - t0:.0f} s)", file=sys.stderr)
    return record


def _describe_linear(lq) -> str:
    if not lq.weight_bits:
        w = "w fp"
    else:
        w = f"w{lq.weight_bits} {'sym' if lq.weight_symmetric else 'asym'} tile {lq.tile[0]}x{lq.tile[1]}"
    a = f"a{lq.act_bits} {'sym' if lq.act_symmetric else 'asym'}" if lq.act_bits else "a fp"
    return (f"{w}, {a}" + (f", rotate {lq.rotation}" if lq.rotation else "")
            + (", fp16 scales" if lq.weight_bits and lq.half_scales else ""))


def _cmd_export(args) -> int:
    from .export import export

    report = export(args.model, args.output, fmt=args.format, overwrite=args.overwrite)
    print(f"wrote {report.path} ({args.format}, format {report.format})")
    for name, group in report.groups.items():
        w, a = group["weights"], group["input_activations"]
        how = f"group {w['group_size']}" if w["group_size"] else "per channel"
        acts = f"int{a['num_bits']} dynamic per token" if a else "floating point"
        print(f"  {name}: int{w['num_bits']} weights {how}, activations {acts}: {', '.join(group['targets'])}")
    if report.ignore:
        print(f"  floating point: {', '.join(report.ignore)}")
    for note in report.notes:
        print(f"  converted: {note}")
    return 0


def _cmd_info(args) -> int:
    from .modelfile import load_info

    info = load_info(args.path)
    print(f"file:          {info['path']}")
    print(f"architecture:  {info['architecture']}")
    print(f"layers:        {info['num_layers']}")
    print(f"scheme:        {info['scheme']}")
    sm = info.get("smoothing")
    if sm and sm.get("skipped"):
        print(f"smoothing:     skipped ({sm['skipped']})")
    elif sm:
        print(f"smoothing:     alpha {sm.get('alpha')} on {', '.join(sm.get('parts', []))} ({sm.get('data')})")
    dist = info.get("distillation")
    if dist:
        cos = dist.get("held_out_cosine") or ["?", "?"]
        print(f"distillation:  {dist.get('steps')} steps on {dist.get('data')} data, held-out pooled cosine "
              f"{cos[0]} -> {cos[1]}{' (kept the PTQ weights)' if dist.get('kept_ptq') else ''}")
    print("linears:")
    groups = Counter((lq.part, _describe_linear(lq)) for lq in info["linears"].values())
    order = {"qkv": 0, "attn_out": 1, "fc1": 2, "fc2": 3}
    for (part, desc), count in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        print(f"  {part:<9} x{count:<4} {desc}")
    print(f"tensors:       {info['num_tensors']}, {_fmt_bytes(info['tensor_bytes'])}")
    print(f"file size:     {_fmt_bytes(info['file_size'])}")
    print(f"fp32 size:     {_fmt_bytes(info['fp32_bytes'])}")
    print(f"compression:   {info['compression']:.2f}x vs fp32")
    from .tune import STRATEGY_FILE, describe, model_folder, read_table

    table_path = os.path.join(model_folder(args.path), STRATEGY_FILE)
    if os.path.isfile(table_path):
        for line in describe(read_table(table_path)):
            print(line)
    else:
        print("strategy:      none (every GEMM as stored; `finequant tune` measures per-shape choices)")
    return 0


def _cmd_tune(args) -> int:
    from .tune import tune

    tune(args.model, threads=args.threads or 0, rounds=args.rounds, margin=args.margin,
         accuracy=not args.no_accuracy, output=args.output)
    return 0


def _cmd_run(args) -> int:
    from .engine import Engine

    engine = Engine(args.model, threads=args.threads, device=args.device, float_precision=args.float_precision)
    for piece in engine.stream(args.prompt, max_new_tokens=args.max_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        print(piece, end="", flush=True)
    print()
    return 0


def _cmd_embed(args) -> int:
    import numpy as np

    from .engine import Engine

    emb = Engine(args.model, threads=args.threads, device=args.device,
                 float_precision=args.float_precision).embed(args.texts)
    for text, row in zip(args.texts, emb):
        print(f"{text[:40]!r}: [{', '.join(f'{v:.4f}' for v in row[:6])}, ...] (dim {row.shape[0]})")
    if len(args.texts) > 1:
        print("cosine similarity:")
        print(np.array2string(emb @ emb.T, precision=4))
    return 0


def _cmd_ppl(args) -> int:
    from .engine import Engine
    from .evaluate import perplexity

    engine = Engine(args.model, threads=args.threads, device=args.device, float_precision=args.float_precision)
    with open(args.text_file, encoding="utf-8") as f:
        text = f.read()
    r = perplexity(engine, text, ctx=args.ctx, max_tokens=args.max_tokens, progress=True)
    print(f"tokens: {r['tokens']} in {r['windows']} windows of <= {args.ctx}")
    print(f"perplexity: {r['perplexity']:.4f}")
    return 0


def _cmd_eval(args) -> int:
    import json

    from .engine import Engine
    from .evaluate import EncoderEval, perplexity, rotten_tomatoes

    engines = [Engine(m, threads=args.threads, device=args.device, float_precision=args.float_precision)
               for m in args.models]
    # encoder-decoders (BART) are scored like decoders: perplexity of reconstructing --text
    decoders = [m for m, e in zip(args.models, engines) if e.is_decoder or e.is_seq2seq]
    encoders = [m for m, e in zip(args.models, engines) if not (e.is_decoder or e.is_seq2seq)]
    if decoders and not args.text:
        raise ValueError(f"{decoders[0]} is a decoder or encoder-decoder: pass --text FILE for its perplexity")
    if encoders and not (args.probe or args.cosine_vs):
        raise ValueError(f"{encoders[0]} is an encoder: pass --probe and/or --cosine-vs REF")
    if args.probe and args.texts:
        raise ValueError("--probe uses the labelled Rotten Tomatoes snippets; --texts is for --cosine-vs alone")
    text = texts = labels = None
    if decoders:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    if encoders:
        if args.texts:
            with open(args.texts, encoding="utf-8") as f:
                texts = [line.strip() for line in f if line.strip()]
        else:
            texts, labels = rotten_tomatoes()
            labels = labels if args.probe else None
    shared = None
    if encoders and args.cosine_vs:
        reference = Engine(args.cosine_vs, threads=args.threads, device=args.device,
                           float_precision=args.float_precision)
        shared = EncoderEval(reference, texts, labels, args.limit, args.seed)
    rows = []
    for model, engine in zip(args.models, engines):
        row = {"model": model, "scheme": engine.scheme}
        if engine.is_decoder or engine.is_seq2seq:
            row.update(perplexity(engine, text, ctx=args.ctx, max_tokens=args.max_tokens, progress=not args.json))
        else:  # without a reference each model is its own: cosine 1, the probe on its own embeddings
            row.update((shared or EncoderEval(engine, texts, labels, args.limit, args.seed))(engine))
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = [("model", "{}"), ("scheme", "{}"), ("perplexity", "{:.4f}"), ("tokens", "{}"),
            ("probe_accuracy", "{:.2%}"), ("cosine_mean", "{:.4f}"), ("cosine_min", "{:.4f}"), ("test", "{}")]
    cols = [(k, f) for k, f in cols if any(k in r for r in rows)]
    cells = [[k for k, _ in cols]] + [[f.format(r[k]) if k in r else "-" for k, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
    return 0


def _cmd_serve(args) -> int:
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, slots=args.slots, threads=args.threads, device=args.device,
          max_length=args.max_length, name=args.name, float_precision=args.float_precision)
    return 0


def _cmd_inspect(args) -> int:
    from .inspection import inspect_model

    summary = inspect_model(args.model, args.output, text_file=args.text, samples=args.samples, seq=args.seq,
                            seed=args.seed)
    print(f"wrote {args.output}")
    print("largest range / median range in a layer, median and max over layers (what one scale per tensor "
          "wastes):")
    for part, s in summary.items():
        print(f"  {part:<9} tokens {s['token_spread']:6.1f}x (max {s['token_spread_max']:7.1f}x)   "
              f"weight rows {s['row_spread']:6.1f}x (max {s['row_spread_max']:7.1f}x)")
    return 0


COMMANDS = {"quantize": _cmd_quantize, "info": _cmd_info, "run": _cmd_run, "embed": _cmd_embed, "ppl": _cmd_ppl,
            "eval": _cmd_eval, "inspect": _cmd_inspect, "export": _cmd_export, "serve": _cmd_serve,
            "tune": _cmd_tune}


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except (ValueError, NotImplementedError, OSError) as e:  # ModelFileError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional dependency: one line naming the extra that installs it
        missing = getattr(e, "name", None)
        if missing in ("torch", "transformers"):
            extra = "export" if args.command == "export" else "train"
            e = f"finequant {args.command} needs {missing}: pip install 'finequant[{extra}]'"
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the engine's runtime failures, e.g. no CUDA device for --device cuda
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
