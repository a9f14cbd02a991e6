"""Quantization-aware distillation of whole encoders (finequant.distill, `quantize --distill`)."""
import json

import numpy as np
import pytest
import torch

from finequant import Engine, distill, hf
from finequant.cli import main
from finequant.distill import DistillOptions
from finequant.modelfile import load_info, quantize_model, save
from finequant.schemes import parse_scheme
from finequant.simulate import read_records, simulate

FAST = dict(steps=6, batch=4, seq=12, lr=1e-4, progress=False)


def _distill(folder, scheme="w4a4", scheme_kw=None, **kw):
    model = hf.load(str(folder))
    torch_model, stats = distill.apply(model, parse_scheme(scheme, **(scheme_kw or {})),
                                       DistillOptions(**{**FAST, **kw}))
    return model, torch_model, stats


def test_distillation_beats_ptq_on_held_out_batches(tiny_models):
    model, _, stats = _distill(tiny_models["bert"], steps=30)
    assert not stats["kept_ptq"]
    assert stats["loss_trained"] < stats["loss_ptq"]
    assert stats["cosine_trained"] > stats["cosine_ptq"]


def test_only_encoder_weights_change(tiny_models):
    before = hf.load(str(tiny_models["bert"])).tensors
    after = _distill(tiny_models["bert"])[0].tensors
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert not any("embeddings" in n for n in changed)  # the engine keeps them fp32: frozen
    assert any(n.endswith("attention.self.query.weight") for n in changed)
    assert any("LayerNorm" in n for n in changed)  # norms train too


def test_training_that_does_not_beat_ptq_keeps_the_original_weights(tiny_models, monkeypatch):
    monkeypatch.setattr(distill, "_train_step", lambda student, *a: _scramble(student))
    before = hf.load(str(tiny_models["bert"])).tensors
    model, _, stats = _distill(tiny_models["bert"])
    assert stats["kept_ptq"] and stats["loss_trained"] > stats["loss_ptq"]
    assert all(torch.equal(before[n], model.tensors[n]) for n in before)


def _scramble(student):
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, distill.LKDLinear):
                m.weight.mul_(1.5)
    return 1.0, 0.0


def test_deterministic_with_a_seed(tiny_models):
    a = _distill(tiny_models["bert"], seed=5)[0].tensors
    b = _distill(tiny_models["bert"], seed=5)[0].tensors
    c = _distill(tiny_models["bert"], seed=6)[0].tensors
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("stop_at", [1, 3, 4])
def test_resume_after_interrupt_gives_the_same_result(stop_at, tiny_models, tmp_path, monkeypatch):
    ref = _distill(tiny_models["bert"], learn_clip=True)[0].tensors
    step = distill._train_step
    calls = []

    def interrupted(*args):
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append(1)
        return step(*args)

    ck = tmp_path / "ck"
    monkeypatch.setattr(distill, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _distill(tiny_models["bert"], learn_clip=True, checkpoint=str(ck), checkpoint_every=2)
    saved = torch.load(ck / "distill.pt", weights_only=True)["step"] if (ck / "distill.pt").exists() else 0
    assert saved == stop_at // 2 * 2  # the last whole checkpoint interval

    resumed = []
    monkeypatch.setattr(distill, "_train_step", lambda *a: resumed.append(1) or step(*a))
    got, _, stats = _distill(tiny_models["bert"], learn_clip=True, checkpoint=str(ck), checkpoint_every=2)
    assert len(resumed) == FAST["steps"] - saved and stats["resumed_at"] == saved
    assert all(torch.equal(ref[n], got.tensors[n]) for n in ref)

    with pytest.raises(ValueError, match="another model, scheme or options"):
        _distill(tiny_models["bert"], learn_clip=True, checkpoint=str(ck), steps=3)


@pytest.mark.parametrize("scheme,kw", [("w4a4", {"act_symmetric": False}), ("w4a8", {})], ids=["w4a4-asym", "w4a8"])
def test_distilled_file_runs_in_engine_like_its_simulation(scheme, kw, tiny_models, tmp_path):
    model, torch_model, _ = _distill(tiny_models["bert"], scheme, scheme_kw=kw, learn_clip=True)
    tensors, metadata = quantize_model(model, parse_scheme(scheme, **kw))
    out = save(str(tmp_path / "q"), tensors, metadata)
    ids = np.random.RandomState(0).randint(0, 64, size=(4, 20)).astype(np.int64)
    got = Engine(out).forward(ids)
    simulate(torch_model, read_records(out))
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids)).last_hidden_state.numpy()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 1e-2, f"{scheme}: relative error {err:.3g}"


def test_text_data(tiny_models, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 59}" for i in range(400)))
    batches = distill._Batches(DistillOptions(data=str(text), batch=4, seq=16), str(tiny_models["bert"]), 64, 0)
    x = batches()
    assert x.shape == (4, 16) and (x[:, 0] == 2).all() and (x[:, -1] == 3).all()  # [CLS] ... [SEP]
    assert x[:, 1:-1].min() >= 5  # words, not special tokens
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    with pytest.raises(ValueError, match="at least batch x seq"):
        distill._Batches(DistillOptions(data=str(short), batch=4, seq=16), str(tiny_models["bert"]), 64, 0)
    _, _, stats = _distill(tiny_models["bert"], data=str(text), steps=20)
    assert stats["loss_trained"] < stats["loss_ptq"]


def test_cli_quantize_with_distill(tiny_models, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_models["bert"]), "-o", str(out), "--scheme", "w4a4", "--quiet", "--distill",
                 "--distill-steps", "5", "--distill-batch", "2", "--distill-seq", "8", "--distill-lr", "1e-4",
                 "--distill-clip", "--seed", "1", "--distill-checkpoint", str(tmp_path / "ck")]) == 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["distill.json", "distill.pt"]
    info = load_info(str(out))
    assert info["distillation"]["steps"] == 5 and info["distillation"]["learn_clip"] is True
    plain = tmp_path / "plain"
    assert main(["quantize", str(tiny_models["bert"]), "-o", str(plain), "--scheme", "w4a4", "--quiet"]) == 0
    assert load_info(str(plain))["distillation"] is None
    unclipped = tmp_path / "unclipped"  # clips are on by default; --no-distill-clip turns them off
    assert main(["quantize", str(tiny_models["bert"]), "-o", str(unclipped), "--scheme", "w4a4", "--quiet",
                 "--distill", "--distill-steps", "2", "--distill-batch", "2", "--distill-seq", "8",
                 "--no-distill-clip"]) == 0
    assert load_info(str(unclipped))["distillation"]["learn_clip"] is False
    ids = np.arange(12, dtype=np.int64)[None] + 5
    a, b = Engine(str(out)).forward(ids), Engine(str(plain)).forward(ids)
    assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.parametrize("family,args,message", [
    ("bert", ["--distill-steps", "3"], "--distill-steps only apply with --distill"),
    ("bert", ["--no-distill-clip"], "--distill-clip only apply with --distill"),
    ("bert", ["--distill", "--lkd"], "choose one"),
    ("bert", ["--distill", "--scheme", "fp32"], "--distill needs a quantized scheme"),
    ("bert", ["--distill", "--distill-data", "missing.txt"], "'random' or a text file"),
    ("bert", ["--distill", "--distill-seq", "1000"], "exceeds the model's 32 positions"),
    ("bert", ["--distill", "--distill-seq", "2"], "sequence length must be an integer >= 3"),
    ("gpt2", ["--distill"], "--distill trains encoders (bert), not gpt2; use --lkd for decoders"),
    ("llama", ["--distill", "--scheme", "w4a4"], "not llama"),
])
def test_cli_bad_distill_options(family, args, message, tiny_models, tmp_path, capsys):
    assert main(["quantize", str(tiny_models[family]), "-o", str(tmp_path / "q"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finequant: error:") and message in err, err
    assert not (tmp_path / "q").exists()
