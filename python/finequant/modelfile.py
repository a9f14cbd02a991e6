"""Write and inspect finequant model files (docs/model-format.md, format_version 1)."""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Dict, Optional, Tuple

import torch

from . import hf
from .pack import pack_int4
from .quantize import dequantize, quantize_tensor, relative_error
from .rotate import rotate_weight
from .schemes import HEAD, LinearQuant, QuantScheme

FORMAT = "finequant"
FORMAT_VERSION = "1"
MODEL_FILE = "model.safetensors"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def quantize_model(model: hf.HFModel, scheme: QuantScheme, progress: bool = False,
                   errors: Optional[dict] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Quantize the Linears of the transformer blocks; returns (tensors, metadata) ready to save.

    Tensors are torch tensors (so BF16 storage is possible); quantized weights are I8 / U8 (INT4
    packed into U8 along K). If `errors` is a dict it receives module -> relative weight error.
    """
    parts = model.linear_parts()
    if scheme.stacks and model.family not in hf.SEQ2SEQ_FAMILIES:
        raise ValueError(f"per-stack schemes ({', '.join(s for s, _ in scheme.stacks)}) apply to encoder-decoder "
                         f"models ({', '.join(hf.SEQ2SEQ_FAMILIES)}), not {model.family}")
    weights = {module: model.tensors.get(module + ".weight") for module in parts}
    if HEAD in scheme.parts and model.family != "bert":
        # The LM head gets its own quantized tensor; a tied embedding stays floating point.
        parts["lm_head"] = HEAD
        weights["lm_head"] = model.tensors.get("lm_head.weight", model.tensors.get(hf.embedding_name(model.family)))
    float_dtype = torch.bfloat16 if scheme.float_dtype == "bf16" else torch.float32
    out: Dict[str, torch.Tensor] = {}
    records: Dict[str, dict] = {}
    items = list(parts.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="quantize", unit="linear", leave=False)
    for module, part in items:
        w = weights[module]
        if w is None:
            raise ValueError(f"model has no weight for Linear {module}")
        if w.dim() != 2:
            raise ValueError(f"{module}.weight has shape {tuple(w.shape)}, expected 2-D")
        n, k = w.shape
        lq = scheme.for_linear(part, n, k, stack=hf.stack_of(model.family, module))
        if lq.rotation:  # the file holds W H; the engine rotates the inputs (finequant.rotate)
            w = rotate_weight(w, lq.rotation)
        if lq.weight_bits:
            if lq.weight_bits == 4 and k % 2:
                raise ValueError(f"INT4 packing needs an even number of columns: {module} has K={k}")
            qt = quantize_tensor(w, lq.weight_bits, lq.weight_symmetric, lq.tile, lq.half_scales)
            q = qt.q
            if lq.weight_bits == 4:
                q = torch.from_numpy(pack_int4(q.numpy()))
            out[module + ".weight"] = q.contiguous()
            out[module + ".weight_scale"] = qt.scale.contiguous()
            if qt.zero_point is not None:
                out[module + ".weight_zero_point"] = qt.zero_point.contiguous()
            if errors is not None:
                errors[module] = relative_error(w, dequantize(qt))
        records[module] = lq.to_json()
    for name, t in model.tensors.items():
        if name in out:
            continue
        # Linear biases stay F32 in every scheme (docs/model-format.md); the rest follows the scheme.
        is_bias = name.endswith(".bias") and name[:-5] in records
        out[name] = t.to(torch.float32 if is_bias else float_dtype).contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.family,
        "config": json.dumps(model.config, sort_keys=True),
        "scheme": scheme.describe(),
        "quantization": json.dumps(records),
    }
    return out, metadata


def save(out_dir: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
         tokenizer_src: Optional[str] = None) -> str:
    """Write out_dir/model.safetensors and copy the tokenizer files of tokenizer_src."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written model file behind
    if tokenizer_src:
        for name in hf.tokenizer_files(tokenizer_src):
            src = os.path.join(tokenizer_src, name)
            if os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(src, os.path.join(out_dir, name))
    return path


def check_output_dir(out_dir: str, overwrite: bool = False) -> None:
    """Refuse an output directory that exists and is not empty, unless told to replace it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty: pass --overwrite to replace it")


def publish(out_dir: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
            tokenizer_src: Optional[str] = None) -> str:
    """Write a complete model directory under a temporary name beside out_dir, then move it into place
    (replacing out_dir if it exists): an interrupted or failed run never leaves a half-written directory
    that looks like a model. Returns the model file's path."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    import tempfile

    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    old = None
    try:
        save(tmp, tensors, metadata, tokenizer_src)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and not os.path.exists(out_dir) and os.path.exists(os.path.join(old, name)):
            os.rename(os.path.join(old, name), out_dir)  # put the previous model back
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return os.path.join(out_dir, MODEL_FILE)


def quantize_folder(src: str, out_dir: str, scheme: QuantScheme, progress: bool = False,
                    errors: Optional[dict] = None) -> str:
    """Read a Hugging Face folder, quantize it with `scheme` and write a finequant model dir."""
    model = hf.load(src)
    tensors, metadata = quantize_model(model, scheme, progress=progress, errors=errors)
    return save(out_dir, tensors, metadata, tokenizer_src=src)


def _read_header(path: str) -> dict:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    return header


def _optional_json(text: Optional[str]) -> Optional[dict]:
    """An optional JSON metadata entry (e.g. "smoothing"); None when absent or unreadable (informative only)."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def load_info(model_dir: str) -> dict:
    """Summary of a finequant model directory (or model.safetensors file) for `finequant info`."""
    path = model_dir
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    header = _read_header(path)
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a finequant model file (metadata format is "
                         f"{meta.get('format')!r})")
    try:
        config = json.loads(meta["config"])
        quant = {m: LinearQuant.from_json(e) for m, e in json.loads(meta["quantization"]).items()}
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: bad finequant metadata: {e}") from None
    tensor_bytes = 0
    fp32_bytes = 0  # the same tensors as fp32, quantized weights counted unpacked
    for name, info in header.items():
        shape, dtype = info["shape"], info["dtype"]
        numel = 1
        for d in shape:
            numel *= d
        tensor_bytes += numel * _DTYPE_BYTES.get(dtype, 0)
        module, _, leaf = name.rpartition(".")
        lq = quant.get(module)
        if lq is not None and lq.weight_bits and leaf in ("weight_scale", "weight_zero_point"):
            continue  # quantization overhead, not part of the fp32 model
        if lq is not None and lq.weight_bits == 4 and leaf == "weight":
            numel *= 2
        fp32_bytes += numel * 4
    file_size = os.path.getsize(path)
    return {
        "path": path,
        "format_version": meta.get("format_version"),
        "architecture": meta.get("architecture"),
        "scheme": meta.get("scheme"),
        "smoothing": _optional_json(meta.get("smoothing")),
        "distillation": _optional_json(meta.get("distillation")),
        "config": config,
        "num_layers": hf.num_layers(config) if any(k in config for k in ("num_hidden_layers", "n_layer", "encoder_layers"))
        else None,
        "linears": quant,
        "num_tensors": len(header),
        "tensor_bytes": tensor_bytes,
        "fp32_bytes": fp32_bytes,
        "file_size": file_size,
        "compression": fp32_bytes / tensor_bytes if tensor_bytes else float("nan"),
    }
