"""Triton kernels for sgdc_conv (SPEC section 1): forward, backward, and their torch.library ops.

Notation: B batch, C channels, G heads, Cg = C/G channels per head, K odd window, KK = K*K taps,
R = K//2, HW = H*W pixels. ``p`` is a flattened pixel index i*W + j; tap t = u*K + v reads x at
pixel (i + u - R, j + v - R), that is at flat offset ``(u - R)*W + (v - R)`` when it is in the image.

Every kernel runs on a 1-D grid of (pixel tile, b*G + h) pairs, pixel tiles fastest; a tile is
BLOCK_P flat pixels of one batch item and head. A program computes the softmax statistics of its
pixels once (the log-sum-exp over the KK logits), keeps them in registers, and loops over the
head's channels in blocks of BLOCK_C; the probability of a tap is recomputed as exp(logit - lse)
where it is needed, so no K*K-fold tensor ever exists.

Memory layout: each tensor is dense, NCHW or channels_last, so the offset of pixel p is ``p * sp``
with one pixel stride ``sp`` (W's stride, or H's when W == 1). Every kernel takes the (batch,
channel, pixel) strides of the x-like tensors (x, gate, out, grad_out, dx, dgate, g_y) and of the
kernel-like ones (kernel, dkernel, dP), so one code path serves both memory formats.

Backward, deterministic (no atomics), in two kernels:
  1. ``_sgdc_bwd_taps_kernel``, over output pixels: g_y = dout * sigmoid(gate); for every tap,
     dP[t] = sum_c g_y * x_t (accumulated over channel blocks in an fp32 buffer of kernel's shape,
     owned by the program); y = sum_t P[t] * x_t gives dgate = dout * y * s * (1 - s); then
     dkernel = P * (dP - sum_t P * dP). It also writes the per-pixel log-sum-exp (B*G*HW floats)
     and, when there is a gate, g_y (x's size) for kernel 2.
  2. ``_sgdc_bwd_dx_kernel``, a gather over input pixels q:
     dx[c, q] = sum_t P[t, q - off_t] * g_y[c, q - off_t], with P rebuilt from kernel and the lse.

Block sizes come from :func:`_blocks`, a heuristic on (Cg, HW); with SGDC_TRITON_AUTOTUNE=1 the
kernels are autotuned instead (once per shape key, cached by triton.autotune). Under
TRITON_INTERPRET=1 (CPU tensors, for tests) the blocks are small and fixed.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from sgdc_kernels.backends import memory_format_of, register_ops

Tensor = torch.Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("SGDC_TRITON_AUTOTUNE") == "1" and not INTERPRET

# Fixed blocks under the interpreter: the interpreter pays per program and per loop step, so tiny
# test shapes fit one tile (tests shrink these to cover several pixel tiles and channel blocks).
INTERPRET_BLOCKS = {"BLOCK_P": 128, "BLOCK_C": 8}


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _softmax_lse(k_base, skc, skp, offs_p, mask_p, KK: tl.constexpr, BLOCK_P: tl.constexpr):
    """log(sum_t exp(logit_t)) per pixel, by an online max/sum over the KK taps (fp32)."""
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_P], tl.float32)
    for t in range(KK):
        logit = tl.load(k_base + t * skc + offs_p * skp, mask=mask_p, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, logit)
        s = s * tl.exp(m - m_new) + tl.exp(logit - m_new)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _pixel_tile(H, W, G, BLOCK_P: tl.constexpr):
    """This program's (b*G + h, b, h) and its BLOCK_P flat pixels: offsets, in-image mask, row, col.
    The 1-D grid enumerates pixel tiles fastest, so programs running together share their halos."""
    tiles = tl.cdiv(H * W, BLOCK_P)
    pid_bh = tl.program_id(0) // tiles
    b = (pid_bh // G).to(tl.int64)
    offs = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < H * W
    return pid_bh, b, pid_bh % G, offs, mask, offs // W, offs % W


@triton.jit
def _shifted(offs, i, j, mask, du, dv, H, W):
    """Flat offsets of the pixels (i + du, j + dv), and where they are inside the image."""
    ii = i + du
    jj = j + dv
    ok = mask & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
    return offs + du * W + dv, ok


@triton.jit
def _prob(tap_ptr, pix, skp, mask, lse):
    """Softmax probability exp(logit - lse) of one tap at pixels ``pix`` (0 where masked)."""
    logit = tl.load(tap_ptr + pix * skp, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, tl.exp(logit - lse), 0.0)


@triton.jit
def _load_block(ptr, offs_c, sxc, pix, sxp, mask_c, mask_pix):
    """The (BLOCK_C, BLOCK_P) tile of an x-like tensor at channels offs_c and flat pixels pix, in
    fp32, zero where masked (outside the image)."""
    vals = tl.load(ptr + offs_c[:, None] * sxc + pix[None, :] * sxp, mask=mask_c[:, None] & mask_pix[None, :], other=0.0)
    return vals.to(tl.float32)


@triton.jit
def _sgdc_fwd_kernel(
    x_ptr, k_ptr, g_ptr, out_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    pid_bh, b, h, offs_p, mask_p, i, j = _pixel_tile(H, W, G, BLOCK_P)
    k_base = k_ptr + b * skb + h * KK * skc
    lse = _softmax_lse(k_base, skc, skp, offs_p, mask_p, KK, BLOCK_P)
    head = b * sxb + h * CG * sxc

    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for u in range(K):
            for v in tl.static_range(K):
                src, ok = _shifted(offs_p, i, j, mask_p, u - R, v - R, H, W)
                prob = _prob(k_base + (u * K + v) * skc, offs_p, skp, mask_p, lse)
                acc += prob[None, :] * _load_block(x_ptr + head, offs_c, sxc, src, sxp, mask_c, ok)
        here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
        mask = mask_c[:, None] & mask_p[None, :]
        if HAS_GATE:
            acc = acc * tl.sigmoid(_load_block(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
        tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sgdc_bwd_taps_kernel(
    dout_ptr, x_ptr, k_ptr, g_ptr, dk_ptr, dg_ptr, gy_ptr, dp_ptr, lse_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    pid_bh, b, h, offs_p, mask_p, i, j = _pixel_tile(H, W, G, BLOCK_P)
    k_off = b * skb + h * KK * skc  # shared by kernel, dkernel and the dP buffer
    lse = _softmax_lse(k_ptr + k_off, skc, skp, offs_p, mask_p, KK, BLOCK_P)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * H * W + offs_p, lse, mask=mask_p)
    head = b * sxb + h * CG * sxc

    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
        mask = mask_c[:, None] & mask_p[None, :]
        dout = _load_block(dout_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p)
        if HAS_GATE:
            sg = tl.sigmoid(_load_block(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
            g_y = dout * sg
            tl.store(gy_ptr + here, g_y.to(gy_ptr.dtype.element_ty), mask=mask)
        else:
            g_y = dout
        y = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for u in range(K):
            for v in tl.static_range(K):
                src, ok = _shifted(offs_p, i, j, mask_p, u - R, v - R, H, W)
                xs = _load_block(x_ptr + head, offs_c, sxc, src, sxp, mask_c, ok)
                # dP[t] of this channel block, added to the earlier blocks' sum (this program
                # owns these dP entries, so the read-modify-write is race-free and deterministic).
                dp_ptrs = dp_ptr + k_off + (u * K + v) * skc + offs_p * skp
                dp = tl.sum(g_y * xs, axis=0)
                dp += tl.load(dp_ptrs, mask=mask_p & (c0 > 0), other=0.0)
                tl.store(dp_ptrs, dp, mask=mask_p)
                if HAS_GATE:
                    y += _prob(k_ptr + k_off + (u * K + v) * skc, offs_p, skp, mask_p, lse)[None, :] * xs
        if HAS_GATE:
            dgate = dout * y * sg * (1.0 - sg)
            tl.store(dg_ptr + here, dgate.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # dP writes visible to every thread before they are read again

    # Softmax backward: dkernel = P * (dP - sum_t P * dP).
    pdp = tl.zeros([BLOCK_P], tl.float32)
    for t in range(KK):
        dp = tl.load(dp_ptr + k_off + t * skc + offs_p * skp, mask=mask_p, other=0.0)
        pdp += _prob(k_ptr + k_off + t * skc, offs_p, skp, mask_p, lse) * dp
    for t in range(KK):
        dp = tl.load(dp_ptr + k_off + t * skc + offs_p * skp, mask=mask_p, other=0.0)
        dk = _prob(k_ptr + k_off + t * skc, offs_p, skp, mask_p, lse) * (dp - pdp)
        tl.store(dk_ptr + k_off + t * skc + offs_p * skp, dk.to(dk_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _sgdc_bwd_dx_kernel(
    gy_ptr, k_ptr, lse_ptr, dx_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    pid_bh, b, h, offs_q, mask_q, i, j = _pixel_tile(H, W, G, BLOCK_P)
    k_base = k_ptr + b * skb + h * KK * skc
    lse_base = lse_ptr + pid_bh.to(tl.int64) * H * W
    head = b * sxb + h * CG * sxc

    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for u in range(K):
            for v in tl.static_range(K):
                # the output pixel p = q - off_t whose tap t read x at q
                p, ok = _shifted(offs_q, i, j, mask_q, R - u, R - v, H, W)
                lse = tl.load(lse_base + p, mask=ok, other=0.0)
                prob = _prob(k_base + (u * K + v) * skc, p, skp, ok, lse)
                acc += prob[None, :] * _load_block(gy_ptr + head, offs_c, sxc, p, sxp, mask_c, ok)
        here = head + offs_c[:, None] * sxc + offs_q[None, :] * sxp
        tl.store(dx_ptr + here, acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_q[None, :])


# ---------------------------------------------------------------------------------------------
# Block sizes
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


def _autotuned(kernel):
    """``kernel`` autotuned over a few (BLOCK_P, BLOCK_C, num_warps), keyed on the shape; every
    kernel here is idempotent (it only overwrites its outputs), so benchmarking runs are harmless."""
    configs = [
        triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
        for p, c, w in [(128, 32, 4), (256, 16, 4), (64, 64, 4), (256, 32, 8), (128, 64, 8), (512, 16, 8)]
    ]
    return triton.autotune(configs, key=["H", "W", "CG", "sxp"])(kernel)


if AUTOTUNE:
    _fwd_tuned = _autotuned(_sgdc_fwd_kernel)
    _taps_tuned = _autotuned(_sgdc_bwd_taps_kernel)
    _dx_tuned = _autotuned(_sgdc_bwd_dx_kernel)


def _geometry(x: Tensor, kernel: Tensor, num_heads: int) -> tuple:
    """(H, W, Cg, G, sxb, sxc, sxp, skb, skc, skp): the integer arguments shared by all kernels."""
    _, C, H, W = x.shape
    # Offsets within one batch item are 32-bit (the batch offset is 64-bit).
    for name, t in (("x", x), ("kernel", kernel)):
        if t[0].numel() >= 2**31:
            raise ValueError(
                f"{name}: the triton backend needs fewer than 2**31 elements per batch item, got "
                f"{t[0].numel()} (shape {tuple(t.shape)}); use backend='cuda', which indexes in 64 bits"
            )

    def strides(t: Tensor) -> tuple:
        sb, sc, sh, sw = t.stride()
        sp = sw if W > 1 else sh
        if H > 1 and W > 1 and sh != W * sw:
            raise ValueError(f"sgdc triton: expected a dense NCHW or channels_last tensor, got strides {t.stride()}")
        return sb, sc, sp

    return (H, W, C // num_heads, num_heads, *strides(x), *strides(kernel))


def _launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``. Under the interpreter, wrap_triton hands back
    the raw kernel, which cannot run on the fake tensors of shape propagation (nothing to do there)
    nor trace into a graph (torch.compile of this backend needs a GPU)."""
    if INTERPRET:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        if any(isinstance(a, FakeTensor) for a in args):
            return
        if any(isinstance(a, FunctionalTensor) for a in args):
            raise RuntimeError(
                "sgdc triton: torch.compile of the triton backend needs a CUDA GPU; under "
                "TRITON_INTERPRET=1 it runs in eager mode only"
            )
    wrap_triton(kernel)[grid](*args, **kwargs)


def _grid(x: Tensor, num_heads: int):
    B, _, H, W = x.shape
    return lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]) * B * num_heads,)


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


@triton_op("sgdc::triton_forward", mutates_args=())
def sgdc_triton_forward(
    x: Tensor, kernel: Tensor, gate: Optional[Tensor], kernel_size: int, num_heads: int
) -> Tensor:
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    geo = _geometry(x, kernel, num_heads)
    args = (x, kernel, gate if gate is not None else x, out, *geo)
    consts = {"K": kernel_size, "HAS_GATE": gate is not None}
    if AUTOTUNE:
        _launch(_fwd_tuned, _grid(x, num_heads), *args, **consts)
    else:
        blocks = _blocks(geo[2], geo[0] * geo[1])
        _launch(_sgdc_fwd_kernel, _grid(x, num_heads), *args, **consts, **blocks)
    return out


@triton_op("sgdc::triton_backward", mutates_args=())
def sgdc_triton_backward(
    grad_out: Tensor, x: Tensor, kernel: Tensor, gate: Optional[Tensor], kernel_size: int, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    dx = torch.empty_like(x)
    dkernel = torch.empty_like(kernel)
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    if x.numel() == 0:
        return dx, dkernel, dgate
    B, _, H, W = x.shape
    geo = _geometry(x, kernel, num_heads)
    # Scratch: dP (fp32, kernel's shape and strides), the per-pixel log-sum-exp, and g_y when gated.
    dp = torch.empty_like(kernel, dtype=torch.float32)
    lse = torch.empty((B * num_heads, H * W), dtype=torch.float32, device=x.device)
    g_y = torch.empty_like(x) if gate is not None else grad_out
    taps_args = (grad_out, x, kernel, gate if gate is not None else x, dkernel,
                 dgate if gate is not None else dx, g_y, dp, lse, *geo)  # fmt: skip
    dx_args = (g_y, kernel, lse, dx, *geo)
    grid = _grid(x, num_heads)
    if AUTOTUNE:
        _launch(_taps_tuned, grid, *taps_args, K=kernel_size, HAS_GATE=gate is not None)
        _launch(_dx_tuned, grid, *dx_args, K=kernel_size)
    else:
        blocks = _blocks(geo[2], H * W)
        _launch(_sgdc_bwd_taps_kernel, grid, *taps_args, K=kernel_size, HAS_GATE=gate is not None, **blocks)
        _launch(_sgdc_bwd_dx_kernel, grid, *dx_args, K=kernel_size, **blocks)
    return dx, dkernel, dgate


register_ops(sgdc_triton_forward, sgdc_triton_backward, fake=False)
