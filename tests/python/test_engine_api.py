"""finequant.Engine (the Python front end) and the `run` / `embed` / `ppl` commands on tiny random
models: HF folders run directly, argument errors, text in / text out, streaming, and FP32 parity
with transformers for greedy generation and perplexity."""
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import finequant
from finequant.cli import main
from finequant.modelfile import quantize_folder
from finequant.schemes import parse_scheme

WORDS = ["<unk>", "the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to", "house", "big", "small",
         "red", "blue", "it", "was", "is", "in"]


def _word_level_tokenizer(vocab):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel(vocab, unk_token=next(iter(vocab))))
    tok.pre_tokenizer = Whitespace()
    return tok


@pytest.fixture(scope="module")
def with_tok(tiny_models, tmp_path_factory):
    """family -> a copy of the tiny model folder with a word-level tokenizer.json."""
    root = tmp_path_factory.mktemp("with-tok")
    out = {}
    for fam, src in tiny_models.items():
        dst = root / fam
        shutil.copytree(src, dst)
        if fam == "bert":  # its vocab.txt: [PAD] [UNK] [CLS] [SEP] [MASK] w0..w58, plus words
            vocab = {w: i for i, w in enumerate((src / "vocab.txt").read_text().split())}
            for i, w in enumerate(WORDS[1:]):
                vocab[w] = 5 + i  # reuse ids of w0.. for real words
                vocab.pop(f"w{i}")
            vocab = {"[UNK]": 1, **{k: v for k, v in vocab.items() if k != "[UNK]"}}
        else:
            vocab = {w: i for i, w in enumerate(WORDS)}
            vocab.update({f"w{i}": i for i in range(len(WORDS), 64)})
        _word_level_tokenizer(vocab).save(str(dst / "tokenizer.json"))
        out[fam] = dst
    return out


@pytest.fixture(scope="module")
def engines(with_tok):
    return {fam: finequant.Engine(str(path)) for fam, path in with_tok.items()}


def _ids(seed, b, t, vocab=64):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int64)


# ---- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_hf_folder_equals_converted_dir(family, tiny_models, tmp_path):
    direct = finequant.Engine(str(tiny_models[family]))
    assert direct.scheme.startswith("fp32")
    out = quantize_folder(str(tiny_models[family]), str(tmp_path / "fp32"), parse_scheme("fp32"))
    converted = finequant.Engine(out)
    ids = _ids(3, 2, 9)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    np.testing.assert_array_equal(direct.forward(ids, mask), converted.forward(ids, mask))
    assert direct.architecture == converted.architecture == family
    assert (direct.vocab_size, direct.hidden_size, direct.max_positions) == \
        (converted.vocab_size, converted.hidden_size, converted.max_positions)


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        finequant.Engine(str(tmp_path / "nowhere"))


def test_threads_round_trip(tiny_models):
    eng = finequant.Engine(str(tiny_models["gpt2"]), threads=1)
    assert eng.threads == 1
    ids = _ids(4, 1, 7)
    one = eng.forward(ids)
    eng.threads = 2
    assert eng.threads == 2
    np.testing.assert_allclose(eng.forward(ids), one, rtol=1e-5, atol=1e-5)


# ---- argument errors ------------------------------------------------------------------------------
def test_type_errors(engines, tiny_models):
    bert, gpt2 = engines["bert"], engines["gpt2"]
    with pytest.raises(ValueError, match="encoder"):
        gpt2.embed("the cat")
    with pytest.raises(ValueError, match="decoder"):
        bert.generate([1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        gpt2.generate([])
    with pytest.raises(ValueError, match="empty"):
        gpt2.generate("")  # tokenizes to nothing
    with pytest.raises(ValueError):
        bert.embed([])
    with pytest.raises(ValueError):
        gpt2.forward(np.array([[1, 64]], dtype=np.int64))  # id out of range
    with pytest.raises(ValueError):
        gpt2.forward(np.array([1, 2], dtype=np.int64))  # 1-D
    no_tok = finequant.Engine(str(tiny_models["gpt2"]))  # the original folder has no tokenizer.json
    assert no_tok.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer"):
        no_tok.generate("the cat")
    with pytest.raises(ValueError, match="tokenizer"):
        finequant.Engine(str(tiny_models["bert"])).embed("the cat")
    assert len(no_tok.generate([1, 2, 3], max_new_tokens=4, stop_tokens=[])) == 4  # ids still work


# ---- generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_text_callback_and_stream(family, engines):
    eng = engines[family]
    prompt = "the cat sat on the mat"
    text = eng.generate(prompt, max_new_tokens=6, stop_tokens=[])
    assert isinstance(text, str) and text

    seen = []
    ids = eng.generate(eng.tokenizer.encode(prompt).ids, max_new_tokens=6, stop_tokens=[], callback=seen.append)
    assert isinstance(ids, list) and len(ids) == 6
    assert seen == ids
    assert eng.tokenizer.decode(ids) == text

    pieces = list(eng.stream(prompt, max_new_tokens=6, stop_tokens=[]))
    assert len(pieces) == 6 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == text


def test_stream_without_tokenizer_yields_ids(tiny_models):
    eng = finequant.Engine(str(tiny_models["llama"]))
    ids = eng.generate([5, 6, 7], max_new_tokens=4, stop_tokens=[])
    assert list(eng.stream([5, 6, 7], max_new_tokens=4, stop_tokens=[])) == [str(t) for t in ids]


def test_stream_reraises_errors(engines):
    with pytest.raises(ValueError):
        list(engines["gpt2"].stream([], max_new_tokens=3))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_matches_transformers_generate(family, tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[family]), attn_implementation="eager").eval()
    eng = finequant.Engine(str(tiny_models[family]))
    eos = model.generation_config.eos_token_id
    for seed in range(3):
        prompt = _ids(10 + seed, 1, 5)[0].tolist()
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                                 do_sample=False, max_new_tokens=10, pad_token_id=0)
        ref = out[0, 5:].tolist()
        # transformers stops after the eos token (included), as the engine does with stop_tokens=[eos]
        got = eng.generate(prompt, max_new_tokens=10, stop_tokens=[eos] if eos is not None else [])
        assert got == ref, (seed, got, ref)


# ---- embeddings -----------------------------------------------------------------------------------
def test_embed_mean_pools_real_tokens(engines):
    bert = engines["bert"]
    texts = ["the cat sat", "a big red dog ran to the small blue house"]
    emb = bert.embed(texts)
    assert emb.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    # each row alone (no padding) gives the same embedding as in the padded batch
    np.testing.assert_allclose(bert.embed(texts[0]), emb[0], rtol=1e-5, atol=1e-6)
    ids, mask = bert.encode_batch(texts)
    assert mask.sum(1).tolist() == [3, 10]
    hidden = bert.forward(ids[:1, :3])[0].mean(0)
    np.testing.assert_allclose(emb[0], hidden / np.linalg.norm(hidden), rtol=1e-5, atol=1e-6)


# ---- command line ---------------------------------------------------------------------------------
def test_cli_run_prints_text(with_tok, engines, capsys):
    assert main(["run", str(with_tok["llama"]), "--prompt", "the dog ran", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    expected = engines["llama"].generate("the dog ran", max_new_tokens=5)
    assert out == expected + "\n" and expected.strip()


def test_cli_embed_prints_cosine_matrix(with_tok, engines, capsys):
    texts = ["the cat sat", "the dog ran", "a red house"]
    assert main(["embed", str(with_tok["bert"]), *texts]) == 0
    out = capsys.readouterr().out
    assert "(dim 32)" in out and "cosine similarity:" in out
    matrix = out.split("cosine similarity:")[1]
    rows = [r for r in matrix.replace("[", " ").replace("]", " ").strip().splitlines() if r.strip()]
    values = np.array([[float(v) for v in r.split()] for r in rows])
    emb = engines["bert"].embed(texts)
    np.testing.assert_allclose(values, emb @ emb.T, atol=1e-4)
    np.testing.assert_allclose(np.diag(values), 1, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cli_ppl_equals_transformers(family, with_tok, tmp_path, capsys):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(7)
    text = " ".join(rng.choice(WORDS[1:], size=60))
    path = tmp_path / "text.txt"
    path.write_text(text)
    ctx, max_tokens = 16, 50
    assert main(["ppl", str(with_tok[family]), str(path), "--ctx", str(ctx), "--max-tokens", str(max_tokens)]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("perplexity: ")]
    assert len(line) == 1
    got = float(line[0].split()[1])
    assert f"tokens: {max_tokens - 4} in 4 windows" in out  # 16 + 16 + 16 + 2 tokens

    ids = Tokenizer.from_file(str(with_tok[family] / "tokenizer.json")).encode(text).ids[:max_tokens]
    model = AutoModelForCausalLM.from_pretrained(str(with_tok[family]), attn_implementation="eager").eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids), ctx):
        w = ids[start:start + ctx]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([w])).logits[0, :-1].double(), -1)
        nll -= float(logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
        count += len(w) - 1
    assert got == pytest.approx(math.exp(nll / count), rel=1e-3)


def test_cli_bad_model_path(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finequant", "run", str(tmp_path / "nowhere"), "--prompt", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("finequant: error:"), proc.stderr


def test_cli_errors_in_process(with_tok, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat")
    assert main(["embed", str(with_tok["gpt2"]), "the cat"]) == 2  # decoder
    assert main(["ppl", str(with_tok["bert"]), str(text)]) == 2  # encoder
    assert main(["ppl", str(with_tok["gpt2"]), str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("finequant: error:") == 3
