"""LKD (finequant.lkd) on tiny random models: the straight-through fake quantization keeps the math
contract, distillation lowers the block output error, runs are deterministic and resumable, and an
LKD-written file runs in the engine like its torch simulation."""
import numpy as np
import pytest
import torch

from finequant import Engine, hf, lkd
from finequant.cli import main
from finequant.lkd import LKDLinear, LKDOptions, fake_quant_ste
from finequant.modelfile import quantize_model, save
from finequant.quantize import fake_quant_weight
from finequant.rotate import rotate_weight
from finequant.schemes import LinearQuant, parse_scheme
from finequant.simulate import read_records, simulate

FAST = dict(steps=12, batch=4, seq=16, samples=8, lr=3e-4, progress=False)


def _lkd(folder, scheme="w4a8", **kw):
    model = hf.load(str(folder))
    torch_model, stats = lkd.apply(model, parse_scheme(scheme, **kw.pop("scheme_kw", {})),
                                   LKDOptions(**{**FAST, **kw}))
    return model, torch_model, stats


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("tile", [(1, 16), (1, 40), (2, 40), (8, 40)])
def test_straight_through_forward_is_the_reference(bits, sym, tile):
    torch.manual_seed(0)
    w = torch.randn(8, 40) * 0.05  # 40 columns: kblock 16 leaves a partial last block
    w[0, :16] = 0  # an all-zero tile
    assert torch.equal(fake_quant_ste(w, bits, sym, tile), fake_quant_weight(w, bits, sym, tile))


@pytest.mark.parametrize("sym", [True, False])
def test_learned_clip_is_what_ptq_of_the_stored_weight_gives(sym):
    """The student's clipped fake-quant equals plain PTQ of the clamped weight that gets stored."""
    torch.manual_seed(1)
    spec = LinearQuant(part="fc1", weight_bits=4, weight_symmetric=sym, tile=(1, 16), act_bits=8)
    lin = LKDLinear(torch.randn(8, 40) * 0.05, None, spec, learn_clip=True)
    with torch.no_grad():
        lin.clip.uniform_(0.3, 1.0)
    got = lin.quantized_weight()
    assert torch.equal(got, fake_quant_weight(lin.baked_weight(), 4, sym, (1, 16)))
    got.sum().backward()  # gradients reach the weight and the clip factors
    assert lin.weight.grad.abs().sum() > 0 and lin.clip.grad.abs().sum() > 0


@pytest.mark.parametrize("bits,sym,tile,half", [(4, True, (1, 32), True), (4, False, (1, 32), False),
                                                  (4, True, (4, 64), False), (8, True, (1, 200), False),
                                                  (8, False, (2, 200), True)])
def test_gptq_rounding_is_on_the_grid_and_beats_plain_rounding(bits, sym, tile, half):
    """GPTQ's weights are what PTQ of them stores (same scales, same integers), and their output error on
    the inputs it saw is well under plain rounding's. K = 200 leaves a partial last K-block."""
    torch.manual_seed(0)
    n, k = 16, 200
    spec = LinearQuant(part="fc1", weight_bits=bits, weight_symmetric=sym, tile=tile, act_bits=8,
                       scale_dtype="fp16" if half else "fp32")
    w = torch.randn(n, k) * 0.05
    w[:, 40:50] += 0.2  # one-sided columns: asymmetric tiles whose range does not straddle 0 evenly
    x = torch.randn(2048, k) @ (0.2 * torch.randn(k, k) + torch.eye(k))  # correlated inputs
    x[:, 7] = 0  # an input that is always 0
    got = lkd.gptq_weight(w, x.T @ x, spec)
    assert torch.allclose(fake_quant_weight(got, bits, sym, tile, half), got, rtol=0, atol=1e-7)
    plain = fake_quant_weight(w, bits, sym, tile, half)
    error = lambda v: ((x @ (v - w).T) ** 2).sum().item()
    assert error(got) < 0.7 * error(plain)


@pytest.mark.parametrize("gptq", [False, True])
def test_lkd_starts_from_gptq_or_plain_rounding(gptq, tiny_models, monkeypatch):
    """With gptq the students start from GPTQ's rounding: their loss before training is below plain PTQ's."""
    starts = []
    train = lkd._train_block

    def first_loss(student, x, y, rest, kwargs, loss_fn, *args):
        starts.append(lkd._evaluate(student, x, y, rest, kwargs, 4, loss_fn)[1])
        return train(student, x, y, rest, kwargs, loss_fn, *args)

    monkeypatch.setattr(lkd, "_train_block", first_loss)
    _, _, stats = _lkd(tiny_models["llama"], gptq=gptq)
    for start, s in zip(starts, stats):
        assert (start < 0.9 * s["loss_ptq"]) if gptq else (start == s["loss_ptq"]), (start, s)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_lkd_lowers_block_error(family, tiny_models):
    _, _, stats = _lkd(tiny_models[family])
    assert len(stats) == 2
    for s in stats:  # "loss" is the KL on the logits for a decoder's last block, else the relative MSE
        assert s["loss"] == ("kl" if family != "bert" and s["block"] == 1 else "token_mse")
        assert s["loss_lkd"] < 0.8 * s["loss_ptq"], s
    assert stats[0]["mse_lkd"] < 0.8 * stats[0]["mse_ptq"]


def test_block_loss_weighs_every_token_alike():
    """Each token's error counts relative to its own norm: a token 1000x larger (a decoder's first
    token) neither dominates the loss nor hides the others' errors."""
    torch.manual_seed(0)
    target = torch.randn(2, 5, 8)
    out = target.clone()
    out[:, 3] *= 1.1  # 10% off in 2 of the 10 tokens: mean relative squared error 0.01 * 2 / 10
    loss = lkd.relative_token_mse(out, target)
    assert loss.item() == pytest.approx(0.002, rel=1e-5)
    target[:, 0] *= 1000
    out[:, 0] *= 1000
    assert lkd.relative_token_mse(out, target).item() == pytest.approx(0.002, rel=1e-5)
    out[:, 0] *= 1.1
    assert lkd.relative_token_mse(out, target).item() == pytest.approx(0.004, rel=1e-5)


def test_lkd_with_learned_clips_and_asymmetric_weights(tiny_models):
    _, _, stats = _lkd(tiny_models["llama"], learn_clip=True, scheme_kw={"weight_symmetric": False})
    assert all(s["loss_lkd"] < s["loss_ptq"] for s in stats), stats


def test_a_block_that_training_makes_worse_keeps_its_ptq_weights(tiny_models):
    """lr 0.05 throws INT8 weights far off: LKD must then give back the original block, not a worse one
    (test_lkd_lowers_block_error shows that blocks which improve are kept)."""
    before = hf.load(str(tiny_models["llama"])).tensors
    after, _, stats = _lkd(tiny_models["llama"], scheme="w8a8", lr=0.05)
    assert all(s.get("kept_ptq") for s in stats), stats
    for s in stats:
        assert s["loss_trained"] > s["loss_ptq"] == s["loss_lkd"] and s["mse_lkd"] == s["mse_ptq"], s
    assert all(torch.equal(before[n], after.tensors[n]) for n in before)


def test_only_block_weights_change(tiny_models):
    before = hf.load(str(tiny_models["gpt2"])).tensors
    after, _, _ = _lkd(tiny_models["gpt2"])
    assert before.keys() == after.tensors.keys()
    changed = {n for n in before if not torch.equal(before[n], after.tensors[n])}
    assert changed and all(n.startswith("h.") for n in changed), sorted(changed)
    assert "h.0.attn.c_attn.weight" in changed and after.tensors["h.0.attn.c_attn.weight"].shape == (96, 32)


def test_deterministic_with_a_seed(tiny_models):
    a = _lkd(tiny_models["llama"], seed=5)[0].tensors
    b = _lkd(tiny_models["llama"], seed=5)[0].tensors
    c = _lkd(tiny_models["llama"], seed=6)[0].tensors
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_resume_after_interrupt_gives_the_same_result(tiny_models, tmp_path, monkeypatch):
    ref = _lkd(tiny_models["gpt2"])[0].tensors
    train = lkd._train_block

    def interrupted(*args):
        if args[7] == 1:  # k: stop during the second block
            raise KeyboardInterrupt
        return train(*args)

    ck = tmp_path / "ck"
    monkeypatch.setattr(lkd, "_train_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _lkd(tiny_models["gpt2"], checkpoint=str(ck))
    assert (ck / "block_000.pt").is_file() and not (ck / "block_001.pt").exists()

    calls = []
    monkeypatch.setattr(lkd, "_train_block", lambda *args: calls.append(args[7]) or train(*args))
    got, _, stats = _lkd(tiny_models["gpt2"], checkpoint=str(ck))
    assert calls == [1]  # block 0 came from the checkpoint
    assert all(torch.equal(ref[n], got.tensors[n]) for n in ref)
    assert [s["block"] for s in stats] == [0, 1]

    with pytest.raises(ValueError, match="another model, scheme or options"):
        _lkd(tiny_models["gpt2"], checkpoint=str(ck), steps=3)


def test_checkpoint_resumes_from_another_directory(tiny_models, tmp_path, monkeypatch):
    """The default data ("auto") names no file: a checkpoint made in one working directory resumes in another
    (its fingerprint once held "auto" as a path relative to the directory of the first run)."""
    ck = str(tmp_path / "ck")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    _lkd(tiny_models["bert"], checkpoint=ck)
    monkeypatch.chdir(tmp_path / "b")
    _, _, stats = _lkd(tiny_models["bert"], checkpoint=ck)
    assert all(s.get("resumed") for s in stats), stats


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("scheme,kw", [("w4a8", {}), ("w8a8", {"weight_symmetric": False, "act_symmetric": False})],
                         ids=["w4a8", "w8a8-asym"])
def test_lkd_file_runs_in_engine_like_its_simulation(family, scheme, kw, tiny_models, tmp_path):
    model, torch_model, _ = _lkd(tiny_models[family], scheme, scheme_kw=kw, learn_clip=scheme == "w4a8")
    tensors, metadata = quantize_model(model, parse_scheme(scheme, **kw))
    out = save(str(tmp_path / "q"), tensors, metadata)
    ids = np.random.RandomState(0).randint(0, 64, size=(4, 20)).astype(np.int64)
    got = Engine(out).forward(ids)

    simulate(torch_model, read_records(out))
    with torch.no_grad():
        result = torch_model(torch.from_numpy(ids))
    ref = (result.last_hidden_state if family == "bert" else result.logits).numpy()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert err <= 1e-2, f"{family} {scheme}: relative error {err:.3g}"
    assert agree >= 0.99, f"{family} {scheme}: argmax agreement {agree:.3f}"


def test_data_sources(tiny_models, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 59}" for i in range(400)))
    bert = lkd.load_torch_model(str(tiny_models["bert"]), "bert")
    ids = lkd.make_data(LKDOptions(data=str(text), batch=4, seq=16, samples=8), bert, str(tiny_models["bert"]),
                        "bert", 64)
    assert ids.shape == (8, 16) and ids.min() >= 5  # words, not special tokens
    with pytest.raises(ValueError, match="needs a decoder"):
        lkd.make_data(LKDOptions(data="generate"), bert, str(tiny_models["bert"]), "bert", 64)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    with pytest.raises(ValueError, match="at least batch x seq"):
        lkd.make_data(LKDOptions(data=str(short), batch=4, seq=16), bert, str(tiny_models["bert"]), "bert", 64)

    gpt2 = lkd.load_torch_model(str(tiny_models["gpt2"]), "gpt2")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):  # the tiny GPT-2 has none
        lkd.make_data(LKDOptions(data=str(text)), gpt2, str(tiny_models["gpt2"]), "gpt2", 64)
    opts = LKDOptions(data="generate", batch=4, seq=16, samples=6, seed=3)
    gen = lkd.make_data(opts, gpt2, str(tiny_models["gpt2"]), "gpt2", 64)
    assert gen.shape == (8, 16) and gen.max() < 64  # samples rounded up to whole batches
    assert torch.equal(gen, lkd.make_data(opts, gpt2, str(tiny_models["gpt2"]), "gpt2", 64))
    # "auto" (the default): the model's own samples for a decoder, random ids for an encoder
    auto = LKDOptions(batch=4, seq=16, samples=6, seed=3)
    assert auto.data == "auto" and torch.equal(lkd.make_data(auto, gpt2, str(tiny_models["gpt2"]), "gpt2", 64), gen)
    assert torch.equal(lkd.make_data(auto, bert, str(tiny_models["bert"]), "bert", 64),
                       lkd.make_data(LKDOptions(data="random", batch=4, seq=16, samples=6, seed=3), bert,
                                     str(tiny_models["bert"]), "bert", 64))
    _, _, stats = _lkd(tiny_models["gpt2"], data="generate")
    assert stats[0]["mse_lkd"] < stats[0]["mse_ptq"]


def test_cli_quantize_with_lkd(tiny_models, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_models["llama"]), "-o", str(out), "--scheme", "w4a8", "--quiet", "--lkd",
                 "--lkd-steps", "5", "--lkd-batch", "2", "--lkd-seq", "8", "--lkd-samples", "4",
                 "--lkd-lr", "1e-4", "--seed", "1", "--lkd-checkpoint", str(tmp_path / "ck")]) == 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["block_000.pt", "block_001.pt", "lkd.json"]
    plain = tmp_path / "plain"
    assert main(["quantize", str(tiny_models["llama"]), "-o", str(plain), "--scheme", "w4a8", "--quiet"]) == 0
    ids = np.arange(12, dtype=np.int64)[None]
    a, b = Engine(str(out)).forward(ids), Engine(str(plain)).forward(ids)
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_cli_gptq_alone_trains_nothing(tiny_models, tmp_path, monkeypatch):
    """--gptq without --lkd: GPTQ's rounding on LKD's samples, no optimizer step; each block's error is
    below plain rounding's, and the file differs from plain PTQ's."""
    def no_training(*args):
        raise AssertionError("GPTQ alone must not train")

    monkeypatch.setattr(lkd, "_train_block", no_training)
    _, _, stats = _lkd(tiny_models["llama"], gptq=True, steps=0)
    assert all(s["loss_lkd"] < s["loss_ptq"] and not s.get("kept_ptq") for s in stats), stats
    out, plain = tmp_path / "q", tmp_path / "plain"
    assert main(["quantize", str(tiny_models["llama"]), "-o", str(out), "--scheme", "w4a8", "--quiet", "--gptq",
                 "--lkd-batch", "2", "--lkd-seq", "8", "--lkd-samples", "4"]) == 0
    assert main(["quantize", str(tiny_models["llama"]), "-o", str(plain), "--scheme", "w4a8", "--quiet"]) == 0
    ids = np.arange(12, dtype=np.int64)[None]
    a, b = Engine(str(out)).forward(ids), Engine(str(plain)).forward(ids)
    assert a.shape == b.shape and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        LKDOptions(steps=0).check()  # no training needs GPTQ


@pytest.mark.parametrize("args,message", [
    (["--lkd-steps", "3"], "--lkd-steps only apply with --lkd"),
    (["--seed", "3", "--lkd-clip"], "--lkd-clip, --seed only apply with --lkd"),
    (["--lkd", "--scheme", "fp32"], "--lkd needs a quantized scheme"),
    (["--lkd", "--lkd-data", "missing.txt"], "'auto', 'random', 'generate' or a text file"),
    (["--lkd", "--lkd-seq", "1000"], "exceeds the model's 32 positions"),
    (["--lkd", "--lkd-seq", "1"], "sequence length must be an integer >= 2"),
    (["--gptq", "--lkd-steps", "3", "--lkd-samples", "8"], "--lkd-steps only apply with --lkd"),
    (["--lkd-samples", "8"], "--lkd-samples only apply with --lkd or --gptq"),
    (["--gptq", "--scheme", "fp32"], "--gptq needs a quantized scheme"),
    (["--gptq", "--distill"], "--distill and --gptq are two ways"),
])
def test_cli_bad_lkd_options(args, message, tiny_models, tmp_path, capsys):
    assert main(["quantize", str(tiny_models["gpt2"]), "-o", str(tmp_path / "q"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finequant: error:") and message in err, err


@pytest.mark.parametrize("value", ["0", "-1e-3", "nan", "x"])
def test_cli_rejects_bad_learning_rate(value, tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tiny_models["gpt2"]), "-o", str(tmp_path / "q"), "--lkd", f"--lkd-lr={value}"])
    assert e.value.code == 2 and "--lkd-lr: expected a positive number" in capsys.readouterr().err


def test_learning_rate_by_weight_bits():
    from finequant.lkd import LKDLinear, block_lr
    from finequant.schemes import LinearQuant

    def lin(bits):
        spec = LinearQuant(part="fc1", weight_bits=bits, tile=(1, 8) if bits else None, act_bits=8 if bits else 0)
        return LKDLinear(torch.zeros(4, 8), None, spec)

    assert block_lr([lin(8), lin(8)], LKDOptions()) == 1e-4      # INT8-only blocks: the gentler rate
    assert block_lr([lin(8), lin(4)], LKDOptions()) == 3e-4      # any INT4 weight: the INT4 rate
    assert block_lr([lin(0), lin(4)], LKDOptions()) == 3e-4
    assert block_lr([lin(8)], LKDOptions(lr=5e-5)) == 5e-5        # an explicit rate means what it says


@pytest.mark.parametrize("family,rotation", [("gpt2", 0), ("llama", 0), ("gpt2", 16), ("llama", 32)])
def test_int4_head_gptq_rounding_is_stored_exactly_and_beats_nearest(family, rotation, tiny_models):
    """round_head gives an INT4 LM head (K-blocks of 16) whose weights PTQ stores as they are (rotated: W H
    as the file holds it), and whose logits error on own samples it did not see (another seed) is below plain
    rounding's; the model's other tensors (a tied embedding table included) are untouched."""
    model = hf.load(str(tiny_models[family]))
    scheme = parse_scheme("w4a8", parts="qkv,attn_out,fc1,fc2,head", head_bits=4, scale_dtype="fp16",
                          head_rotation=rotation)
    arr = lambda v: (v.detach().numpy() if torch.is_tensor(v) else np.asarray(v)).copy()
    before = {k: arr(v) for k, v in model.tensors.items()}
    w = before.get("lm_head.weight", before[hf.embedding_name(family)])
    record = lkd.round_head(model, scheme)
    assert record["method"] == "gptq"
    assert record["damp"] == (lkd.HEAD_GPTQ_DAMP_ROTATED if rotation else lkd.HEAD_GPTQ_DAMP)
    assert all(np.array_equal(arr(model.tensors[k]), v) for k, v in before.items() if k != "lm_head.weight")
    got = arr(model.tensors["lm_head.weight"])
    lq = scheme.for_linear("head", *w.shape)
    assert lq.tile == (1, 16) and lq.rotation == rotation
    stored = rotate_weight(got, rotation) if rotation else got
    np.testing.assert_allclose(fake_quant_weight(stored, 4, True, lq.tile, True), stored, rtol=0,
                               atol=1e-6 if rotation else 1e-7)
    if rotation:  # nearest rounding of W H, rotated back: the engine's (x H) (W H)^T = x W^T
        plain = rotate_weight(fake_quant_weight(rotate_weight(w, rotation), 4, True, lq.tile, True), rotation)
    else:
        plain = fake_quant_weight(w, 4, True, lq.tile, True)
    torch_model = lkd.load_torch_model(str(tiny_models[family]), family)
    ids = lkd.make_data(LKDOptions(data="generate", seq=32, seed=7, progress=False), torch_model,
                        str(tiny_models[family]), family, w.shape[0])
    xs = []
    handle = torch_model.get_output_embeddings().register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        torch_model(ids)
    handle.remove()
    x = xs[0].reshape(-1, w.shape[1]).numpy().astype(np.float64)
    error = lambda v: float(((x @ (v - w).T) ** 2).sum())
    assert error(got) < 0.9 * error(plain), (error(got), error(plain))
