"""The torch simulation of a finequant model: the transformers model with each Linear of the
blocks replaced by a QuantLinear (fake-quantized weight, token-wise fake-quantized input), exactly
as a finequant model file records it. It is the reference the integer engine is checked against,
and the student LKD trains."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .quantize import QuantLinear
from .schemes import LinearQuant

PREFIXES = ("", "transformer.", "bert.", "model.")  # task-model prefixes the file strips


def _find_module(model: nn.Module, name: str):
    modules = dict(model.named_modules())
    for prefix in PREFIXES:
        if prefix + name in modules:
            return prefix + name, modules[prefix + name]
    raise KeyError(f"module {name!r} of the model file is not in the torch model")


def _linear_weight(module: nn.Module) -> torch.Tensor:
    # GPT-2's Conv1D stores [in, out]; nn.Linear and the model file use [out, in].
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    return module.weight


def read_records(model_dir: str) -> dict:
    """module name -> LinearQuant, from a finequant model directory's metadata."""
    from safetensors import safe_open

    path = model_dir if os.path.isfile(model_dir) else os.path.join(model_dir, "model.safetensors")
    with safe_open(path, "np") as f:
        meta = f.metadata()
    return {name: LinearQuant.from_json(entry) for name, entry in json.loads(meta["quantization"]).items()}


def simulate(model: nn.Module, records: dict) -> nn.Module:
    """Replace, in place, every Linear named in `records` by its QuantLinear simulation."""
    for name, spec in records.items():
        full, module = _find_module(model, name)
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(_linear_weight(module), module.bias, spec))
    return model
