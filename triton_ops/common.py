"""What both Triton kernel families share: the notation, the configurations, the memory layout, the
window-start and weight helpers, the tile loads, the launch geometry and the launch itself.

The kernels compute window_conv and its SGDC configuration sgdc_conv (definition and gradients:
docs/op.md). taps.py holds the per-tap kernels (v1), band.py the band-matrix tl.dot kernels (v2),
ops.py the operators that launch them.

Notation: B batch, C channels, G heads, Cg = C/G channels per head, K odd window, KK = K*K taps,
R = K//2, HW = H*W pixels, D dilation. ``p`` is a flattened pixel index i*W + j; with sgdc_conv's
configuration tap t = u*K + v reads x at pixel (i + u - R, j + v - R), that is at flat offset
``(u - R)*W + (v - R)`` when it is in the image.

Configurations. Every kernel takes the operator's ``dilation``, ``clamp`` and ``softmax`` as the
constexpr arguments D, CLAMP and SOFTMAX (defaults: sgdc_conv's 1, False, True): taps D pixels
apart; windows centred with zeros outside the image, or clamped inside it (NATTEN's rule: along
an axis, the pixels m + D*g of residue m form an undilated axis of length L = ceil((n - m)/D) on
which g's window starts at min(max(g - R, 0), L - K)); weights as logits with the softmax inside,
or used as given (then no log-sum-exp is computed or stored, and dweights is dP).

Memory layout: each tensor is dense, NCHW or channels_last, so the offset of pixel p is ``p * sp``
with one pixel stride ``sp`` (W's stride, or H's when W == 1). Every kernel takes the (batch,
channel, pixel) strides of the x-like tensors (x, gate, out, grad_out, dx, dgate, g_y), ``sxb,
sxc, sxp``, and of the weights-like ones (weights, dweights, dP), ``swb, swc, swp``, so one code
path serves both memory formats.

Under TRITON_INTERPRET=1 (:data:`INTERPRET`) the kernels run on CPU tensors through Triton's
interpreter, for tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

Tensor = torch.Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Kernel helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _clamped_start(g, L, K: tl.constexpr):
    """Window start of group index ``g`` on an undilated axis of length L >= K, NATTEN's rule."""
    return tl.minimum(tl.maximum(g - K // 2, 0), L - K)


@triton.jit
def _clamp_offset(i, n, K: tl.constexpr, D: tl.constexpr):
    """(image index of the first tap) - i for clamped windows along an axis of length n: i is
    group index i // D of residue class i % D, of length L = ceil((n - i % D) / D)."""
    m = i % D
    return m + D * _clamped_start(i // D, (n - m + D - 1) // D, K) - i


@triton.jit
def _prob(tap_ptr, pix, swp, mask, m, inv):
    """Softmax probability exp(logit - m) * inv of one tap at pixels ``pix`` (0 where masked), from
    the pixel's statistics: m the max of its logits, inv = 1 / sum_t exp(logit_t - m). logit - m is
    exact for every tap that matters (Sterbenz), whatever the logits' magnitude; a log-sum-exp
    would round to |lse| * eps32, 6e-4 relative at logits of 1e4."""
    logit = tl.load(tap_ptr + pix * swp, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, tl.exp(logit - m) * inv, 0.0)


@triton.jit
def _weight(tap_ptr, pix, swp, mask, m, inv, SOFTMAX: tl.constexpr):
    """The weight of one tap at pixels ``pix`` (0 where masked): :func:`_prob`, or the raw weight."""
    if SOFTMAX:
        return _prob(tap_ptr, pix, swp, mask, m, inv)
    return tl.load(tap_ptr + pix * swp, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_stats(stats_ptr, bh, HW, pix, mask, m, inv):
    """Stores the softmax statistics (m, inv) of pixels ``pix`` of (batch, head) ``bh`` into the
    backward's (B*G, H*W, 2) fp32 buffer, for the dx kernels."""
    at = stats_ptr + (bh.to(tl.int64) * HW + pix) * 2
    tl.store(at, m, mask=mask)
    tl.store(at + 1, inv, mask=mask)


@triton.jit
def _load_stats(stats_base, pix, mask):
    """The statistics (m, inv) of pixels ``pix`` (any shape) from ``stats_base``, the buffer at the
    (batch, head); (0, 1) where masked."""
    return tl.load(stats_base + pix * 2, mask=mask, other=0.0), tl.load(stats_base + pix * 2 + 1, mask=mask, other=1.0)


@triton.jit
def _load_tile_native(ptr, offs_c, sxc, pix, sxp, mask_c, mask_pix):
    """The (channels, pixels) tile of an x-like tensor at channels offs_c and flat pixels pix, in
    the tensor's own dtype (as tl.dot operands), zero where masked (outside the image)."""
    return tl.load(
        ptr + offs_c[:, None] * sxc + pix[None, :] * sxp, mask=mask_c[:, None] & mask_pix[None, :], other=0.0
    )


@triton.jit
def _load_tile_fp32(ptr, offs_c, sxc, pix, sxp, mask_c, mask_pix):
    """:func:`_load_tile_native` converted to fp32 (for elementwise fp32 arithmetic)."""
    return _load_tile_native(ptr, offs_c, sxc, pix, sxp, mask_c, mask_pix).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def _geometry(x: Tensor, weights: Tensor, num_heads: int) -> tuple:
    """(H, W, Cg, G, sxb, sxc, sxp, swb, swc, swp): the integer arguments shared by all kernels."""
    _, C, H, W = x.shape
    # Offsets within one batch item are 32-bit (the batch offset is 64-bit).
    for name, t in (("x", x), ("weights", weights)):
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

    return (H, W, C // num_heads, num_heads, *strides(x), *strides(weights))


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
