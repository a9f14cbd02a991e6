"""`finequant quantize` / `finequant info` end to end on tiny random models."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from finequant import _core, hf
from finequant.cli import main
from finequant.pack import unpack_int4
from finequant.quantize import fake_quant_weight
from finequant.schemes import default_parts, parse_scheme

CASES = [
    ("fp32", []),
    ("bf16", []),
    ("w8a8", []),
    ("w8a8", ["--asym"]),
    ("w8a8", ["--sym"]),
    ("w8a8", ["--w-asym", "--a-sym"]),
    ("w8a16", ["--w-asym", "--group", "2"]),
    ("w4a8", ["--kblock", "16", "--head-bits", "8"]),  # (its default INT4 head is GPTQ-rounded: test_lkd.py)
    ("w4/8a8", ["--a-asym"]),
    ("w4a4", ["--per-channel", "--parts", "fc1,fc2"]),
    ("w8a8", ["--per-tensor", "--parts", "qkv"]),
]


def _scheme_from_args(name, opts, family):
    grouping = None
    if "--group" in opts:
        grouping = ("rows", int(opts[opts.index("--group") + 1]))
    if "--kblock" in opts:
        grouping = ("kblock", int(opts[opts.index("--kblock") + 1]))
    if "--per-channel" in opts:
        grouping = "channel"
    if "--per-tensor" in opts:
        grouping = "tensor"
    parts = opts[opts.index("--parts") + 1] if "--parts" in opts else None
    if parts is None:  # the CLI's: an INT8 LM head with integer activations
        parts = default_parts(name, family)
    scheme = parse_scheme(name, weight_symmetric=not ({"--asym", "--w-asym"} & set(opts)),
                          act_symmetric=bool({"--sym", "--a-sym"} & set(opts)),  # the CLI's default: asymmetric
                          grouping=grouping, parts=parts)
    if "--scale-dtype" in opts:
        return replace(scheme, scale_dtype=opts[opts.index("--scale-dtype") + 1])
    return replace(scheme, scale_dtype="fp16") if scheme.has_int4_weights else scheme  # the CLI's default


def _rec(rec, key):
    return rec[key] if isinstance(rec, dict) else getattr(rec, key)


def _dequantize_stored(f, module, entry):
    q = f.get_tensor(module + ".weight").numpy()
    if entry["weight_bits"] == 4:
        q = unpack_int4(q, entry["weight_symmetric"])
    s = f.get_tensor(module + ".weight_scale").numpy()
    rows, cols = entry["tile"]
    n, k = q.shape
    srep = np.repeat(np.repeat(s, rows, 0), cols, 1)[:, :k]
    qf = q.astype(np.float32)
    if not entry["weight_symmetric"]:
        z = f.get_tensor(module + ".weight_zero_point").numpy()
        assert z.dtype == np.uint8 and z.shape == s.shape
        qf = qf - np.repeat(np.repeat(z, rows, 0), cols, 1)[:, :k].astype(np.float32)
    return qf * srep


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("name,opts", CASES, ids=[" ".join([n] + o) for n, o in CASES])
def test_quantize_roundtrip(tiny_models, tmp_path, family, name, opts):
    src = tiny_models[family]
    out = tmp_path / "out"
    # --no-smooth, --no-rotate: the stored weights must be the fake-quantized source weights (smoothing:
    # test_smooth.py; rotation: test_rotate.py)
    assert main(["quantize", str(src), "-o", str(out), "--scheme", name, "--quiet", "--no-smooth", "--no-rotate"]
                + opts) == 0
    path = out / "model.safetensors"
    scheme = _scheme_from_args(name, opts, family)
    model = hf.load(src)
    parts = hf.linear_parts(family, model.num_layers)
    weights = {module: model.tensors[module + ".weight"] for module in parts}
    if "head" in scheme.parts and family != "bert":  # its own quantized tensor, also when tied
        parts["lm_head"] = "head"
        weights["lm_head"] = model.tensors.get("lm_head.weight", model.tensors.get(hf.embedding_name(family)))

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "finequant" and meta["format_version"] == "1"
        assert meta["architecture"] == family
        assert json.loads(meta["config"]) == model.config
        assert meta["scheme"] == scheme.describe()
        quant = json.loads(meta["quantization"])
        assert set(quant) == set(parts)
        for module, part in parts.items():
            entry = quant[module]
            w = weights[module]
            lq = scheme.for_linear(part, *w.shape)
            assert entry == lq.to_json()
            stored = f.get_tensor(module + ".weight")
            if not lq.weight_bits:
                want = torch.bfloat16 if name == "bf16" else torch.float32
                assert stored.dtype == want and torch.equal(stored, w.to(want))
                assert module + ".weight_scale" not in f.keys()
                continue
            want = torch.int8 if lq.weight_symmetric and lq.weight_bits == 8 else torch.uint8
            assert stored.dtype == want
            assert stored.shape[1] == (w.shape[1] // 2 if lq.weight_bits == 4 else w.shape[1])
            ref = fake_quant_weight(w, lq.weight_bits, lq.weight_symmetric, lq.tile, lq.half_scales).numpy()
            np.testing.assert_array_equal(_dequantize_stored(f, module, entry), ref)
            assert (module + ".weight_zero_point" in f.keys()) == (not lq.weight_symmetric)
        # every non-Linear tensor is carried over unchanged
        for tname, t in model.tensors.items():
            if tname.endswith(".weight") and tname[:-7] in parts:
                continue
            stored = f.get_tensor(tname)
            if tname.endswith(".bias") and tname[:-5] in parts:
                assert stored.dtype == torch.float32, tname  # Linear biases stay F32
            assert torch.equal(stored.float(), t.to(stored.dtype).float()), tname

    info = _core.open_model_file(str(path))
    assert info["architecture"] == family
    assert set(info["linears"]) == set(parts)
    for module, rec in info["linears"].items():
        assert _rec(rec, "weight_bits") == quant[module]["weight_bits"]
        assert _rec(rec, "part") == quant[module]["part"]
    if family == "bert":
        assert (out / "vocab.txt").read_text() == (src / "vocab.txt").read_text()


@pytest.mark.parametrize("scheme,opts,head_bits,head_rotation", [
    ("w4a8", [], 4, 64), ("w4/8a8", [], 8, 64), ("w4a4", [], 4, 64), ("w8a8", [], 8, 64), ("w4a16", [], None, 0),
    ("w8a8", ["--no-rotate"], 8, 0), ("w4a8", ["--parts", "qkv,attn_out,fc1,fc2"], None, 0),
    ("w4a8", ["--head-bits", "8"], 8, 64), ("w8a8", ["--head-bits", "4"], 4, 64),
    ("w4a8", ["--head-bits", "4", "--no-rotate"], 4, 0)])
def test_lm_head_quantized_by_default_with_integer_activations(tiny_models, tmp_path, capsys, scheme, opts,
                                                               head_bits, head_rotation):
    """Schemes with integer activations quantize a decoder's LM head (INT4 for w4a8 and w4a4, else INT8, unless
    --head-bits says otherwise; its input rotated unless --no-rotate) unless --parts leaves it out; weight-only
    schemes keep it floating point."""
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_models["llama"]), "-o", str(out), "--scheme", scheme, "--quiet",
                 "--no-smooth", *opts]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        quant = json.loads(f.metadata()["quantization"])
    assert (quant["lm_head"]["weight_bits"] if "lm_head" in quant else None) == head_bits
    assert (quant["lm_head"].get("rotation", 0) if "lm_head" in quant else 0) == head_rotation
    if scheme == "w4a8" and not opts:  # an encoder's scheme does not name a head it does not have
        assert main(["quantize", str(tiny_models["bert"]), "-o", str(tmp_path / "bert"), "--scheme", scheme,
                     "--quiet", "--no-smooth"]) == 0
        with safe_open(tmp_path / "bert" / "model.safetensors", "pt") as f:
            assert "head" not in f.metadata()["scheme"]
    if opts[:2] == ["--head-bits", "4"]:  # ... nor takes head options for it
        capsys.readouterr()
        assert main(["quantize", str(tiny_models["bert"]), "-o", str(tmp_path / "bert4"), "--scheme", scheme,
                     "--quiet", "--no-smooth", *opts]) == 2
        assert "is an encoder (bert) and has no LM head" in capsys.readouterr().err
        assert not (tmp_path / "bert4").exists()


def test_int4_head_is_rounded_by_gptq_unless_told_otherwise(tiny_models, tmp_path, capsys):
    """--head-bits 4 rounds the head by GPTQ on own samples and records it; --head-rounding nearest is plain
    PTQ; only the head differs between the two files; the option without an INT4 head is an error."""
    src = str(tiny_models["llama"])
    files = {}
    for rounding in ("gptq", "nearest"):
        out = tmp_path / rounding
        assert main(["quantize", src, "-o", str(out), "--scheme", "w4a8", "--head-bits", "4", "--quiet",
                     "--no-smooth", *([] if rounding == "gptq" else ["--head-rounding", "nearest"])]) == 0
        with safe_open(out / "model.safetensors", "np") as f:
            files[rounding] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    (gptq, gptq_meta), (nearest, nearest_meta) = files["gptq"], files["nearest"]
    assert json.loads(gptq_meta["head_rounding"])["method"] == "gptq" and "head_rounding" not in nearest_meta
    assert json.loads(gptq_meta["quantization"])["lm_head"]["tile"] == [1, 16]
    assert set(gptq) == set(nearest)
    changed = {k for k in gptq if not np.array_equal(gptq[k], nearest[k])}
    assert "lm_head.weight" in changed and changed <= {"lm_head.weight", "lm_head.weight_scale"}, changed
    capsys.readouterr()
    for opts in (["--scheme", "w4/8a8"], ["--scheme", "w4a8", "--head-bits", "8"]):  # INT8 heads
        assert main(["quantize", src, "-o", str(tmp_path / "no"), *opts, "--quiet", "--no-smooth",
                     "--head-rounding", "nearest"]) == 2
        assert "--head-rounding applies to an INT4 LM head (--head-bits 4)" in capsys.readouterr().err
        assert not (tmp_path / "no").exists()


def test_info(tiny_models, tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["quantize", str(tiny_models["llama"]), "-o", str(out), "--scheme", "w4/8a8",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "architecture:  llama" in text and "layers:        2" in text
    assert "w4/8a8" in text and "compression:" in text and "x vs fp32" in text
    assert "smoothing:     alpha 0.7 on qkv, fc1, attn_out, fc2 (random ids" in text
    assert "fc1       x4    w4 sym tile 1x32, a8 asym" in text
    ratio = float(text.split("compression:")[1].split("x")[0])
    assert ratio > 1.0
    fp = tmp_path / "fp"
    assert main(["quantize", str(tiny_models["llama"]), "-o", str(fp), "--scheme", "fp32",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(fp)]) == 0
    assert "compression:   1.00x" in capsys.readouterr().out


def _run(*args):
    return subprocess.run([sys.executable, "-m", "finequant", *args], capture_output=True, text=True,
                          timeout=300)


def test_unsupported_model_type_clean_error(tmp_path):
    src = tmp_path / "t5"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "t5"}))
    r = _run("quantize", str(src), "-o", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "finequant: error: unsupported model_type 't5'" in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_source_clean_error(tiny_models, tmp_path, capsys):
    src = tmp_path / "corrupt"
    shutil.copytree(tiny_models["bert"], src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:100])
    assert main(["quantize", str(src), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finequant: error: cannot read") and "model.safetensors" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("opts,message", [
    (["--scheme", "w3a8"], "unknown scheme"),
    (["--group", "5"], "does not divide"),
    (["--kblock", "4096"], "kblock 4096 is larger"),
    (["--parts", "qkv,mlp"], "unknown part"),
    (["--asym", "--a-sym"], "--a-sym contradicts --asym"),
    (["--sym", "--a-asym"], "--a-asym contradicts --sym"),
    (["--smooth-alpha", "1.5"], "--smooth-alpha must be in [0, 1]"),
    (["--no-smooth", "--smooth-alpha", "0.5"], "contradicts --no-smooth"),
])
def test_bad_options_clean_error(tiny_models, tmp_path, capsys, opts, message):
    rc = main(["quantize", str(tiny_models["bert"]), "-o", str(tmp_path / "o"), "--quiet"] + opts)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("finequant: error:") and message in err


def test_info_errors(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "finequant: error:" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    assert main(["info", str(tmp_path)]) == 2
    assert "finequant: error:" in capsys.readouterr().err


def test_python_m_and_help():
    r = _run("--help")
    assert r.returncode == 0 and "quantize" in r.stdout
    r = _run("quantize", "--help")
    assert r.returncode == 0 and "--kblock" in r.stdout


def test_quantize_refuses_a_non_empty_output_unless_told(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(out), "--quiet"]) == 2
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()  # replaced as a whole
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(empty), "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["empty", "out"]  # no temporary directories left


def test_a_failed_quantize_leaves_nothing_and_keeps_the_previous_model(tiny_models, tmp_path, capsys, monkeypatch):
    import finequant.modelfile as modelfile

    out = tmp_path / "out"
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(out), "--quiet"]) == 0
    before = (out / "model.safetensors").read_bytes()

    def failing_save(out_dir, *args, **kw):  # dies after writing part of the model file
        (tmp_path / "seen").write_text(out_dir)
        with open(os.path.join(out_dir, "model.safetensors.tmp"), "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(modelfile, "save", failing_save)
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(out), "--quiet", "--overwrite",
                 "--scheme", "w4a8"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before  # the previous model is still there
    fresh = tmp_path / "fresh"
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(fresh), "--quiet"]) == 2
    assert not fresh.exists()
    assert sorted(os.listdir(tmp_path)) == ["out", "seen"]  # no partial directories


def test_quantize_removes_leftovers_of_killed_runs_only(tiny_models, tmp_path):
    """A run killed outright (SIGKILL) leaves its hidden staging directory; the next write to the same
    OUT removes those of writers that are gone and keeps a live writer's."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has exited (its staging directory is a leftover)
    dead = [tmp_path / f".out.partial-{gone.pid}-abc", tmp_path / f".out.old-{gone.pid}-def"]
    live = tmp_path / f".out.partial-{os.getpid()}-ghi"  # this process: a writer still running
    other = tmp_path / f".other.partial-{gone.pid}-jkl"  # another OUT's leftovers are not ours to clear
    for d in dead + [live, other]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert not any(d.exists() for d in dead)
    assert live.exists() and other.exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def _model_set_aside_by_a_killed_writer(tiny_models, tmp_path):
    """(OUT, its model file's bytes) after a writer that no longer runs moved OUT aside and died before
    moving its new one in: no OUT, the previous one in `.out.old-PID-*`."""
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(out), "--quiet"]) == 0
    before = (out / "model.safetensors").read_bytes()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    aside = tmp_path / f".out.old-{gone.pid}-xyz"
    aside.mkdir()
    out.rename(aside / "out")
    return out, before


def test_a_writer_killed_between_its_renames_gets_its_previous_model_back(tiny_models, tmp_path):
    """Killed after moving the previous OUT aside and before moving the new one in: the next write to OUT
    puts the previous model back first, so a failing write still leaves it in place."""
    import finequant.modelfile as modelfile

    out, before = _model_set_aside_by_a_killed_writer(tiny_models, tmp_path)

    def failing(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        modelfile.write_dir_atomically(str(out), failing)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_killed_writers_previous_model_is_back_before_the_overwrite_check(tiny_models, tmp_path, capsys):
    """The restored previous OUT is an existing model: quantize refuses to replace it without --overwrite."""
    out, before = _model_set_aside_by_a_killed_writer(tiny_models, tmp_path)
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(out), "--scheme", "w4a8", "--quiet"]) != 0
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
