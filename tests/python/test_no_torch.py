"""`finequant quantize` without torch (docs/DESIGN.md section 2, "Quantizing without torch").

A subprocess with torch and transformers made unimportable (None in sys.modules: `import torch` raises
ModuleNotFoundError, as after a plain `pip install .`) quantizes tiny random models of every family for
every scheme; the files must be byte-identical to what the same commands write in this process, where
torch is importable, and their quantized weights bit-identical to a torch reference of the quantization
math. Default smoothing without torch is skipped with a note and recorded; --lkd, --distill and
--smooth-alpha fail with one line naming the extra; info, run and ppl work on the result."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import finequant  # noqa: E402
from finequant.cli import main  # noqa: E402
from finequant.pack import unpack_int4  # noqa: E402

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
TRAIN_EXTRA = "pip install 'finequant[train]'"


def _llama_like(cls, **kw):
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **TOKENS)
    base.update(kw)
    return cls(**base)


# name -> (config maker, torch dtype the checkpoint is saved in, shard size or None)
MODELS = {
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                             bos_token_id=0, eos_token_id=0), torch.float32, None),
    "bert": (lambda: transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=128,
                                             max_position_embeddings=64), torch.float32, None),
    # bf16 checkpoint with tied embeddings
    "llama": (lambda: _llama_like(transformers.LlamaConfig, tie_word_embeddings=True), torch.bfloat16, None),
    "mistral": (lambda: _llama_like(transformers.MistralConfig, head_dim=16, sliding_window=16),
                torch.float16, None),
    "qwen2": (lambda: _llama_like(transformers.Qwen2Config, tie_word_embeddings=True), torch.float32, None),
    # fused qkv / gate_up, sharded safetensors
    "phi3": (lambda: _llama_like(transformers.Phi3Config, original_max_position_embeddings=64), torch.float32,
             "60KB"),
    "gemma": (lambda: _llama_like(transformers.GemmaConfig, num_key_value_heads=1, head_dim=16), torch.float32, None),
    "gemma2": (lambda: _llama_like(transformers.Gemma2Config, head_dim=16, sliding_window=16), torch.bfloat16, None),
    "bart": (lambda: transformers.BartConfig(vocab_size=64, d_model=64, encoder_layers=1, decoder_layers=1,
                                             encoder_attention_heads=2, decoder_attention_heads=2,
                                             encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                                             **TOKENS), torch.float32, None),
}

# every scheme and option of PTQ: (case name, quantize options); w4a8 and w4a4 name their head's bits, whose
# default (INT4, GPTQ-rounded) needs torch
ALL_CASES = [
    ("w8a8", ["--scheme", "w8a8"]),
    ("w8a8-asym", ["--scheme", "w8a8", "--asym"]),
    ("w4a8", ["--scheme", "w4a8", "--head-bits", "8"]),
    ("w4a8-fp32-scales-wasym", ["--scheme", "w4a8", "--head-bits", "8", "--scale-dtype", "fp32", "--w-asym"]),
    ("w4-8a8", ["--scheme", "w4/8a8"]),
    ("w4a4-asym-kblock16", ["--scheme", "w4a4", "--head-bits", "8", "--asym", "--kblock", "16"]),
    ("w8a16-fp16-scales", ["--scheme", "w8a16", "--scale-dtype", "fp16"]),
    ("w4a16-wasym", ["--scheme", "w4a16", "--w-asym"]),
    ("w8a8-head-group", ["--scheme", "w8a8", "--parts", "qkv,fc1,head", "--group", "4"]),
    ("w4a8-head4-kblock16", ["--scheme", "w4a8", "--parts", "qkv,attn_out,fc1,fc2,head", "--head-bits", "4",
                             "--kblock", "16", "--head-rounding", "nearest"]),
    ("w8a8-per-tensor", ["--scheme", "w8a8", "--per-tensor"]),
    ("w4a8-rotate16", ["--scheme", "w4a8", "--head-bits", "8", "--rotate", "16"]),
    ("bf16", ["--scheme", "bf16"]),  # bf16 storage of every float tensor
    ("fp32", ["--scheme", "fp32"]),
]
SOME_CASES = [c for c in ALL_CASES if c[0] in ("w8a8", "w4a8-head4-kblock16", "w4a16-wasym", "bf16")]
FULL = ("gpt2", "llama", "phi3")  # every case; the other families a few


def _cases(model):
    cases = ALL_CASES if model in FULL else SOME_CASES
    if model == "bert":  # an encoder has no LM head
        cases = [(n, o) for n, o in cases if "head" not in o]
    if model == "bart":
        cases = cases + [("w8a8-encoder-w4a4", ["--scheme", "w8a8", "--encoder-scheme", "w4a4"])]
    return cases


def _tokenizer(folder, vocab_size):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("no-torch-models")
    out = {}
    for name, (make, dtype, shard) in MODELS.items():
        torch.manual_seed(0)
        cfg = make()
        if name == "bert":
            model = transformers.BertModel(cfg)
        elif name == "bart":
            model = transformers.BartForConditionalGeneration(cfg)
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:  # norms at identity and zero biases would hide a mishandled one
                    p.add_(0.1 * torch.randn_like(p))
        folder = root / name
        model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        if name in ("gpt2", "llama"):
            _tokenizer(folder, cfg.vocab_size)
        out[name] = folder
    assert any(f.name.endswith(".index.json") for f in out["phi3"].iterdir()), "phi3 should be sharded"
    return out


# Runs in a fresh interpreter where torch and transformers cannot be imported: quantizes every job and
# runs the follow-up commands, then prints one RESULT line with every return code.
_DRIVER = r"""
import contextlib, io, json, sys
for name in ("torch", "transformers"):
    sys.modules[name] = None  # import torch -> ModuleNotFoundError, as when it is not installed
from finequant.cli import main
jobs = json.loads(sys.argv[1])
codes = []
for argv in jobs:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    codes.append([rc, out.getvalue(), err.getvalue()])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m] is not None)
print("RESULT " + json.dumps({"codes": codes, "leaked": leaked}))
"""


def _without_torch(jobs):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(finequant.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["leaked"] == [], f"torch modules were imported: {result['leaked']}"
    return result["codes"]


def _quantize(src, out, opts, smooth=False, quiet=True):
    return (["quantize", str(src), "-o", str(out)] + (["--quiet"] if quiet else []) + opts
            + ([] if smooth else ["--no-smooth"]))


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """Both paths' outputs: (root without torch, root with torch, codes of the extra jobs without torch)."""
    nt, wt = tmp_path_factory.mktemp("without-torch"), tmp_path_factory.mktemp("with-torch")
    jobs = [_quantize(src, nt / m / case, opts) for m, src in models.items() for case, opts in _cases(m)]
    # the default recipe (smoothing on) without torch: quantizes as --no-smooth does, with a note
    defaults = [(m, case, opts) for m in ("gpt2", "llama", "bert") for case, opts in _cases(m)
                if case in ("w8a8", "w4a8-head4-kblock16", "w4a16-wasym")]
    jobs += [_quantize(models[m], nt / m / (case + "-default"), opts, smooth=True, quiet=False)
             for m, case, opts in defaults]
    text = nt / "text.txt"
    text.write_text(" ".join(f"w{i % 60 + 3}" for i in range(200)))
    extra = {
        "lkd": _quantize(models["llama"], nt / "lkd", ["--lkd"], smooth=True),
        "distill": _quantize(models["bert"], nt / "distill", ["--distill"], smooth=True),
        "smooth_alpha": _quantize(models["llama"], nt / "alpha", ["--smooth-alpha", "0.5"], smooth=True),
        "head4": _quantize(models["llama"], nt / "head4", ["--scheme", "w4a8", "--head-bits", "4"], quiet=False),
        "head_default": _quantize(models["llama"], nt / "head-default", ["--scheme", "w4a8"], quiet=False),
        "head4_gptq": _quantize(models["llama"], nt / "head4-gptq", ["--scheme", "w4a8", "--head-bits", "4",
                                                                    "--head-rounding", "gptq"]),
        "info": ["info", str(nt / "llama" / "w4a8")],
        "run": ["run", str(nt / "gpt2" / "w8a8"), "--prompt", "w5 w6 w7", "--max-tokens", "4", "--threads", "1"],
        "ppl": ["ppl", str(nt / "llama" / "w4a8"), str(text), "--ctx", "32", "--threads", "1"],
        "run_hf_folder": ["run", str(models["gpt2"]), "--prompt", "w5 w6", "--max-tokens", "2", "--threads", "1"],
    }
    codes = _without_torch(jobs + list(extra.values()))
    for argv, (rc, _, err) in zip(jobs, codes):
        assert rc == 0, f"{' '.join(argv)} without torch: rc {rc}: {err}"
    notes = {(m, case): codes[len(jobs) - len(defaults) + i][2] for i, (m, case, _) in enumerate(defaults)}
    for m, src in models.items():
        for case, opts in _cases(m):
            assert main(_quantize(src, wt / m / case, opts)) == 0
    return nt, wt, dict(zip(extra, codes[len(jobs):])), notes


@pytest.mark.parametrize("model", sorted(MODELS))
def test_files_identical_with_and_without_torch(runs, model):
    nt, wt, _, _ = runs
    for case, _ in _cases(model):
        a = (nt / model / case / "model.safetensors").read_bytes()
        b = (wt / model / case / "model.safetensors").read_bytes()
        assert a == b, f"{model} {case}: the file written without torch differs"


def _tensors_and_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_default_recipe_without_torch_skips_smoothing_and_says_so(runs):
    nt, wt, _, notes = runs
    for (m, case), err in notes.items():
        got, got_meta = _tensors_and_metadata(nt / m / (case + "-default") / "model.safetensors")
        want, want_meta = _tensors_and_metadata(wt / m / case / "model.safetensors")
        if case == "w4a16-wasym":  # weight-only: nothing to smooth, nothing skipped
            assert "smoothing" not in got_meta and "smoothing" not in err
        else:
            assert json.loads(got_meta.pop("smoothing")) == {"skipped": "torch not installed"}
            assert f"note: outlier smoothing needs torch for its calibration pass ({TRAIN_EXTRA})" in err, err
        # the weights are those of --no-smooth with torch
        assert got_meta == want_meta and set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), f"{m} {case}"


def test_int4_head_without_torch_is_rounded_to_nearest_and_says_so(runs):
    """GPTQ rounding of an INT4 head (the default) needs torch: without it the head is rounded to nearest,
    with a note and a record; asked for by name, it is an error naming the extra; the scheme's default INT4
    head (w4a8) stays INT8."""
    nt, _, extra, _ = runs
    rc, _, err = extra["head4"]
    assert rc == 0 and "note: the INT4 LM head is rounded to nearest: GPTQ rounding is torch not installed" in err
    _, meta = _tensors_and_metadata(nt / "head4" / "model.safetensors")
    assert json.loads(meta["head_rounding"]) == {"skipped": "torch not installed"}
    rc, _, err = extra["head4_gptq"]
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.endswith(f"--head-rounding gptq: torch not installed ({TRAIN_EXTRA})"), err
    assert not (nt / "head4-gptq").exists()
    # w4a8's default INT4 head stays INT8 instead, with a note
    rc, _, err = extra["head_default"]
    assert rc == 0 and f"note: the default INT4 LM head needs torch for its GPTQ rounding ({TRAIN_EXTRA})" in err
    _, meta = _tensors_and_metadata(nt / "head-default" / "model.safetensors")
    assert json.loads(meta["quantization"])["lm_head"]["weight_bits"] == 8 and "head_rounding" not in meta


def test_training_options_need_torch_in_one_line(runs):
    _, _, extra, _ = runs
    for job, flag in (("lkd", "--lkd"), ("distill", "--distill"), ("smooth_alpha", "--smooth-alpha")):
        rc, _, err = extra[job]
        lines = err.strip().splitlines()
        assert rc == 2 and lines[-1].startswith(f"finequant: error: {flag}") and lines[-1].endswith(TRAIN_EXTRA), err
        assert "Traceback" not in err


def test_info_run_ppl_without_torch(runs):
    _, _, extra, _ = runs
    for job in ("info", "run", "ppl", "run_hf_folder"):
        assert extra[job][0] == 0, f"{job} without torch: {extra[job][2]}"
    info = extra["info"][1]
    assert "architecture:  llama" in info and "w4 sym tile 1x32" in info
    assert len(extra["run"][1].strip()) > 0
    ppl = float(re.search(r"perplexity: ([0-9.]+)", extra["ppl"][1]).group(1))
    assert np.isfinite(ppl) and 1 < ppl < 1e4


# ---- the torch reference: the quantization math as torch computed it before PTQ moved to NumPy ---------

def _torch_reference(x, bits, symmetric, tile, half_scales):
    """(q, scale, zero_point) of x [R, C] in torch ops (DESIGN.md section 2)."""
    import torch.nn.functional as F

    r, c = x.shape
    rows, cols = tile
    nb = -(-c // cols)
    t = F.pad(x, (0, nb * cols - c)).reshape(r // rows, rows, nb, cols)

    def expand(s):
        return s.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:, :c]

    def half(s):
        h = s.to(torch.float16).to(torch.float32)
        return torch.where(h == 0, torch.full_like(h, 2.0 ** -24), h) if half_scales else s

    qmax = (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1
    if symmetric:
        s = t.abs().amax(dim=(1, 3)) / qmax
        s[s == 0] = 1.0
        s = half(s)
        return torch.clamp(torch.round(x / expand(s)), -qmax, qmax).to(torch.int8), s, None
    lo = torch.clamp(t.amin(dim=(1, 3)), max=0.0)
    hi = torch.clamp(t.amax(dim=(1, 3)), min=0.0)
    s = (hi - lo) / qmax
    s[s == 0] = 1.0
    s = half(s)
    z = torch.clamp(torch.round(-lo / s), 0, qmax)
    q = torch.clamp(torch.round(x / expand(s)) + expand(z), 0, qmax).to(torch.uint8)
    return q, s, z.to(torch.uint8)


def _source_weights(folder):
    """The checkpoint's tensors read by safetensors' torch loader, as fp32 (shards merged)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.to(torch.float32) for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("model,case", [("gpt2", "w8a8"), ("gpt2", "w4a8-fp32-scales-wasym"),
                                        ("llama", "w4a8-head4-kblock16"), ("llama", "w8a8-head-group"),
                                        ("phi3", "w4a4-asym-kblock16"), ("gemma2", "w4a16-wasym")])
def test_weights_match_the_torch_reference(runs, models, model, case):
    nt, _, _, _ = runs
    tensors, meta = _tensors_and_metadata(nt / model / case / "model.safetensors")
    src = _source_weights(models[model])
    quant = json.loads(meta["quantization"])
    checked = 0
    for module, entry in quant.items():
        if not entry["weight_bits"]:
            continue
        name = ("transformer." if model == "gpt2" else "") + module + ".weight"
        conv1d = model == "gpt2"  # Conv1D stores [in, out]
        if module == "lm_head" and name not in src:  # tied: the embedding, [vocab, hidden] as the head's
            name, conv1d = ("transformer.wte.weight" if model == "gpt2" else "model.embed_tokens.weight"), False
        w = src[name]
        if conv1d:
            w = w.t().contiguous()
        if entry.get("rotation"):  # a rotated Linear stores W H
            from finequant.rotate import rotate_weight

            w = rotate_weight(w, entry["rotation"])
        bits, sym = entry["weight_bits"], entry["weight_symmetric"]
        q, s, z = _torch_reference(w, bits, sym, tuple(entry["tile"]), entry.get("scale_dtype") == "fp16")
        stored = tensors[module + ".weight"].numpy()
        if bits == 4:
            stored = unpack_int4(stored, sym)
        np.testing.assert_array_equal(stored, q.numpy(), err_msg=f"{model} {case} {module}")
        assert torch.equal(tensors[module + ".weight_scale"], s), f"{model} {case} {module} scales"
        if z is not None:
            assert torch.equal(tensors[module + ".weight_zero_point"], z)
        checked += 1
    assert checked >= 4
