"""Per-shape strategy (docs/DESIGN.md section 12): `finequant tune` writes strategy.json, the engine
reads it and runs each part's integer GEMM or its weight-only alternative per call by M."""
import json
import shutil
import struct

import numpy as np
import pytest

from finequant import ModelFileError, _core
from finequant.cli import main
from finequant.engine import Engine
from finequant.tune import BUCKETS, STRATEGY_FILE, machine, read_table, tune, write_table


@pytest.fixture(scope="module")
def w8a8(tiny_models, tmp_path_factory):
    """tiny Llama quantized w8a8 (q/k/v and gate/up merged in the engine)."""
    out = tmp_path_factory.mktemp("tune") / "llama-w8a8"
    assert main(["quantize", str(tiny_models["llama"]), "-o", str(out), "--scheme", "w8a8", "--quiet",
                 "--no-smooth"]) == 0
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _weight_only_parts(src, dst, parts):
    """A copy of model `src` whose Linears of `parts` keep their stored integers with float activations
    (the file's W8A16 form of the same weights): the reference for a part run weight-only."""
    _copy(src, dst)
    path = dst / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    quant = json.loads(header["__metadata__"]["quantization"])
    changed = 0
    for module, q in quant.items():
        if q["part"] in parts and q.get("act_bits"):
            q["act_bits"] = 0
            changed += 1
    assert changed > 0
    header["__metadata__"]["quantization"] = json.dumps(quant)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return dst


def _ids(engine, batch, seq):
    return np.random.default_rng(3).integers(0, engine.vocab_size, (batch, seq))


def _forced(folder, parts, precision="fp32", buckets=None):
    """A table on this machine sending `parts` to `precision` in `buckets` (default: all)."""
    buckets = range(len(BUCKETS)) if buckets is None else buckets
    choice = [precision if b in buckets else "int" for b in range(len(BUCKETS))]
    return write_table(str(folder / STRATEGY_FILE), {p: {"choice": choice} for p in parts}, threads=1)


@pytest.mark.parametrize("part", ["qkv", "fc1", "fc2"])
def test_forced_part_matches_weight_only_model(w8a8, tmp_path, part):
    model = _copy(w8a8, tmp_path / "m")
    _forced(model, [part])
    tuned = Engine(str(model), threads=1)
    assert tuned.strategy_note == ""
    assert f"{part}: M 1 fp32" in tuned.strategy and tuned.strategy_memory > 0
    ref = Engine(str(_weight_only_parts(w8a8, tmp_path / "ref", {part})), threads=1, strategy="off")
    plain = Engine(str(w8a8), threads=1, strategy="off")
    for batch, seq in ((1, 1), (2, 12)):  # decode-sized and prefill-sized calls, both in forced buckets
        ids = _ids(tuned, batch, seq)
        y = tuned.forward(ids)
        np.testing.assert_allclose(y, ref.forward(ids), rtol=0, atol=1e-5 * np.abs(y).max())
        # the other parts stay integer: the weight-only part alone moves the output off the integer path
        assert np.abs(y - plain.forward(ids)).max() > 1e-6 * np.abs(y).max()


def test_bucket_selects_per_call(w8a8, tmp_path):
    """fc1 weight-only in the M 9-64 bucket only: a 12-row call takes it, a 1-row call stays integer."""
    model = _copy(w8a8, tmp_path / "m")
    _forced(model, ["fc1"], buckets=[2])
    tuned = Engine(str(model), threads=1)
    ref = Engine(str(_weight_only_parts(w8a8, tmp_path / "ref", {"fc1"})), threads=1, strategy="off")
    plain = Engine(str(w8a8), threads=1, strategy="off")
    one, twelve = _ids(tuned, 1, 1), _ids(tuned, 1, 12)
    np.testing.assert_array_equal(tuned.forward(one), plain.forward(one))
    y = tuned.forward(twelve)
    np.testing.assert_allclose(y, ref.forward(twelve), rtol=0, atol=1e-5 * np.abs(y).max())
    # "off" ignores the table; an explicit path uses it
    np.testing.assert_array_equal(Engine(str(model), threads=1, strategy="off").forward(twelve), plain.forward(twelve))
    np.testing.assert_array_equal(
        Engine(str(w8a8), threads=1, strategy=str(model / STRATEGY_FILE)).forward(twelve), y)


def test_table_from_another_cpu_is_ignored(w8a8, tmp_path):
    model = _copy(w8a8, tmp_path / "m")
    table = _forced(model, ["qkv", "fc1"])
    table["cpu"] = "Some Other CPU"
    (model / STRATEGY_FILE).write_text(json.dumps(table))
    e = Engine(str(model), threads=1)
    assert e.strategy == "" and e.strategy_memory == 0
    assert "ignored" in e.strategy_note and "Some Other CPU" in e.strategy_note
    ids = _ids(e, 2, 5)
    np.testing.assert_array_equal(e.forward(ids), Engine(str(w8a8), threads=1, strategy="off").forward(ids))


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "'format'"),
    ('{"format": "finequant-strategy", "version": 1, "cpu": "C", "backend": "B", "buckets": [[1, 1], [3, null]],'
     ' "parts": {}}', "bucket 1"),
    ("MACHINE", "'int', 'fp32' or 'bf16'"),
    ("MIXED", "mixes fp32 and bf16"),
    ("PART", "unknown part 'mlp'"),
])
def test_corrupt_table_is_a_clear_error(w8a8, tmp_path, text, message):
    model = _copy(w8a8, tmp_path / "m")
    cpu, backend = machine()
    base = {"format": "finequant-strategy", "version": 1, "cpu": cpu, "backend": backend,
            "buckets": [list(b) for b in BUCKETS]}
    if text == "MACHINE":
        text = json.dumps(dict(base, parts={"fc1": {"choice": ["int", "fp16", "int", "int"]}}))
    elif text == "MIXED":
        text = json.dumps(dict(base, parts={"fc1": {"choice": ["fp32", "bf16", "int", "int"]}}))
    elif text == "PART":
        text = json.dumps(dict(base, parts={"mlp": {"choice": ["int"] * 4}}))
    (model / STRATEGY_FILE).write_text(text)
    with pytest.raises(ModelFileError, match="strategy table .*" + message.replace("(", r"\(")):
        Engine(str(model), threads=1)
    Engine(str(model), threads=1, strategy="off")  # the way out the message names
    with pytest.raises(ValueError, match="cannot be opened"):
        Engine(str(w8a8), threads=1, strategy=str(tmp_path / "missing.json"))


def test_tune_writes_a_table_the_engine_and_info_read(w8a8, tmp_path, capsys):
    model = _copy(w8a8, tmp_path / "m")
    table = tune(str(model), threads=1, rounds=1, log=None)
    assert read_table(str(model / STRATEGY_FILE)) == json.loads((model / STRATEGY_FILE).read_text())
    assert (table["cpu"], table["backend"]) == machine()
    assert set(table["parts"]) == {"qkv", "attn_out", "fc1", "fc2", "head"}  # w8a8's default INT8 head too
    for part, e in table["parts"].items():
        assert len(e["choice"]) == len(BUCKETS) and set(e["choice"]) <= {"int", "fp32", "bf16"}
        assert e["seconds"]["int"]["1"] > 0 and e["seconds"]["fp32"]["512"] > 0
        assert 0 < e["accuracy"]["max_rel_output_diff"] < 0.5  # weight-only moves the output, a little
    e = Engine(str(model), threads=1)
    assert e.strategy_note == "" and "qkv: M 1 " in e.strategy
    ids = _ids(e, 2, 6)
    assert np.isfinite(e.forward(ids)).all()
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert "strategy:      measured on" in out and "  fc2 " in out and "max rel output diff" in out
    assert main(["info", str(w8a8)]) == 0
    assert "strategy:      none" in capsys.readouterr().out


def test_linear_precision_argument():
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    y = _core.Linear(w, precision="bf16").forward(x)
    np.testing.assert_allclose(y, x @ w.T, rtol=0, atol=0.05 * np.abs(x @ w.T).max())
    with pytest.raises(ValueError, match="precision"):
        _core.Linear(w, precision="fp16")
