"""Quantization schemes: the names users type ("w8a8", "w4/8a8", ...) resolved per Linear.

A scheme says, for each part of a transformer block (qkv, attn_out, fc1, fc2), how many bits the
weight and the activations get, whether each side is symmetric, and which tile one weight scale
covers (DESIGN.md section 2). `QuantScheme.for_linear` turns that into a concrete `LinearQuant`
for a weight of shape [N, K]. An encoder-decoder's stacks ("encoder", "decoder") may each get their
own scheme (`stacks`), e.g. the INT4 paper's W4A4 encoder with a W8A8 decoder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

PARTS = ("qkv", "attn_out", "fc1", "fc2")  # the block GEMMs, quantized by default
# a decoder's LM head: opt-in here (it sees every logit; `default_parts` adds it for schemes with integer
# activations); INT8 per channel, or INT4 (head_bits=4; `default_head_bits` says which `quantize` picks)
HEAD = "head"
KNOWN_PARTS = PARTS + (HEAD,)
ATTENTION_PARTS = ("qkv", "attn_out")
MLP_PARTS = ("fc1", "fc2")
SCHEME_NAMES = ("fp32", "bf16", "w8a16", "w4a16", "w8a8", "w4a8", "w4/8a8", "w4/8a16", "w4a4")
SCALE_DTYPES = ("fp32", "fp16")  # weight scales: any fp32 value, or rounded to fp16 values (DESIGN.md section 2)
STACKS = ("encoder", "decoder")  # the stacks of an encoder-decoder model

DEFAULT_INT4_KBLOCK = 32
# An INT4 LM head's default K-blocks: with GPTQ rounding (lkd.round_head) SmolLM2-135M's perplexity cost of the
# head went +5.1% -> +3.5% from blocks of 32 to 16, for 0.625 instead of 0.5625 bytes per weight (DESIGN.md 6).
HEAD_INT4_KBLOCK = 16

# "w4a8", "w4/8a8" (MLP bits / attention bits), "w8a16"; a16 and a32 mean floating-point activations.
_NAME_RE = re.compile(r"^w(4|8)(?:/(4|8))?a(4|8|16|32)$")

Grouping = Union[None, str, Tuple[str, int]]


@dataclass(frozen=True)
class LinearQuant:
    """How one Linear is quantized. weight_bits / act_bits 0 mean floating point."""

    part: str
    weight_bits: int = 0
    weight_symmetric: bool = True
    tile: Optional[Tuple[int, int]] = None  # (rows, cols) covered by one weight scale
    act_bits: int = 0
    act_symmetric: bool = True
    rotation: int = 0  # block-Hadamard input rotation block size (finequant.rotate), 0: none
    scale_dtype: str = "fp32"  # "fp16": weight scales rounded to fp16 values (stored as fp32)

    @property
    def half_scales(self) -> bool:
        return self.scale_dtype == "fp16"

    def to_json(self) -> dict:
        """The entry of the model file's "quantization" metadata (docs/model-format.md)."""
        entry = {"part": self.part, "weight_bits": self.weight_bits,
                 "weight_symmetric": self.weight_symmetric}
        if self.weight_bits:
            entry["tile"] = [int(self.tile[0]), int(self.tile[1])]
        entry["act_bits"] = self.act_bits
        entry["act_symmetric"] = self.act_symmetric
        if self.rotation:
            entry["rotation"] = int(self.rotation)
        if self.weight_bits and self.half_scales:
            entry["scale_dtype"] = self.scale_dtype
        return entry

    @classmethod
    def from_json(cls, entry: dict) -> "LinearQuant":
        tile = entry.get("tile")
        return cls(part=entry["part"], weight_bits=int(entry["weight_bits"]),
                   weight_symmetric=bool(entry.get("weight_symmetric", True)),
                   tile=tuple(tile) if tile else None, act_bits=int(entry.get("act_bits", 0)),
                   act_symmetric=bool(entry.get("act_symmetric", True)), rotation=int(entry.get("rotation", 0)),
                   scale_dtype=str(entry.get("scale_dtype", "fp32")))


def _check_grouping(grouping: Grouping) -> Grouping:
    if grouping is None or grouping in ("tensor", "channel"):
        return grouping
    if (isinstance(grouping, tuple) and len(grouping) == 2 and grouping[0] in ("rows", "kblock")
            and isinstance(grouping[1], int) and not isinstance(grouping[1], bool)):
        if grouping[1] < 1:
            raise ValueError(f"{grouping[0]} size must be positive, got {grouping[1]}")
        return grouping
    raise ValueError(f"unknown grouping {grouping!r}: expected None, 'tensor', 'channel', "
                     "('rows', groups) or ('kblock', size)")


@dataclass(frozen=True)
class QuantScheme:
    """A parsed scheme; build it with `parse_scheme`."""

    name: str
    attn_weight_bits: int = 0
    mlp_weight_bits: int = 0
    act_bits: int = 0
    weight_symmetric: bool = True
    act_symmetric: bool = True
    grouping: Grouping = None
    parts: Tuple[str, ...] = PARTS
    float_dtype: str = "fp32"  # storage of the floating-point tensors: "fp32" or "bf16"
    head_bits: int = 8  # the LM head's weight bits when "head" is in parts: 8 (per channel) or 4 (grouping)
    rotation: int = 0  # block-Hadamard input rotation of the quantized block GEMMs (finequant.rotate), 0: none
    head_rotation: int = 0  # the same for a quantized LM head's input (the final norm's output), 0: none
    scale_dtype: str = "fp32"  # of every quantized weight's scales: "fp32" or "fp16" (SCALE_DTYPES)
    # encoder-decoder models: (stack, scheme) pairs whose scheme replaces this one for that stack's Linears
    stacks: Tuple[Tuple[str, "QuantScheme"], ...] = ()

    @property
    def is_quantized(self) -> bool:
        return bool(self.attn_weight_bits or self.mlp_weight_bits) or any(s.is_quantized for _, s in self.stacks)

    @property
    def int4_head(self) -> bool:
        """A decoder's LM head is quantized to INT4 (head in the parts, head_bits 4)."""
        return HEAD in self.parts and self.head_bits == 4

    @property
    def has_int4_weights(self) -> bool:
        return (4 in (self.attn_weight_bits, self.mlp_weight_bits) or self.int4_head
                or any(s.has_int4_weights for _, s in self.stacks))

    def _tile(self, bits: int, n: int, k: int, part: str) -> Tuple[int, int]:
        g = self.grouping
        if g is None:  # INT8: per output channel; INT4: K-blocks (per-row INT4 loses too much)
            return (1, k) if bits == 8 else (1, min(DEFAULT_INT4_KBLOCK, k))
        if g == "tensor":
            return (n, k)
        if g == "channel":
            return (1, k)
        kind, size = g
        if kind == "rows":
            if n % size:
                raise ValueError(f"group count {size} does not divide the {n} output rows of {part}")
            return (n // size, k)
        if size > k:
            raise ValueError(f"kblock {size} is larger than the {k} input columns of {part}")
        return (1, size)

    def for_linear(self, part: str, n: int, k: int, stack: Optional[str] = None) -> LinearQuant:
        """Concrete quantization of a Linear of `part` with weight [n, k]; `stack` ("encoder" or
        "decoder", encoder-decoder models) picks that stack's scheme when it has one."""
        for name, sub in self.stacks:
            if name == stack:
                return sub.for_linear(part, n, k)
        if part not in KNOWN_PARTS:
            raise ValueError(f"unknown part {part!r}: expected one of {', '.join(KNOWN_PARTS)}")
        if n < 1 or k < 1:
            raise ValueError(f"weight shape [{n}, {k}] of {part} is empty")
        bits = self.attn_weight_bits if part in ATTENTION_PARTS else self.mlp_weight_bits
        if not bits or part not in self.parts:
            return LinearQuant(part=part)
        if part == HEAD:  # INT8 per channel (or INT4: K-blocks of 16 or the scheme's grouping), INT8 tokens
            if self.head_bits == 8:
                tile = (1, k)
            else:
                tile = (1, min(HEAD_INT4_KBLOCK, k)) if self.grouping is None else self._tile(4, n, k, part)
            if self.head_rotation:
                from .rotate import check_block

                check_block(self.head_rotation, k, part)
            return LinearQuant(part=part, weight_bits=self.head_bits, weight_symmetric=self.weight_symmetric,
                               tile=tile, act_bits=8 if self.act_bits else 0, act_symmetric=self.act_symmetric,
                               rotation=self.head_rotation, scale_dtype=self.scale_dtype)
        if self.rotation:
            from .rotate import check_block

            check_block(self.rotation, k, part)
        return LinearQuant(part=part, weight_bits=bits, weight_symmetric=self.weight_symmetric,
                           tile=self._tile(bits, n, k, part), act_bits=self.act_bits,
                           act_symmetric=self.act_symmetric, rotation=self.rotation, scale_dtype=self.scale_dtype)

    def describe(self) -> str:
        """The string stored as metadata "scheme", e.g. "w8a8 asym kblock=64"."""
        words = [self.name]
        if self.is_quantized:
            if not self.weight_symmetric and (not self.act_symmetric or not self.act_bits):
                words.append("asym")
            elif not self.weight_symmetric:
                words.append("w-asym")
            elif not self.act_symmetric and self.act_bits:
                words.append("a-asym")
            g = self.grouping
            if g == "tensor":
                words.append("per-tensor")
            elif g == "channel":
                words.append("per-channel")
            elif isinstance(g, tuple):
                words.append(f"{'group' if g[0] == 'rows' else 'kblock'}={g[1]}")
            if tuple(self.parts) != PARTS:
                words.append("parts=" + ",".join(self.parts))
            if HEAD in self.parts and self.head_bits != 8:
                words.append(f"head=int{self.head_bits}")
            if self.rotation:
                words.append(f"rotate={self.rotation}")
            if HEAD in self.parts and self.head_rotation:
                words.append(f"head-rotate={self.head_rotation}")
            if self.scale_dtype != "fp32":
                words.append(f"scales={self.scale_dtype}")
        words += [f"{stack}={sub.name}" for stack, sub in self.stacks]
        return " ".join(words)


def default_parts(name: str, family: Optional[str] = None) -> Optional[Tuple[str, ...]]:
    """The parts `finequant quantize` gives scheme `name` when --parts is not given: schemes with integer
    activations quantize a decoder's LM head too (INT8 per channel or INT4 as `default_head_bits` says, its
    input rotated: `quantize` sets head_rotation): SmolLM2-135M decodes ~1.5-2x faster (its fp32 head is 113 MB
    a step) for +0.15% perplexity at W8A8 and none at W4A8 with the INT8 head (docs/DESIGN.md 6). None (the
    block GEMMs) otherwise, for an encoder ("bert"), which has no head, and for W8A8 encoder-decoder models,
    where the head's cost was never measured; family None: not yet known."""
    named = parse_scheme(name)
    if family == "bert" or not (named.act_bits and named.is_quantized):
        return None
    from .hf import SEQ2SEQ_FAMILIES

    if family in SEQ2SEQ_FAMILIES and not named.has_int4_weights:
        return None
    return PARTS + (HEAD,)


def default_head_bits(name: str) -> int:
    """The LM head's weight bits `finequant quantize` gives scheme `name` when --head-bits is not given (with the
    head in its parts): 4 when every block GEMM has INT4 weights and the activations are integers (w4a8, w4a4),
    so that a decode step reads INT4 for all its quantized weights; 8 otherwise (w4/8a8 keeps INT8 where its
    attention does). SmolLM2-135M W4A8, the INT4 head GPTQ-rounded with its input rotated: perplexity +1.0% /
    +1.4% (Emma / Moby Dick) over the INT8 head, decode 1.55x W8A8 instead of 1.39x (docs/DESIGN.md 6).
    `quantize` keeps 8 where it cannot GPTQ-round the head (no torch, encoder-decoder models)."""
    named = parse_scheme(name)
    return 4 if named.act_bits and named.attn_weight_bits == named.mlp_weight_bits == 4 else 8


def parse_scheme(name: str, *, weight_symmetric: bool = True, act_symmetric: bool = True,
                 grouping: Grouping = None, parts=None, head_bits: int = 8, encoder: Optional[str] = None,
                 decoder: Optional[str] = None, rotation: int = 0, head_rotation: int = 0,
                 scale_dtype: str = "fp32") -> QuantScheme:
    """Parse a scheme name (see SCHEME_NAMES; generally w(4|8)[/(4|8)]a(4|8|16|32)).

    "wA/B" gives the MLP (fc1, fc2) A-bit weights and the attention (qkv, attn_out) B-bit weights.
    `parts` names the GEMMs to quantize (default PARTS; the others stay floating point); adding
    "head" also quantizes a decoder's LM head (INT8 weights per channel, INT8 tokens); head_bits=4
    makes its weights INT4, grouped like the scheme's INT4 weights (default K-blocks of 32): half the
    bytes of the largest GEMM of a small model's decode step.

    `encoder` / `decoder` (encoder-decoder models): a scheme name for that stack's Linears instead
    of `name`, with the same options; e.g. parse_scheme("w8a8", encoder="w4a4") is the INT4 paper's
    W4A4 encoder + W8A8 decoder. "fp32" leaves a stack floating point (bf16 is a storage choice of
    the whole file, not of a stack). The LM head follows `name`.

    `rotation` (a power of two, 0: none): rotate the inputs of the quantized block GEMMs (not the LM
    head) by a block-Hadamard matrix of that block size, and their weights to match (finequant.rotate);
    the block must divide every such GEMM's input width.

    `head_rotation` (a power of two, 0: none): the same for the LM head's input, which must be a quantized
    head with integer activations ("head" in `parts`, head_bits 8 or 4); the block must divide its input width.

    `scale_dtype` "fp16": every weight scale is rounded to an fp16 value before the integers are
    computed from it (DESIGN.md section 2); kernels then keep K-block scales in half the bytes (at
    K-blocks of 32 the fp32 scales are a fifth of what an INT4 decode step reads).
    """
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
    if rotation:
        from .rotate import check_block

        check_block(rotation, rotation)
    main = replace(_parse_one(name, weight_symmetric=weight_symmetric, act_symmetric=act_symmetric,
                              grouping=grouping, parts=parts, head_bits=head_bits), rotation=rotation,
                   scale_dtype=scale_dtype)
    if not main.is_quantized:
        main = replace(main, rotation=0) if not rotation else None
        if main is None:
            raise ValueError(f"rotation applies to quantized Linears; {name} quantizes none")
    if head_rotation:
        from .rotate import check_block

        check_block(head_rotation, head_rotation)
        if HEAD not in main.parts or not main.act_bits:
            raise ValueError("head_rotation applies to a quantized LM head with integer activations "
                             "(head in parts, a w..a4/a8 scheme)")
        main = replace(main, head_rotation=head_rotation)
    stacks = []
    for stack, sub in (("encoder", encoder), ("decoder", decoder)):
        if sub is None:
            continue
        if not isinstance(sub, str) or sub.strip().lower() == "bf16":
            raise ValueError(f"{stack} scheme must be fp32 or a w..a.. scheme, got {sub!r}")
        block_parts = tuple(p for p in main.parts if p != HEAD)
        if not block_parts:
            raise ValueError(f"parts name no block GEMM for the {stack} scheme to quantize")
        stacks.append((stack, replace(_parse_one(sub, weight_symmetric=weight_symmetric, act_symmetric=act_symmetric,
                                                 grouping=grouping, parts=block_parts, head_bits=8),
                                      rotation=rotation, scale_dtype=scale_dtype)))
    return replace(main, stacks=tuple(stacks)) if stacks else main


def _parse_one(name: str, *, weight_symmetric: bool, act_symmetric: bool, grouping: Grouping, parts,
               head_bits: int) -> QuantScheme:
    key = name.strip().lower()
    if parts is None:
        parts = PARTS
    else:
        if isinstance(parts, str):
            parts = [p.strip() for p in parts.split(",") if p.strip()]
        unknown = [p for p in parts if p not in KNOWN_PARTS]
        if unknown:
            raise ValueError(f"unknown part(s) {', '.join(map(repr, unknown))}: expected a subset "
                             f"of {', '.join(KNOWN_PARTS)}")
        if not parts:
            raise ValueError("parts must name at least one of " + ", ".join(KNOWN_PARTS))
        parts = tuple(p for p in KNOWN_PARTS if p in parts)  # canonical order, no duplicates
    grouping = _check_grouping(grouping)
    if head_bits not in (4, 8):
        raise ValueError(f"head_bits must be 4 or 8, got {head_bits!r}")
    if head_bits != 8 and HEAD not in parts:
        raise ValueError("head_bits applies to the LM head: add 'head' to parts")
    if key in ("fp32", "bf16"):
        return QuantScheme(name=key, float_dtype=key)
    m = _NAME_RE.match(key)
    if not m:
        raise ValueError(f"unknown scheme {name!r}: expected one of {', '.join(SCHEME_NAMES)} "
                         "(or generally w(4|8)[/(4|8)]a(4|8|16|32))")
    mlp_bits = int(m.group(1))
    attn_bits = int(m.group(2)) if m.group(2) else mlp_bits
    act = int(m.group(3))
    return QuantScheme(name=key, attn_weight_bits=attn_bits, mlp_weight_bits=mlp_bits,
                       act_bits=act if act in (4, 8) else 0, weight_symmetric=weight_symmetric,
                       act_symmetric=act_symmetric, grouping=grouping, parts=parts, head_bits=head_bits)
