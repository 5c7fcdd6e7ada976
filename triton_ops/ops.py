"""The triton backend's operators ``sgdc::triton_forward`` / ``sgdc::triton_backward``: the kernel
variants, the launch parameters, and the launches of the kernels of taps.py and band.py.

Variants (:data:`VARIANTS`, the first is the default; the operators' ``variant`` argument names
one, chosen by the user as ``backend="triton@<variant>"``; :func:`kernel_family` maps a variant and
a dtype to the kernels it runs):
  - "v2dot16": the band kernels for 16-bit inputs, the taps kernels for float32;
  - "v2dot": the band kernels for every dtype (float32 products in tf32x3);
  - "v1": the taps kernels for every dtype.
Every variant runs every configuration of window_conv with its own kernels; none is routed
elsewhere.

Launch parameters: :func:`_blocks` for the taps kernels (with SGDC_TRITON_AUTOTUNE=1 the taps
kernels are autotuned instead, see :func:`_autotuned`), :func:`_dot_blocks` and :func:`_dx_halo`
for the band kernels. Under TRITON_INTERPRET=1 (CPU tensors, for tests) the blocks are small and
fixed (:data:`INTERPRET_BLOCKS`, :data:`INTERPRET_DOT_BLOCKS`).
"""

from __future__ import annotations

import os

import torch
import triton
from torch.library import triton_op

from sgdc_kernels.custom_ops import BACKWARD_SCHEMA, FORWARD_SCHEMA, memory_format_of, register_ops

from .band import _sgdc_bwd_dot_kernel, _sgdc_bwd_dx_dot_kernel, _sgdc_fwd_dot_kernel
from .common import INTERPRET, Tensor, _geometry, _launch
from .taps import _sgdc_bwd_dx_kernel, _sgdc_bwd_taps_kernel, _sgdc_fwd_kernel

AUTOTUNE = os.environ.get("SGDC_TRITON_AUTOTUNE") == "1" and not INTERPRET

# Fixed blocks under the interpreter: the interpreter pays per program and per loop step, so tiny
# test shapes fit one tile (tests shrink these to cover several pixel tiles and channel blocks).
INTERPRET_BLOCKS = {"BLOCK_P": 128, "BLOCK_C": 8}
# The band kernels' smallest legal blocks (tl.dot needs every dimension >= 16).
INTERPRET_DOT_BLOCKS = {"BW": 16, "BLOCK_C": 16}

# Kernel variants, named by the operators' ``variant`` argument (backend="triton@v1"); the first,
# the default, is the one predicted fastest (bench/NOTES_triton.md).
VARIANTS = ("v2dot16", "v2dot", "v1")


def kernel_family(variant: str, dtype: torch.dtype) -> str:
    """The kernels ``variant`` runs on inputs of ``dtype``: "band" (band.py) or "taps" (taps.py)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: {variant!r} is not a triton kernel variant; expected one of {', '.join(VARIANTS)}")
    return "band" if variant == "v2dot" or (variant == "v2dot16" and dtype != torch.float32) else "taps"


# ---------------------------------------------------------------------------------------------
# Launch parameters
# ---------------------------------------------------------------------------------------------


def _blocks(cg: int, hw: int) -> dict:
    """Launch parameters: a channel block covering the head when it is small, and a pixel tile that
    keeps the fp32 accumulator (BLOCK_C x BLOCK_P) at 4096 elements, 32 per thread with 4 warps."""
    if INTERPRET:
        return dict(INTERPRET_BLOCKS)
    cg, hw = int(cg), int(hw)  # specialize (guard) symbolic sizes under torch.compile(dynamic=True)
    block_c = min(triton.next_power_of_2(cg), 32)
    block_p = max(32, min(4096 // block_c, triton.next_power_of_2(hw), 256))
    return {"BLOCK_P": block_p, "BLOCK_C": block_c, "num_warps": 4}


def _dot_blocks(cg: int, kernel_size: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the band kernels: segments of BW = 16 pixels (the smallest tl.dot
    side), the halo rounded up to a power of two, the whole head in one channel block up to 64
    channels; fp32 products in tf32x3."""
    blocks = (
        dict(INTERPRET_DOT_BLOCKS)
        if INTERPRET
        else {"BW": 16, "BLOCK_C": max(16, min(triton.next_power_of_2(int(cg)), 64))}
    )
    blocks["HALO"] = triton.next_power_of_2(blocks["BW"] + kernel_size - 1)
    fp32 = dtype == torch.float32
    blocks.update(PRECISION="tf32x3" if fp32 else "ieee", UPCAST=INTERPRET and dtype == torch.bfloat16)
    if not INTERPRET:
        blocks["num_warps"] = 4
    return blocks


def _dx_halo(blocks: dict, kernel_size: int, clamp: bool) -> int:
    """The halo of the band dx kernel: the forward's, or with clamped windows, where more output
    pixels than K per axis read an input pixel near the borders, BW + 2K - 2 columns plus 7 to
    start at a multiple of 8, rounded up to a power of two."""
    if not clamp:
        return blocks["HALO"]
    return triton.next_power_of_2(blocks["BW"] + 2 * kernel_size + 5)


def _autotuned(kernel):
    """``kernel`` autotuned over a few (BLOCK_P, BLOCK_C, num_warps), keyed on the shape and the
    configuration; every kernel here is idempotent (it only overwrites its outputs), so
    benchmarking runs are harmless."""
    configs = [
        triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
        for p, c, w in [(128, 32, 4), (256, 16, 4), (64, 64, 4), (256, 32, 8), (128, 64, 8), (512, 16, 8)]
    ]
    return triton.autotune(configs, key=["H", "W", "CG", "sxp", "K", "D", "CLAMP", "SOFTMAX"])(kernel)


if AUTOTUNE:
    _fwd_tuned = _autotuned(_sgdc_fwd_kernel)
    _taps_tuned = _autotuned(_sgdc_bwd_taps_kernel)
    _dx_tuned = _autotuned(_sgdc_bwd_dx_kernel)


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------


def _grid(x: Tensor, num_heads: int):
    B, _, H, W = x.shape
    return lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]) * B * num_heads,)


def _segment_grid(x: Tensor, num_heads: int, dilation: int):
    B, _, H, W = x.shape
    return lambda meta: (triton.cdiv(triton.cdiv(W, dilation), meta["BW"]) * dilation * H * B * num_heads,)


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def _consts(kernel_size: int, gate: Tensor | None, dilation: int, clamp: bool, softmax: bool) -> dict:
    """The configuration as the kernels' constexpr arguments."""
    return {"K": kernel_size, "HAS_GATE": gate is not None, "D": dilation, "CLAMP": clamp, "SOFTMAX": softmax}


@triton_op("sgdc::triton_forward", mutates_args=(), schema=FORWARD_SCHEMA)
def sgdc_triton_forward(
    x: Tensor, weights: Tensor, gate: Tensor | None,
    kernel_size: int, num_heads: int, dilation: int, clamp: bool, softmax: bool, variant: str,
) -> Tensor:  # fmt: skip
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    geo = _geometry(x, weights, num_heads)
    args = (x, weights, gate if gate is not None else x, out, *geo)
    consts = _consts(kernel_size, gate, dilation, clamp, softmax)
    if kernel_family(variant, x.dtype) == "band":
        blocks = _dot_blocks(geo[2], kernel_size, x.dtype)
        _launch(_sgdc_fwd_dot_kernel, _segment_grid(x, num_heads, dilation), *args, **consts, **blocks)
    elif AUTOTUNE:
        _launch(_fwd_tuned, _grid(x, num_heads), *args, **consts)
    else:
        blocks = _blocks(geo[2], geo[0] * geo[1])
        _launch(_sgdc_fwd_kernel, _grid(x, num_heads), *args, **consts, **blocks)
    return out


@triton_op("sgdc::triton_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def sgdc_triton_backward(
    grad_out: Tensor, x: Tensor, weights: Tensor, gate: Tensor | None,
    kernel_size: int, num_heads: int, dilation: int, clamp: bool, softmax: bool, variant: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    dx = torch.empty_like(x)
    dweights = torch.empty_like(weights)
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    if x.numel() == 0:
        return dx, dweights, dgate
    B, _, H, W = x.shape
    geo = _geometry(x, weights, num_heads)
    # Scratch: the per-pixel softmax statistics (max, 1/sum; written and read with the softmax
    # only), g_y when gated, and for the taps kernels dP (fp32, the weights' shape).
    stats = torch.empty((B * num_heads, H * W, 2), dtype=torch.float32, device=x.device)
    g_y = torch.empty_like(x) if gate is not None else grad_out
    consts = _consts(kernel_size, gate, dilation, clamp, softmax)
    mode = {k: consts[k] for k in ("K", "D", "CLAMP", "SOFTMAX")}
    # Without a gate (HAS_GATE false) the kernels never touch g_ptr and dg_ptr: x and dx stand in.
    gate_arg, dgate_arg = (gate, dgate) if gate is not None else (x, dx)
    head_args = (grad_out, x, weights, gate_arg, dweights, dgate_arg, g_y)
    dx_args = (g_y, weights, stats, dx, *geo)
    if kernel_family(variant, x.dtype) == "band":
        blocks = _dot_blocks(geo[2], kernel_size, x.dtype)
        grid = _segment_grid(x, num_heads, dilation)
        split = x.dtype != torch.float32 and softmax  # raw 16-bit weights are exact in 16 bits
        _launch(_sgdc_bwd_dot_kernel, grid, *head_args, stats, *geo, **consts, **blocks, SPLIT=split)
        dx_blocks = {**blocks, "HALO": _dx_halo(blocks, kernel_size, clamp)}
        _launch(_sgdc_bwd_dx_dot_kernel, grid, *dx_args, **mode, **dx_blocks)
        return dx, dweights, dgate
    dp = torch.empty_like(weights, dtype=torch.float32)
    taps_args = (*head_args, dp, stats, *geo)
    grid = _grid(x, num_heads)
    if AUTOTUNE:
        _launch(_taps_tuned, grid, *taps_args, **consts)
        _launch(_dx_tuned, grid, *dx_args, **mode)
    else:
        blocks = _blocks(geo[2], H * W)
        _launch(_sgdc_bwd_taps_kernel, grid, *taps_args, **consts, **blocks)
        _launch(_sgdc_bwd_dx_kernel, grid, *dx_args, **mode, **blocks)
    return dx, dweights, dgate


register_ops(sgdc_triton_forward, sgdc_triton_backward, fake=False)
