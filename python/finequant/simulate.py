"""The torch simulation of a finequant model: the transformers model with each Linear of the
blocks replaced by a QuantLinear (fake-quantized weight, token-wise fake-quantized input), exactly
as a finequant model file records it. It is the reference the integer engine is checked against,
and the student LKD trains."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from .quantize import fake_quant_activation, fake_quant_weight
from .rotate import hadamard_blocks, rotate_weight
from .schemes import LinearQuant

PREFIXES = ("", "transformer.", "bert.", "model.")  # task-model prefixes the file strips


class QuantLinear(nn.Module):
    """Simulated quantized Linear: weight fake-quantized once, input rows fake-quantized per call.

    This is the fp32 reference of what the integer engine computes; results agree up to fp32
    accumulation order.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearQuant):
        super().__init__()
        weight = weight.detach().to(torch.float32)
        if spec.rotation:
            weight = rotate_weight(weight, spec.rotation)
        if spec.weight_bits:
            weight = fake_quant_weight(weight, spec.weight_bits, spec.weight_symmetric, spec.tile, spec.half_scales)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        self.spec = spec

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearQuant) -> "QuantLinear":
        return cls(linear.weight, linear.bias, spec)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.spec.rotation:
            x = hadamard_blocks(x, self.spec.rotation)
        if self.spec.act_bits:
            x = fake_quant_activation(x, self.spec.act_bits, self.spec.act_symmetric)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in={self.in_features}, out={self.out_features}, w{s.weight_bits or 32}"
                f"{'' if s.weight_symmetric else ' asym'} tile={s.tile}, a{s.act_bits or 32}"
                f"{'' if s.act_symmetric else ' asym'}{f' rotate={s.rotation}' if s.rotation else ''}")


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
