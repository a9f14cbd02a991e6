"""BART (encoder-decoder) in the engine and the package, on tiny random models of odd sizes.

FP32 engine logits against transformers (teacher-forced decoder input, padded encoder batches),
greedy generation token for token against transformers' generate(), sampling per seed, every
quantized scheme (and the W4A4-encoder + W8A8-decoder split) against the torch simulation of the
same file, refused configs and bad input, and the CLI on a BART folder.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from finequant import Engine, hf  # noqa: E402
from finequant.schemes import parse_scheme  # noqa: E402
from finequant.simulate import read_records, simulate  # noqa: E402

TOL = 1e-4
V = 101


def rel_err(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))


def _cli(*args, check=True):
    """`finequant ARGS` in this process (no interpreter start per call): (returncode, stdout, stderr)."""
    import contextlib
    import io

    from finequant.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert code == 0, f"finequant {' '.join(map(str, args))} failed:\n{proc.stderr}"
    return proc


def _tokenizer_json(vocab_size):
    """A word-level tokenizer over "<s> <pad> </s> <unk> w4 ... w{V-1}" with BART's <s> ... </s> template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    return tok.to_str()


def _build(root, **overrides):
    cfg = dict(vocab_size=V, d_model=40, encoder_layers=2, decoder_layers=3, encoder_attention_heads=5,
               decoder_attention_heads=5, encoder_ffn_dim=72, decoder_ffn_dim=72, max_position_embeddings=64)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration._from_config(transformers.BartConfig(**cfg),
                                                                   attn_implementation="eager").eval()
    # Random init leaves LayerNorms at identity, biases and final_logits_bias at zero: perturb them.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.final_logits_bias.add_(0.1 * torch.randn_like(model.final_logits_bias))
    model.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.json").write_text(_tokenizer_json(cfg["vocab_size"]))
    _cli("quantize", root / "hf", "-o", root / "fp32", "--scheme", "fp32", "--quiet")
    return {"model": model, "root": root, "hf": root / "hf", "fp32": str(root / "fp32")}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """BartConfig defaults where they matter: tied LM head, no embedding scale, erf GeLU."""
    return _build(tmp_path_factory.mktemp("bart_tied"))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """Untied LM head, sqrt(d_model) embedding scale, tanh GeLU, a decoder unlike the encoder; its
    larger init makes greedy outputs vary with the input."""
    return _build(tmp_path_factory.mktemp("bart_untied"), tie_word_embeddings=False, scale_embedding=True,
                  init_std=0.1, activation_function="gelu_new", decoder_attention_heads=4, decoder_ffn_dim=56)


def _batch(seed=0, B=3, T=9, Td=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (B, T))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as BART tokenizers pad
    mask[2, 3:] = 0
    ids[mask == 0] = 1  # <pad>
    dec = rng.integers(3, V, (B, Td))
    dec[:, 0] = 2  # decoder_start_token_id
    return ids, mask, dec


def _torch_logits(model, ids, mask, dec, dec_mask=None):
    with torch.no_grad():
        kw = {} if dec_mask is None else {"decoder_attention_mask": torch.from_numpy(dec_mask)}
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     decoder_input_ids=torch.from_numpy(dec), **kw).logits.numpy()


# ---- reading the folder ---------------------------------------------------------------------------

def test_hf_reads_bart(tied):
    m = hf.load(tied["hf"])
    assert m.family == "bart" and m.num_layers == 5
    parts = m.linear_parts()
    assert len(parts) == 2 * 6 + 3 * 10
    assert parts["model.decoder.layers.2.encoder_attn.k_proj"] == "qkv"
    assert parts["model.decoder.layers.0.encoder_attn.out_proj"] == "attn_out"
    assert parts["model.encoder.layers.1.fc2"] == "fc2"
    assert hf.stack_of("bart", "model.encoder.layers.0.fc1") == "encoder"
    assert hf.stack_of("bart", "model.decoder.layers.0.fc1") == "decoder"
    assert hf.stack_of("llama", "model.layers.0.mlp.up_proj") is None
    assert "final_logits_bias" in m.tensors and "model.shared.weight" in m.tensors
    assert not any("embed_tokens" in k for k in m.tensors) and "lm_head.weight" not in m.tensors


# ---- FP32 against transformers ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tied", "untied"])
def test_fp32_logits_match_transformers(which, request):
    m = request.getfixturevalue(which)
    eng = Engine(m["fp32"], threads=1)
    assert (eng.architecture, eng.is_seq2seq, eng.is_decoder, eng._engine.num_layers, eng.max_positions) == \
        ("bart", True, False, 5, 64)
    ids, mask, dec = _batch()
    got = eng.forward(ids, mask, decoder_input_ids=dec)
    ref = _torch_logits(m["model"], ids, mask, dec)
    assert got.shape == (3, 7, V) and got.dtype == np.float32
    assert rel_err(got, ref) <= TOL
    # Right-padded decoder input with its mask: the real positions agree.
    dmask = np.ones_like(dec)
    dmask[1, 4:] = 0
    got = eng.forward(ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    ref = _torch_logits(m["model"], ids, mask, dec, dmask)
    assert rel_err(got[dmask == 1], ref[dmask == 1]) <= TOL
    # forward without decoder input: the encoder's last hidden states
    enc = eng.forward(ids, mask)
    with torch.no_grad():
        ref = m["model"].model.encoder(input_ids=torch.from_numpy(ids),
                                       attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert rel_err(enc[mask == 1], ref[mask == 1]) <= TOL


def _hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             do_sample=False, num_beams=1, **kw).numpy()
    rows = []
    for r in out[:, 1:]:  # drop decoder_start_token_id; cut after eos, where transformers pads
        r = list(r)
        eos = kw.get("eos_token_id")
        if eos is not None and eos in r:
            r = r[:r.index(eos) + 1]
        rows.append([int(t) for t in r])
    return rows


def test_greedy_generation_matches_transformers(untied):
    eng = Engine(untied["fp32"], threads=1)
    ids, mask, _ = _batch(seed=4)
    # explicit settings on both sides: stop at eos 2 (none here), then with forced BOS / EOS
    ref = _hf_generate(untied["model"], ids, mask, max_new_tokens=12, eos_token_id=2, forced_eos_token_id=None)
    got = eng._engine.generate(ids, mask, 12, 0.0, 0, 1.0, 0, [2], None, 2, -1, -1)
    assert got == ref
    assert len({tuple(r) for r in got}) == 3 and all(len(set(r)) > 3 for r in got)  # not degenerate
    stop = ref[1][5]  # a token row 1 makes: every row stops at its first occurrence
    first = ref[1].index(stop)
    ref = _hf_generate(untied["model"], ids, mask, max_new_tokens=12, eos_token_id=stop, forced_eos_token_id=None)
    assert eng._engine.generate(ids, mask, 12, 0.0, 0, 1.0, 0, [stop], None, 2, -1, -1) == ref
    assert len(ref[1]) == first + 1
    ref = _hf_generate(untied["model"], ids, mask, max_new_tokens=9, eos_token_id=None, forced_bos_token_id=0,
                       forced_eos_token_id=2)
    assert eng._engine.generate(ids, mask, 9, 0.0, 0, 1.0, 0, [], None, 2, 0, 2) == ref
    assert all(r[0] == 0 and r[-1] == 2 and len(r) == 9 for r in ref)


def test_python_generate_uses_the_models_generation_defaults(tied, untied):
    # Engine.generate mirrors transformers' default generate(num_beams=1): start 2, stop at eos 2,
    # forced_eos_token_id 2 from the config (BartConfig's default) on the last allowed token.
    for m in (tied, untied):
        eng = Engine(m["fp32"], threads=1)
        ids, mask, _ = _batch(seed=5)
        ids, mask = ids[:1], mask[:1]
        ref = _hf_generate(m["model"], ids, mask, max_new_tokens=8, eos_token_id=2)
        assert eng.generate(list(ids[0]), max_new_tokens=8) == ref[0]
    text = Engine(untied["fp32"]).generate("w5 w17 w33 w8", max_new_tokens=6)
    assert isinstance(text, str) and "</s>" not in text and "<s>" not in text


def test_sampling_is_deterministic_per_seed(untied):
    eng = Engine(untied["fp32"], threads=1)
    prompt = [0, 7, 19, 44, 2]
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=30, top_p=0.95, stop_tokens=[], forced_eos_token_id=-1)
    a = [eng.generate(prompt, seed=s, **kw) for s in (1, 1, 2, 3)]
    assert a[0] == a[1] and len(a[0]) == 10 and all(0 <= t < V for t in a[0])
    assert len({tuple(x) for x in a}) > 1  # other seeds sample other tokens
    seen = []
    assert eng.generate(prompt, seed=1, callback=seen.append, **kw) == seen == a[0]


# ---- quantized engine against the simulation ---------------------------------------------------------

SCHEMES = [
    ("w8a8", []),  # the CLI default, asymmetric activations
    ("w4a8", ["--kblock", "32", "--sym"]), ("w4a8", ["--asym"]),
    ("w4a4", ["--sym"]),
    ("w8a8", ["--encoder-scheme", "w4a4"]),  # the INT4 paper's W4A4 encoder + W8A8 decoder
    ("w8a8", ["--sym", "--parts", "qkv,attn_out,fc1,fc2,head"]),  # untied lm_head quantized (the tied: below)
]


@pytest.mark.parametrize("scheme,opts", SCHEMES, ids=[s + "".join(o) for s, o in SCHEMES])
def test_quantized_engine_matches_simulation(untied, scheme, opts, tmp_path):
    # The untied model: its larger init makes every stack matter (INT4 moves its argmax on 10-25% of
    # positions). Token-wise rounding can flip where the engine's and torch's fp32 sums differ in the
    # last bit: hence the other families' tolerance (1e-2 relative, >= 99% argmax) on 256 positions.
    out = tmp_path / "q"
    proc = _cli("quantize", untied["hf"], "-o", out, "--scheme", scheme, *opts)
    assert "smoothing is not implemented for bart" in proc.stderr  # quantized default: the note, no smoothing
    ids, mask, dec = _batch(seed=2, B=8, T=24, Td=32)
    got = Engine(str(out), threads=1).forward(ids, mask, decoder_input_ids=dec)
    model = transformers.BartForConditionalGeneration.from_pretrained(untied["hf"], attn_implementation="eager").eval()
    records = read_records(str(out))
    simulate(model, records)
    ref = _torch_logits(model, ids, mask, dec)
    err = rel_err(got, ref)
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert err <= 1e-2, f"{scheme} {opts}: relative error {err:.3g}"
    assert agree >= 0.99, f"{scheme} {opts}: argmax agreement {agree:.3f}"
    fp = Engine(untied["fp32"], threads=1).forward(ids, mask, decoder_input_ids=dec)
    assert rel_err(got, fp) > 0  # the integer path ran
    if "--encoder-scheme" in opts:
        bits = {(n.split(".")[1], lq.weight_bits, lq.act_bits) for n, lq in records.items()}
        assert bits == {("encoder", 4, 4), ("decoder", 8, 8)}


def test_tied_head_quantized(tied, tmp_path):
    # the tied LM head gets its own quantized lm_head (from model.shared) plus final_logits_bias
    out = tmp_path / "q"
    _cli("quantize", tied["hf"], "-o", out, "--scheme", "w8a8", "--parts", "qkv,attn_out,fc1,fc2,head", "--quiet")
    ids, mask, dec = _batch(seed=3)
    got = Engine(str(out), threads=1).forward(ids, mask, decoder_input_ids=dec)
    model = transformers.BartForConditionalGeneration.from_pretrained(tied["hf"], attn_implementation="eager").eval()
    records = read_records(str(out))
    assert records["lm_head"].weight_bits == 8
    simulate(model, records)
    assert rel_err(got, _torch_logits(model, ids, mask, dec)) <= 1e-2


def test_stack_schemes():
    s = parse_scheme("w8a8", encoder="w4a4", act_symmetric=False)
    assert s.describe() == "w8a8 a-asym encoder=w4a4"
    assert s.for_linear("fc1", 8, 64, stack="encoder").weight_bits == 4
    assert s.for_linear("fc1", 8, 64, stack="decoder").weight_bits == 8
    assert s.for_linear("fc1", 8, 64).act_bits == 8 and not s.for_linear("fc1", 8, 64).act_symmetric
    fp_dec = parse_scheme("w4a8", decoder="fp32")
    assert fp_dec.for_linear("qkv", 8, 64, stack="decoder").weight_bits == 0
    assert parse_scheme("fp32", encoder="w8a8").is_quantized
    with pytest.raises(ValueError, match="encoder scheme"):
        parse_scheme("w8a8", encoder="bf16")
    with pytest.raises(ValueError, match="unknown scheme"):
        parse_scheme("w8a8", decoder="w3a3")


# ---- refused configs, bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("activation_function", "relu", "activation_function 'relu'"),
    ("normalize_before", True, "normalize_before"),
    ("add_final_layer_norm", True, "add_final_layer_norm"),
    ("static_position_embeddings", True, "static_position_embeddings"),
    ("decoder_start_token_id", 500, "decoder_start_token_id"),
])
def test_unsupported_configs_are_refused(tied, tmp_path, field, value, match):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tied["fp32"] + "/model.safetensors"
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    config[field] = value
    meta["config"] = json.dumps(config)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    err = ValueError if field == "decoder_start_token_id" else NotImplementedError
    with pytest.raises(err, match=match):
        Engine(str(tmp_path))


def test_bad_inputs_raise(tied):
    eng = Engine(tied["fp32"], threads=1)
    ids, mask, dec = _batch()
    bad = {
        "encoder id too large": (np.full_like(ids, V), mask, dec, "input_ids"),
        "decoder id negative": (ids, mask, np.full_like(dec, -1), "decoder_input_ids"),
        "decoder rows": (ids, mask, dec[:2], "rows"),
        "encoder too long": (np.ones((1, 65), dtype=np.int64), None, dec[:1], "max_positions"),
        "decoder too long": (ids, mask, np.ones((3, 65), dtype=np.int64), "max_positions"),
        "mask values": (ids, mask * 2, dec, "0 or 1"),
    }
    for what, (i, m, d, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            eng.forward(i, m, decoder_input_ids=d)
            pytest.fail(what)
    with pytest.raises(ValueError, match="decoder_attention_mask"):
        eng.forward(ids, mask, decoder_input_ids=dec, decoder_attention_mask=np.ones((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="forced_eos_token_id"):
        eng.generate([0, 5, 2], forced_eos_token_id=V)
    with pytest.raises(ValueError, match="input_ids"):
        eng.generate([0, V + 3, 2])


def test_forward_seq2seq_needs_an_encoder_decoder(tiny_models):
    eng = Engine(str(tiny_models["gpt2"]))
    ids = np.ones((1, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="encoder-decoder"):
        eng.forward(ids, decoder_input_ids=ids)
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        eng._engine.forward_seq2seq(ids, None, ids, None)


def test_stack_schemes_need_an_encoder_decoder(tiny_models):
    from finequant.modelfile import quantize_model

    with pytest.raises(ValueError, match="encoder-decoder"):
        quantize_model(hf.load(tiny_models["gpt2"]), parse_scheme("w8a8", encoder="w4a4"))


# ---- the command line ---------------------------------------------------------------------------------

def test_cli_on_a_bart_folder(untied, tmp_path):
    out = tmp_path / "w8"
    _cli("quantize", untied["hf"], "-o", out, "--scheme", "w8a8", "--no-smooth", "--quiet")
    info = _cli("info", out).stdout
    assert "architecture:  bart" in info and "layers:        5" in info
    for refused in (["--lkd"], ["--smooth-alpha", "0.5"]):
        proc = _cli("quantize", untied["hf"], "-o", tmp_path / "x", "--quiet", *refused, check=False)
        assert proc.returncode == 2 and "not supported for bart" in proc.stderr
    run = _cli("run", out, "--prompt", "w5 w17 w33 w8", "--max-tokens", "6").stdout
    assert run.strip() and "</s>" not in run
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{4 + (i * 7) % 97}" for i in range(150)))
    ppl = _cli("ppl", out, text, "--ctx", "40").stdout
    assert "tokens: 158 in 4 windows" in ppl  # 150 words + <s> and </s> in each of 4 windows of <= 38 words
    value = float(ppl.split("perplexity:")[1])
    ev = json.loads(_cli("eval", untied["fp32"], out, "--text", text, "--ctx", "40", "--json").stdout)
    assert abs(ev[1]["perplexity"] - value) < 1e-3 * value and ev[0]["perplexity"] != ev[1]["perplexity"]
    proc = _cli("eval", out, "--probe", check=False)
    assert proc.returncode == 2 and "--text" in proc.stderr
