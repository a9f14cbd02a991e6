"""Write and inspect finequant model files (docs/model-format.md, format_version 1).

Torch-free: the tensors are NumPy arrays (bfloat16 ones as BF16Tensor), written by a small safetensors
writer of our own, so `finequant quantize` needs no torch and its files are byte-identical run to run
(docs/DESIGN.md section 2, "Quantizing without torch")."""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

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


@dataclass(frozen=True)
class BF16Tensor:
    """A bfloat16 tensor of a model file, held as the uint16 bits of its values (NumPy has no bfloat16)."""

    bits: np.ndarray

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.bits.shape)

    def float32(self) -> np.ndarray:
        return hf.bf16_to_float32(self.bits)


def float32_to_bf16(x: np.ndarray) -> BF16Tensor:
    """fp32 -> bfloat16 rounded to nearest even, as torch's .to(torch.bfloat16) rounds (NaN -> 0x7FC0)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return BF16Tensor(np.where(np.isnan(x), np.uint16(0x7FC0), bits))


def _as_float32(t) -> np.ndarray:
    """A model tensor (NumPy array or torch tensor) as a contiguous fp32 NumPy array."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    import torch

    return t.detach().to(torch.float32).cpu().contiguous().numpy()


def quantize_model(model: hf.HFModel, scheme: QuantScheme, progress: bool = False,
                   errors: Optional[dict] = None) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Quantize the Linears of the transformer blocks; returns (tensors, metadata) ready to save.

    model.tensors may be NumPy arrays or torch tensors: the same NumPy code quantizes either
    (finequant.quantize). The tensors returned are NumPy arrays (fp32, I8, U8; INT4 packed into U8
    along K) and BF16Tensor for bf16 storage. If `errors` is a dict it receives module -> relative
    weight error.
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
    bf16 = scheme.float_dtype == "bf16"
    out: Dict[str, Any] = {}
    records: Dict[str, dict] = {}
    items = list(parts.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="quantize", unit="linear", leave=False)
    for module, part in items:
        w = weights[module]
        if w is None:
            raise ValueError(f"model has no weight for Linear {module}")
        w = _as_float32(w)
        if w.ndim != 2:
            raise ValueError(f"{module}.weight has shape {tuple(w.shape)}, expected 2-D")
        n, k = w.shape
        lq = scheme.for_linear(part, n, k, stack=hf.stack_of(model.family, module))
        if lq.rotation:  # the file holds W H; the engine rotates the inputs (finequant.rotate)
            w = rotate_weight(w, lq.rotation)
        if lq.weight_bits:
            if lq.weight_bits == 4 and k % 2:
                raise ValueError(f"INT4 packing needs an even number of columns: {module} has K={k}")
            qt = quantize_tensor(w, lq.weight_bits, lq.weight_symmetric, lq.tile, lq.half_scales)
            out[module + ".weight"] = pack_int4(qt.q) if lq.weight_bits == 4 else qt.q
            out[module + ".weight_scale"] = qt.scale
            if qt.zero_point is not None:
                out[module + ".weight_zero_point"] = np.ascontiguousarray(qt.zero_point)
            if errors is not None:
                errors[module] = relative_error(w, dequantize(qt))
        records[module] = lq.to_json()
    for name, t in model.tensors.items():
        if name in out:
            continue
        # Linear biases stay F32 in every scheme (docs/model-format.md); the rest follows the scheme.
        is_bias = name.endswith(".bias") and name[:-5] in records
        t = _as_float32(t)
        out[name] = float32_to_bf16(t) if bf16 and not is_bias else t
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.family,
        "config": json.dumps(model.config, sort_keys=True),
        "scheme": scheme.describe(),
        "quantization": json.dumps(records),
    }
    return out, metadata


# safetensors dtypes we write, in the order its own writer lays tensors out (larger elements first, so
# every tensor starts aligned to its element size), then by name.
_WRITE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL")
_WRITE_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                 "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
                 "bool": "BOOL"}


def _storable(name: str, t) -> Tuple[str, np.ndarray]:
    """(safetensors dtype, little-endian contiguous NumPy array of the bytes to write) of a tensor."""
    if isinstance(t, BF16Tensor):
        return "BF16", np.ascontiguousarray(t.bits, dtype="<u2")
    if not isinstance(t, np.ndarray):  # a torch tensor
        import torch

        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return "BF16", np.ascontiguousarray(t.view(torch.int16).numpy().view(np.uint16), dtype="<u2")
        t = t.numpy()
    dtype = _WRITE_DTYPES.get(t.dtype.name)
    if dtype is None:
        raise ValueError(f"tensor {name}: cannot store dtype {t.dtype} in a model file")
    return dtype, np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("<"))


def write_safetensors(path: str, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file laid out as the safetensors library lays it out (header JSON padded with
    spaces to 8 bytes, data in _WRITE_ORDER then name order), with the metadata keys sorted: the same
    tensors and metadata give the same bytes."""
    items = sorted(((name,) + _storable(name, t) for name, t in tensors.items()),
                   key=lambda e: (_WRITE_ORDER.index(e[1]), e[0]))
    header: Dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, dtype, a in items:
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, a in items:
            f.write(a.reshape(-1).view(np.uint8).data)


def save(out_dir: str, tensors: Dict[str, Any], metadata: Dict[str, str],
         tokenizer_src: Optional[str] = None) -> str:
    """Write out_dir/model.safetensors and copy the tokenizer files of tokenizer_src. Tensors: NumPy
    arrays, BF16Tensor or torch tensors."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    tmp = path + ".tmp"
    write_safetensors(tmp, tensors, metadata)
    os.replace(tmp, path)  # never leave a half-written model file behind
    if tokenizer_src:
        for name in hf.tokenizer_files(tokenizer_src):
            src = os.path.join(tokenizer_src, name)
            if os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(src, os.path.join(out_dir, name))
    return path


def check_output_dir(out_dir: str, overwrite: bool = False) -> None:
    """Refuse an output directory that exists and is not empty, unless told to replace it. A killed
    writer's set-aside previous directory is put back first (_clear_dead_leftovers), so it counts too."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    if os.path.isdir(parent):
        _clear_dead_leftovers(parent, name)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty: pass --overwrite to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # gone, or no pid at all
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clear_dead_leftovers(parent: str, name: str) -> None:
    """Clean up after writers (PID, this machine) that are gone, e.g. killed by SIGKILL or a power loss:
    their `.NAME.partial-PID-*` directories are removed; a `.NAME.old-PID-*` directory holds the previous
    NAME, which is moved back if NAME is missing (the writer died between its two renames), else removed.
    A live writer's directories are kept."""
    out_dir = os.path.join(parent, name)
    for entry in sorted(os.listdir(parent)):
        for kind in (".partial-", ".old-"):
            prefix = f".{name}{kind}"
            pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) else ""
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            path = os.path.join(parent, entry)
            if kind == ".old-" and not os.path.exists(out_dir) and os.path.isdir(os.path.join(path, name)):
                os.rename(os.path.join(path, name), out_dir)
            shutil.rmtree(path, ignore_errors=True)


def write_dir_atomically(out_dir: str, write) -> None:
    """Call write(tmp) on a new directory beside out_dir, then move it into place (replacing out_dir if
    it exists): an interrupted or failed run never leaves a half-written directory at out_dir's name, and
    the previous one is put back if the move fails. Leftovers of killed earlier runs are removed first."""
    import tempfile

    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    _clear_dead_leftovers(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=parent)
    old = None
    try:
        write(tmp)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and not os.path.exists(out_dir) and os.path.exists(os.path.join(old, name)):
            os.rename(os.path.join(old, name), out_dir)  # put the previous directory back
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)


def publish(out_dir: str, tensors: Dict[str, Any], metadata: Dict[str, str],
            tokenizer_src: Optional[str] = None) -> str:
    """Write a complete model directory atomically (write_dir_atomically). Returns the model file's path."""
    write_dir_atomically(out_dir, lambda tmp: save(tmp, tensors, metadata, tokenizer_src))
    return os.path.join(os.path.abspath(out_dir), MODEL_FILE)


def quantize_folder(src: str, out_dir: str, scheme: QuantScheme, progress: bool = False,
                    errors: Optional[dict] = None) -> str:
    """Read a Hugging Face folder, quantize it with `scheme` and write a finequant model dir."""
    model = hf.load(src, tensors="numpy")
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
