"""Drop-in replacements for operators other packages removed, on this package's fused kernels.

:func:`na2d_av` is NATTEN's unfused 2-D neighborhood "attention times value" (``natten.functional.
na2d_av`` of NATTEN 0.17, removed in 0.20), which models such as OverLoCK (ContMix) and NAT/DiNAT
call to aggregate each pixel's neighborhood with their own weights. Switch with one import::

    from sgdc_kernels.compat import na2d_av   # instead of: from natten.functional import na2d_av

It runs on every backend of :func:`sgdc_kernels.window_conv` (fused CUDA and Triton kernels on
GPUs, PyTorch elsewhere), in float32, float16 and bfloat16, under autograd and torch.compile.
"""

from __future__ import annotations

import torch

from .ops import autocast_inputs, check_int, check_like, check_tensor, window_conv

Tensor = torch.Tensor

__all__ = ["na2d_av"]


def _square(name: str, value: object) -> object:
    """The one value of an int or of a pair of equal values (NATTEN accepts per-axis values; these
    kernels are square); :func:`check_int` checks it."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"{name}: expected an int or a pair of equal ints (square windows only), got {tuple(value)!r}"
            )
        value = value[0]
    return value


def na2d_av(
    attn: Tensor,
    value: Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    is_causal: bool | tuple[bool, bool] = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """NATTEN's ``na2d_av``: ``out[b, h, i, j] = sum_t attn[b, h, i, j, t] * value[b, h, window_t(i, j)]``.

    Args:
        attn: (B, heads, H, W, K*K) weights, used as given (apply the softmax before, as with
            NATTEN); tap t = u*K + v is row u, column v of the pixel's window.
        value: (B, heads, H, W, D).
        kernel_size: K, odd and > 1 (an int or a pair of equal ints).
        dilation: distance between taps, >= 1 (an int or a pair of equal ints).
        is_causal: must be False (causal masks are not supported).
        backend: as in :func:`sgdc_kernels.window_conv`.

    Windows follow NATTEN's rule: each pixel's window is shifted to stay inside the image, so H and
    W must be at least ``kernel_size * dilation``. Returns a tensor shaped like ``value``, in its
    dtype. No copy of ``attn`` or ``value`` is made when they are contiguous: the heads become the
    batch of ``window_conv`` and the last dimension its channels (channels_last).
    """
    K = _square("kernel_size", kernel_size)
    d = _square("dilation", dilation)
    if any(is_causal) if isinstance(is_causal, (tuple, list)) else is_causal:
        raise ValueError("is_causal: causal neighborhoods are not supported; expected False")
    check_int("kernel_size", K, odd=True, minimum=2)
    check_int("dilation", d)
    check_tensor("attn", attn, "(B, heads, H, W, kernel_size**2)")
    check_tensor("value", value, "(B, heads, H, W, D)")
    if attn.device != value.device:
        raise ValueError(f"attn: expected a tensor on value's device {value.device}, got {attn.device}")
    B, heads, H, W, D = value.shape
    if tuple(attn.shape) != (B, heads, H, W, K * K):
        raise ValueError(
            f"attn: expected shape (B, heads, H, W, kernel_size**2) = {(B, heads, H, W, K * K)} for value of "
            f"shape {tuple(value.shape)}, got {tuple(attn.shape)}"
        )
    if H < K * d or W < K * d:
        raise ValueError(f"value: input axes must be at least kernel_size * dilation = {K * d}, got H={H}, W={W}")
    attn, value, _ = autocast_inputs(attn, value, None)
    check_like("attn", attn, "value", value)
    # (B, heads, H, W, D) -> (B*heads, D, H, W) channels_last: a view of a contiguous tensor.
    x = value.reshape(B * heads, H, W, D).permute(0, 3, 1, 2)
    weights = attn.reshape(B * heads, H, W, K * K).permute(0, 3, 1, 2)
    out = window_conv(
        x, weights, kernel_size=K, num_heads=1, dilation=d, border="clamp", normalize=None, backend=backend
    )
    return out.permute(0, 2, 3, 1).reshape(B, heads, H, W, D)
