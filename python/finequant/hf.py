"""Read Hugging Face model folders into canonical fp32 tensors (docs/model-format.md).

Safetensors files are read with NumPy (no torch needed: `finequant quantize` works after a plain
`pip install .`, docs/DESIGN.md section 2 "Quantizing without torch"); `load` hands the tensors back as
torch tensors unless asked for NumPy arrays. pytorch_model.bin checkpoints need torch.

Canonical means: task-head prefixes removed (`bert.`, `transformer.`), non-parameter buffers dropped,
GPT-2 Conv1D weights transposed to [out, in], a tied lm_head dropped. BART keeps transformers' names
under `model.` (`model.shared.weight`, `model.encoder.layers.0.self_attn.q_proj`, ...) plus
`final_logits_bias`; its encoder / decoder `embed_tokens` are dropped when equal to `model.shared`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional

import numpy as np

# model_type -> family. The Llama family's variants (Mistral, Qwen2, Phi-3, Gemma, Gemma 2) are config
# flags of one decoder (docs/DESIGN.md section 10); Phi-3 keeps its fused qkv_proj / gate_up_proj.
FAMILIES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
            "phi3": "llama", "gemma": "llama", "gemma2": "llama", "bart": "bart"}
SEQ2SEQ_FAMILIES = ("bart",)  # encoder-decoder: Linears belong to the "encoder" or the "decoder" stack
STACKS = ("encoder", "decoder")

# Copied next to the model file: the tokenizer, plus the chat template and generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")

_GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


@dataclass
class HFModel:
    family: str                       # "bert", "gpt2", "llama" (with its variants) or "bart"
    config: dict                      # config.json as loaded
    tensors: Dict[str, Any]           # canonical names -> fp32 torch tensors or NumPy arrays
    folder: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return num_layers(self.config)

    def linear_parts(self) -> Dict[str, str]:
        return linear_parts(self.family, self.num_layers, self.config)

    def copy(self) -> "HFModel":
        """A copy with its own tensor dict: transforms that replace entries (smoothing, LKD) leave this
        model as it is; the tensors themselves are shared, not copied."""
        return replace(self, tensors=dict(self.tensors))

    def to_torch(self) -> "HFModel":
        """A copy holding torch tensors (sharing memory with NumPy arrays) for the torch steps."""
        return replace(self, tensors=_as_torch(self.tensors))


def num_layers(config: dict) -> int:
    """Transformer blocks (an encoder-decoder: encoder + decoder blocks)."""
    if config.get("model_type") in SEQ2SEQ_FAMILIES or "encoder_layers" in config:
        try:
            return int(config["encoder_layers"]) + int(config["decoder_layers"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("config.json has no encoder_layers / decoder_layers") from None
    for key in ("num_hidden_layers", "n_layer"):
        if key in config:
            return int(config[key])
    raise ValueError("config.json has no num_hidden_layers / n_layer")


def family_of(config: dict) -> str:
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise NotImplementedError(
            f"unsupported model_type {mt!r}: supported are {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]


def check_config(family: str, config: dict) -> None:
    """Refuse, before anything is written, a config the engine would compute differently from
    transformers: the engine's own reader (ModelConfig::parse) judges it, so quantize and load apply
    one rule set. NotImplementedError names the unsupported setting."""
    from . import _core

    _core.check_config(family, json.dumps(config))


def fused_phi3(config: Optional[dict]) -> bool:
    """Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj (kept fused: canonical names)."""
    return bool(config) and config.get("model_type") == "phi3"


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json (is it a Hugging Face model folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


# safetensors dtype -> NumPy dtype as stored (little-endian); BF16 is read as its bits and widened.
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                 "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}
TORCH_EXTRA = "pip install 'finequant[train]'"


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values given as their uint16 bits -> fp32 (exact: the bits are fp32's upper half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """name -> NumPy array; floating-point tensors (F64, F32, F16, BF16) as fp32, others as stored."""
    import struct

    from safetensors import safe_open

    try:  # safetensors validates the header and offsets (and names the problem)
        with safe_open(path, framework="np") as f:
            names = list(f.keys())
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if os.path.getsize(path) > 8 + n \
            else np.zeros(0, np.uint8)
    except Exception as e:  # SafetensorError, OSError: name the file, hide the traceback
        raise ValueError(f"cannot read {path}: {e}") from None
    out: Dict[str, np.ndarray] = {}
    for name in names:
        info = header[name]
        dtype = _NUMPY_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which finequant cannot read")
        begin, end = info["data_offsets"]
        a = np.asarray(data[begin:end]).view(dtype).reshape(info["shape"])
        # copies in native byte order: nothing keeps the file mapped
        if info["dtype"] == "BF16":
            out[name] = bf16_to_float32(a)
        else:
            out[name] = np.array(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype.newbyteorder("="))
    return out


def _load_torch_binary(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path} is a torch pickle: reading it needs torch ({TORCH_EXTRA}), or convert "
                         "the checkpoint to safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy()
            for k, v in state.items() if torch.is_tensor(v)}


def read_weights(folder: str) -> Dict[str, np.ndarray]:
    """Raw state dict (NumPy; floating point as fp32) from model.safetensors, a sharded safetensors
    index or pytorch_model.bin (the last needs torch)."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        return _load_safetensors(single)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read shard index {index}: {e}") from None
        tensors: Dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {shard} listed in {index} is missing")
            tensors.update(_load_safetensors(path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"tensors listed in {index} but not in the shards: {missing[:5]}")
        return tensors
    if os.path.isfile(binary):
        return _load_torch_binary(binary)
    raise FileNotFoundError(f"{folder} has no model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin")


def torch_available() -> bool:
    """Whether torch and transformers import (the calibration, LKD, distillation and simulation need both)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def require_torch(what: str) -> None:
    """ImportError with a one-line message naming the extra to install, when torch is missing."""
    if not torch_available():
        raise ImportError(f"{what} needs torch and transformers: {TORCH_EXTRA}")


def _as_torch(tensors: Dict[str, Any]) -> Dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"torch tensors need torch: {TORCH_EXTRA}") from None
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}


def _canonical_name(family: str, name: str):
    """Canonical tensor name, or None to drop the tensor."""
    if family == "bert":
        if name.startswith("bert."):
            name = name[len("bert."):]
        if name.startswith("cls.") or name.endswith("position_ids"):
            return None
        # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
        if ".LayerNorm." in name:
            name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        return name
    if family == "gpt2":
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers
            return None
        return name
    if family == "bart":
        # a saved base model (BartModel) lacks the "model." prefix
        if name.startswith(("shared.", "encoder.", "decoder.")):
            name = "model." + name
        return name
    # llama family: a saved base model (LlamaModel) lacks the "model." prefix.
    if "rotary_emb" in name:
        return None
    if name.startswith(("layers.", "embed_tokens.", "norm.")):
        name = "model." + name
    return name


def embedding_name(family: str) -> str:
    return {"bert": "embeddings.word_embeddings.weight", "gpt2": "wte.weight",
            "llama": "model.embed_tokens.weight", "bart": "model.shared.weight"}[family]


def stack_of(family: str, module: str):
    """"encoder" or "decoder" for a Linear of an encoder-decoder model, else None."""
    if family in SEQ2SEQ_FAMILIES:
        for stack in STACKS:
            if module.startswith(f"model.{stack}."):
                return stack
    return None


def _float32(t):
    """t as a contiguous fp32 array / tensor of its kind, or None when it is not floating point."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32) if t.dtype.kind == "f" else None
    if not hasattr(t, "is_floating_point") or not t.is_floating_point():  # not a torch tensor, or integer
        return None
    import torch

    return t.detach().to(torch.float32).contiguous()


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    import torch

    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def canonicalize(family: str, config: dict, raw: Dict[str, Any]) -> Dict[str, Any]:
    """Canonical fp32 tensors of a raw state dict: NumPy arrays stay NumPy, torch tensors stay torch."""
    out: Dict[str, Any] = {}
    for name, t in raw.items():
        cname = _canonical_name(family, name)
        if cname is None:
            continue
        t = _float32(t)
        if t is None:
            continue
        if family == "gpt2" and cname.endswith(_GPT2_CONV1D) and t.ndim == 2:
            t = t.T  # Conv1D stores [in, out]
            t = np.ascontiguousarray(t) if isinstance(t, np.ndarray) else t.contiguous()
        out[cname] = t
    emb = out.get(embedding_name(family))
    if family == "bart":
        # Both stacks' token embeddings are model.shared when tied (older files store the copies);
        # untied (tie_word_embeddings false in transformers 5) each stack keeps its own table.
        for name in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
            t = out.get(name)
            if t is not None and emb is not None and _equal(t, emb):
                del out[name]
    tied = config.get("tie_word_embeddings", family != "llama" or config.get("model_type") in ("gemma", "gemma2"))
    head = out.get("lm_head.weight")
    if tied and head is not None and emb is not None and tuple(head.shape) == tuple(emb.shape) \
            and _equal(head, emb):
        del out["lm_head.weight"]
    return out


def copy_into_torch(model: HFModel, torch_model) -> None:
    """Write model.tensors back into the transformers model it was read from (the inverse of
    canonicalize: GPT-2's Conv1D weights transposed again), e.g. after a transform of the tensors."""
    import torch

    state = torch_model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            cname = _canonical_name(model.family, name)
            if cname is None or cname not in model.tensors:
                continue
            src = torch.as_tensor(model.tensors[cname])
            if model.family == "gpt2" and cname.endswith(_GPT2_CONV1D) and src.dim() == 2:
                src = src.t()
            t.copy_(src.to(t.dtype))


def load(folder: str, tensors: str = "torch") -> HFModel:
    """Read a Hugging Face folder (config.json + weights) into an HFModel whose tensors are torch
    tensors (tensors="torch") or NumPy arrays (tensors="numpy": no torch needed)."""
    if tensors not in ("torch", "numpy"):
        raise ValueError(f"tensors must be 'torch' or 'numpy', got {tensors!r}")
    folder = os.fspath(folder)
    config = read_config(folder)
    family = family_of(config)
    check_config(family, config)
    arrays = canonicalize(family, config, read_weights(folder))
    n = num_layers(config)
    missing = [m for m in linear_parts(family, n, config) if m + ".weight" not in arrays]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} Linear weight(s) of a {family} model with {n} "
                         f"layers are missing, e.g. {missing[0]}.weight")
    model = HFModel(family=family, config=config, tensors=arrays, folder=folder)
    return model.to_torch() if tensors == "torch" else model


def linear_parts(family: str, num_layers: int, config: Optional[dict] = None) -> Dict[str, str]:
    """Module name -> part (qkv, attn_out, fc1, fc2) for every Linear of the transformer blocks.
    A Phi-3 (llama family) needs `config` for its fused projections (model_type phi3).
    An encoder-decoder (bart) needs `config` for its encoder_layers / decoder_layers; its
    cross-attention's q/k/v count as qkv and its out_proj as attn_out (stack_of tells the stacks apart)."""
    parts: Dict[str, str] = {}
    if family == "bart":
        if config is None:
            raise ValueError("linear_parts of a bart model needs its config (encoder_layers, decoder_layers)")
        for stack in STACKS:
            for i in range(int(config[f"{stack}_layers"])):
                p = f"model.{stack}.layers.{i}."
                for attn in ("self_attn.", "encoder_attn.") if stack == "decoder" else ("self_attn.",):
                    for proj in ("q_proj", "k_proj", "v_proj"):
                        parts[p + attn + proj] = "qkv"
                    parts[p + attn + "out_proj"] = "attn_out"
                parts[p + "fc1"] = "fc1"
                parts[p + "fc2"] = "fc2"
        return parts
    for i in range(num_layers):
        if family == "bert":
            p = f"encoder.layer.{i}."
            for proj in ("query", "key", "value"):
                parts[p + "attention.self." + proj] = "qkv"
            parts[p + "attention.output.dense"] = "attn_out"
            parts[p + "intermediate.dense"] = "fc1"
            parts[p + "output.dense"] = "fc2"
        elif family == "gpt2":
            p = f"h.{i}."
            parts[p + "attn.c_attn"] = "qkv"
            parts[p + "attn.c_proj"] = "attn_out"
            parts[p + "mlp.c_fc"] = "fc1"
            parts[p + "mlp.c_proj"] = "fc2"
        elif family == "llama":
            p = f"model.layers.{i}."
            if fused_phi3(config):
                parts[p + "self_attn.qkv_proj"] = "qkv"
            else:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    parts[p + "self_attn." + proj] = "qkv"
            parts[p + "self_attn.o_proj"] = "attn_out"
            if fused_phi3(config):
                parts[p + "mlp.gate_up_proj"] = "fc1"
            else:
                parts[p + "mlp.gate_proj"] = "fc1"
                parts[p + "mlp.up_proj"] = "fc1"
            parts[p + "mlp.down_proj"] = "fc2"
        else:
            raise NotImplementedError(f"unsupported family {family!r}")
    return parts


def tokenizer_files(folder: str):
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
