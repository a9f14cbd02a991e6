"""Block-Hadamard input rotation (QuaRot-style incoherence processing) of a Linear, y = x W^T:

    y = (x H) (W H)^T      with H = blockdiag(H_b, ..., H_b), H_b the b x b Hadamard matrix / sqrt(b)

H is orthogonal and symmetric, so the product is unchanged in exact arithmetic, but a few outlier input
channels are spread over the b channels of their block: token-wise INT4 activations (one scale per
token over all K channels) lose far less to them, and the rotated weight is better conditioned for
INT4 groups too (docs/DESIGN.md section 2, "Input rotation"). The weight is rotated once when the
model file is written; the engine rotates each input row at run time (a fast Walsh-Hadamard
transform, K log2(b) adds per token) before quantizing it.

`hadamard_blocks` is THE definition of the run-time transform: butterfly stages h = 1, 2, 4, ..., b/2
pairing element i (bit h of its index in the block clear) with i + h as (a + c, a - c), in fp32, then
one multiply by the fp32 value of 1/sqrt(b). The C++ kernels do exactly these operations, so the
simulation and the engine agree to the bit.
"""
from __future__ import annotations

import functools
import math

import numpy as np

MAX_BLOCK = 4096


def check_block(block: int, k: int, what: str = "a Linear") -> int:
    """`block` if it is a valid rotation block for K = k input columns; ValueError otherwise."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1) or block > MAX_BLOCK:
        raise ValueError(f"rotation block must be a power of two in [2, {MAX_BLOCK}], got {block!r}")
    if k % block:
        raise ValueError(f"rotation block {block} does not divide the {k} input columns of {what}")
    return block


DEFAULT_BLOCK = 64  # `finequant quantize --rotate` without a block, and its default for INT4 schemes
MIN_DEFAULT_BLOCK = 8


def default_block(widths) -> int:
    """The block `finequant quantize` rotates with unless told (docs/DESIGN.md section 6): the largest
    power of two up to DEFAULT_BLOCK that divides every input width in `widths`; 0 (no rotation) if
    that is below MIN_DEFAULT_BLOCK, where the outliers would spread over too few channels to matter."""
    block = DEFAULT_BLOCK
    while block >= MIN_DEFAULT_BLOCK and any(k % block for k in widths):
        block //= 2
    return block if block >= MIN_DEFAULT_BLOCK else 0


def scale(block: int) -> float:
    """1/sqrt(block) as the fp32 value both the simulation and the engine multiply by."""
    return float(np.float32(1.0 / math.sqrt(block)))


def hadamard_blocks(x, block: int):
    """x [..., K] (K a multiple of `block`) times blockdiag(H_b) / sqrt(b), as the engine computes it.
    x is a NumPy array (the torch-free quantize path) or a torch tensor (the simulation, LKD: the
    same operations, differentiable); the result is of x's kind and dtype."""
    k = x.shape[-1]
    check_block(block, k)
    lead = tuple(x.shape[:-1])
    if isinstance(x, np.ndarray):
        stack = np.stack
    else:
        import torch

        stack = torch.stack
    y = x.reshape(-1, k // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], k // block, block // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = stack((a + c, a - c), -2)
        h *= 2
    y = y.reshape(*lead, k) * scale(block)
    return y.astype(x.dtype, copy=False) if isinstance(x, np.ndarray) else y.to(x.dtype)


def hadamard_matmul(x, block: int):
    """hadamard_blocks of a torch tensor as one batched product with the b x b matrix instead of
    log2(b) elementwise stages: the same transform up to fp32 rounding (not bit-identical to the
    engine), for training only: autograd through the stages made LKD of SmolLM2-135M W4A8 with rotation
    take 927 s (W4/8A8 with this form: 547 s; unrotated LKD ~500 s)."""
    import torch

    k = x.shape[-1]
    check_block(block, k)
    h = torch.tensor(_matrix(block), dtype=x.dtype, device=x.device)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


@functools.lru_cache(maxsize=None)
def _matrix(block: int) -> np.ndarray:
    """blockdiag's block H_b / sqrt(b) in fp32: the transform of the identity's rows (exactly +-scale(b))."""
    m = hadamard_blocks(np.eye(block, dtype=np.float32), block)
    m.flags.writeable = False
    return m


def rotate_weight(w, block: int):
    """W H for a weight [N, K]: what the model file stores for a rotated Linear (computed in fp64,
    rounded once to fp32). NumPy or torch; differentiable in torch (LKD and distillation train the
    unrotated weight)."""
    if isinstance(w, np.ndarray):
        return hadamard_blocks(w.astype(np.float64), block).astype(np.float32)
    import torch

    return hadamard_blocks(w.to(torch.float64), block).to(torch.float32)
