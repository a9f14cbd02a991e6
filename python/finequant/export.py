"""Export a finequant model directory as a compressed-tensors checkpoint (DESIGN.md section 9).

compressed-tensors is the layout vLLM (and transformers) load quantized checkpoints from: the model's
usual Hugging Face tensor names, each quantized Linear stored as integers plus `weight_scale`, and a
`quantization_config` in config.json describing the schemes ("config_groups"). The export keeps the
integers and scales finequant chose, so the checkpoint dequantizes to exactly finequant's weights:

- weights with INT8 activations ("int-quantized"): `weight` int8 [N, K] (INT4 values too, unpacked),
  `weight_scale` [N, 1] (per channel) or [N, K / group] (groups along K);
- weight-only ("pack-quantized"): `weight_packed` int32 [N, ceil(K * bits / 32)] (values + 2^(bits-1),
  element i at bits i * bits of the little-endian stream), `weight_scale`, `weight_shape` [N, K], and
  for asymmetric weights `weight_zero_point` (signed: finequant's unsigned values - 2^(bits-1)) packed
  the same way along the output rows.

Activations of the exported scheme are quantized by the server at run time (dynamic, per token,
symmetric), as finequant does. What the format cannot say is refused with a message naming the
finequant field (ExportError): asymmetric activations (or weights beside quantized activations), INT4
activations, a Hadamard `rotation`, a K-block that does not divide the input width, and GPT-2's
quantized Conv1D layers (not Linear modules for compressed-tensors). ZeroQuant row groups are converted exactly: the scale of a
group of rows is repeated on each of its rows (same integers, same dequantized weight).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import hf
from .pack import unpack_int4
from .schemes import LinearQuant

FORMATS = ("compressed-tensors",)
INT_QUANTIZED = "int-quantized"
PACK_QUANTIZED = "pack-quantized"


class ExportError(ValueError):
    """The finequant model uses something the target format cannot express."""


@dataclass
class ExportReport:
    path: str
    format: str                                   # the checkpoint's compression format
    groups: Dict[str, dict]                       # config_groups as written
    ignore: List[str]                             # Linears left floating point
    notes: List[str] = field(default_factory=list)  # conversions made (all exact)


@dataclass(frozen=True)
class _Scheme:
    """One compressed-tensors scheme: the key of a config group."""

    weight_bits: int
    group_size: Optional[int]  # None: per output channel
    act_bits: int              # 0: weight-only
    weight_symmetric: bool = True  # False: a zero point per scale (weight-only schemes)

    @property
    def format(self) -> str:
        # compressed-tensors' own choice (compressors.format.infer_module_format): INT weights with
        # activation quantization are stored unpacked, weight-only ones packed into int32.
        return INT_QUANTIZED if self.act_bits else PACK_QUANTIZED

    def to_json(self) -> dict:
        weights = {"num_bits": self.weight_bits, "type": "int", "symmetric": self.weight_symmetric,
                   "group_size": self.group_size, "strategy": "group" if self.group_size else "channel",
                   "dynamic": False}
        acts = None
        if self.act_bits:
            acts = {"num_bits": self.act_bits, "type": "int", "symmetric": True, "group_size": None,
                    "strategy": "token", "dynamic": True}
        return {"weights": weights, "input_activations": acts, "output_activations": None}


def _hf_name(family: str, name: str) -> str:
    """Canonical finequant tensor name -> the name in the transformers task model's checkpoint."""
    if family == "gpt2" and name.split(".")[0] != "lm_head":
        return "transformer." + name
    return name  # llama / bart keep transformers' names; bert is stored as BertModel


def _is_conv1d(family: str, module: str) -> bool:
    return family == "gpt2" and (module + ".weight").endswith(hf._GPT2_CONV1D)


def _pack_int32(q: np.ndarray, bits: int) -> np.ndarray:
    """int8 values [N, K] of `bits` bits -> compressed-tensors' dense int32 packing [N, ceil(K*bits/32)]:
    offset to unsigned (+2^(bits-1)), element i at bit i*bits of a little-endian stream; padding is 0."""
    u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        if u.shape[1] % 2:
            u = np.pad(u, ((0, 0), (0, 1)))
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    elif bits != 8:
        raise ExportError(f"cannot pack {bits}-bit weights")
    pad = -u.shape[1] % 4
    if pad:
        u = np.pad(u, ((0, 0), (0, pad)))
    return np.ascontiguousarray(u).view("<i4").astype(np.int32)


def _scheme_of(module: str, lq: LinearQuant, n: int, k: int, notes: List[str]) -> _Scheme:
    """The compressed-tensors scheme for one quantized Linear, or ExportError naming the field."""
    where = f"{module} ({lq.part})"
    if lq.rotation:
        raise ExportError(f"{where}: rotation={lq.rotation} (block-Hadamard input rotation) cannot be expressed "
                          "in compressed-tensors: re-quantize with --no-rotate")
    if not lq.weight_symmetric and lq.act_bits:
        raise ExportError(f"{where}: weight_symmetric=false with INT{lq.act_bits} activations: vLLM's integer "
                          "GEMMs take symmetric weights (only weight-only schemes export zero points): re-quantize "
                          "with symmetric weights")
    if lq.act_bits and not lq.act_symmetric:
        raise ExportError(f"{where}: act_symmetric=false (asymmetric activations) cannot be expressed: the "
                          "exported schemes quantize activations symmetrically per token: re-quantize with --a-sym or --sym "
                          "(quantize's default gives activations a zero point per token)")
    if lq.act_bits not in (0, 8):
        raise ExportError(f"{where}: act_bits={lq.act_bits}: only INT8 (or floating-point) activations are "
                          "exported; no vLLM kernel serves INT4 activations")
    rows, cols = lq.tile
    if cols >= k:
        group = None
    elif k % cols:
        raise ExportError(f"{where}: tile cols={cols} (K-block) does not divide the input width K={k}: "
                          "compressed-tensors groups must tile K exactly")
    else:
        group = cols
    if rows > 1:
        notes.append(f"row groups of {rows} rows written as per-row scales (same integers, exact)")
    return _Scheme(lq.weight_bits, group, lq.act_bits, lq.weight_symmetric)


def _targets(groups: Dict[_Scheme, List[str]], ignore: List[str]) -> Dict[_Scheme, List[str]]:
    """Targets of each group. One group: the class name "Linear" (what vLLM and llm-compressor expect),
    with every floating-point Linear in `ignore`. Several: one regex per module name with its layer
    index generalized, kept only when it matches no module of another group; else the exact name."""
    if len(groups) == 1:
        return {s: ["Linear"] for s in groups}
    out = {}
    for scheme, modules in groups.items():
        others = [m for s, ms in groups.items() if s != scheme for m in ms] + ignore
        patterns = []
        for m in modules:
            general = "^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(m)) + "$"
            if any(re.match(general, o) for o in others):
                general = "^" + re.escape(m) + "$"
            if general not in patterns:
                patterns.append(general)
        out[scheme] = ["re:" + p for p in patterns]
    return out


def _validate(quantization_config: dict) -> None:
    """Parse the written quantization_config with compressed-tensors itself when it is installed (the
    `export` extra), so a config its loaders would reject is never written."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return
    QuantizationConfig.model_validate(quantization_config)


def _read_model(model_dir: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = model_dir if os.path.isfile(model_dir) else os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (expected a finequant model directory)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "finequant":
        raise ValueError(f"{path} is not a finequant model file (metadata format is {meta.get('format')!r})")
    return load_file(path), meta


def build(model_dir: str) -> Tuple[Dict[str, torch.Tensor], dict, ExportReport]:
    """The exported tensors, config.json (with quantization_config) and a report, without writing."""
    tensors, meta = _read_model(model_dir)
    family = meta.get("architecture")
    config = json.loads(meta["config"])
    records = {m: LinearQuant.from_json(e) for m, e in json.loads(meta["quantization"]).items()}
    notes: List[str] = []
    out: Dict[str, torch.Tensor] = {}
    groups: Dict[_Scheme, List[str]] = {}
    ignore: List[str] = []
    for module, lq in records.items():
        name = _hf_name(family, module)
        if not lq.weight_bits:
            ignore.append(name)
            continue
        if _is_conv1d(family, module):
            raise ExportError(f"{module} ({lq.part}) is quantized, but GPT-2's projections are transformers Conv1D "
                              "modules, which compressed-tensors only quantizes as nn.Linear: export GPT-2 with "
                              "these parts floating point (e.g. --parts head) or use a Llama-family model")
        q = tensors.pop(module + ".weight").numpy()
        n, k = q.shape[0], q.shape[1] * (2 if lq.weight_bits == 4 else 1)
        scheme = _scheme_of(module, lq, n, k, notes)
        zero_point = tensors.pop(module + ".weight_zero_point", None)
        signed = lq.weight_symmetric and lq.weight_bits == 8
        if (zero_point is None) != lq.weight_symmetric or q.dtype != np.dtype(np.int8 if signed else np.uint8):
            raise ExportError(f"{module}: {q.dtype} weights{' with' if zero_point is not None else ' without'} zero "
                              f"points do not match its metadata (weight_symmetric={lq.weight_symmetric})")
        if lq.weight_bits == 4:
            q = unpack_int4(q, is_signed=lq.weight_symmetric)
        offset = 0 if lq.weight_symmetric else 1 << (lq.weight_bits - 1)
        if offset:  # finequant's unsigned integers and zero points -> compressed-tensors' signed ones
            q = (q.astype(np.int16) - offset).astype(np.int8)
            zero_point = (zero_point.to(torch.int16) - offset).to(torch.int8)
        scale = tensors.pop(module + ".weight_scale").to(torch.float32)
        rows = lq.tile[0]
        scale = scale.repeat_interleave(rows, dim=0) if rows > 1 else scale  # [N, groups]
        if zero_point is not None:  # packed along the output rows, as compressed-tensors stores them
            zero_point = zero_point.repeat_interleave(rows, dim=0) if rows > 1 else zero_point
            out[name + ".weight_zero_point"] = torch.from_numpy(
                np.ascontiguousarray(_pack_int32(zero_point.numpy().T, lq.weight_bits).T))
        if scheme.format == INT_QUANTIZED:
            out[name + ".weight"] = torch.from_numpy(np.ascontiguousarray(q, dtype=np.int8))
        else:
            out[name + ".weight_packed"] = torch.from_numpy(_pack_int32(q, lq.weight_bits))
            out[name + ".weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        out[name + ".weight_scale"] = scale.contiguous()
        groups.setdefault(scheme, []).append(name)
    for cname, t in tensors.items():
        if _is_conv1d(family, cname[: -len(".weight")] if cname.endswith(".weight") else cname) and t.dim() == 2:
            t = t.t()  # back to Conv1D's [in, out]
        out[_hf_name(family, cname)] = t.contiguous()
    # Linears outside finequant's blocks stay floating point and must be named in ignore (vLLM needs
    # every Linear matched by a target or ignored).
    if family in ("gpt2", "llama", "bart") and "lm_head" not in records:
        ignore.append("lm_head")
    if family == "bert" and "pooler.dense.weight" in out:
        ignore.append("pooler.dense")
    if not groups:
        raise ExportError(f"the model quantizes no Linear (scheme {meta.get('scheme')!r}): nothing to export as "
                          "compressed-tensors")
    targets = _targets(groups, ignore)
    formats = {s.format for s in groups}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    config_groups = {}
    for i, (scheme, _) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        g = {"targets": targets[scheme], **scheme.to_json()}
        if fmt == "mixed-precision":
            g["format"] = scheme.format
        config_groups[f"group_{i}"] = g
    config = dict(config)
    if any(n.startswith("lm_head.") for n in out):
        config["tie_word_embeddings"] = False  # a quantized (or untied) head is its own tensor
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    _validate(config["quantization_config"])
    notes = [f"{note} ({count} Linear{'s' if count > 1 else ''})" for note, count in Counter(notes).items()]
    report = ExportReport(path="", format=fmt, groups=config_groups, ignore=ignore, notes=notes)
    return out, config, report


def export(model_dir: str, out_dir: str, fmt: str = "compressed-tensors", overwrite: bool = False) -> ExportReport:
    """Write out_dir/model.safetensors, config.json (with quantization_config) and the tokenizer files.
    The directory is written under a temporary name and moved into place only when complete."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    from safetensors.torch import save_file

    from .modelfile import check_output_dir, write_dir_atomically

    check_output_dir(out_dir, overwrite)
    tensors, config, report = build(model_dir)
    src = model_dir if os.path.isdir(model_dir) else os.path.dirname(model_dir)

    def write(tmp: str) -> None:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for fname in hf.tokenizer_files(src):
            shutil.copyfile(os.path.join(src, fname), os.path.join(tmp, fname))

    write_dir_atomically(out_dir, write)
    report.path = os.path.abspath(out_dir)
    return report
