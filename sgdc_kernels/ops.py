"""The public operators: :func:`window_conv`, the per-pixel weighted window sum, and
:func:`sgdc_conv`, its SGDC configuration (definition and gradients: docs/op.md)."""

from __future__ import annotations

import torch

from .backends import memory_format_of
from .registry import check_name, forward_op, resolve_backend

Tensor = torch.Tensor


def _check_int(name: str, value: object, *, odd: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name}: expected an odd int (the window is centred), got {value}")


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (B, C, H, W) tensor, got {t.dim()}-D shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}"
        )


BORDERS = ("zero", "clamp")
NORMALIZATIONS = ("softmax", None)


def check_mode(dilation: int, border: str, normalize: str | None) -> None:
    _check_int("dilation", dilation)
    if border not in BORDERS:
        raise ValueError(f"border: expected 'zero' or 'clamp', got {border!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected 'softmax' or None, got {normalize!r}")


def check_inputs(
    x: Tensor,
    kernel: Tensor,
    gate: Tensor | None,
    kernel_size: int,
    num_heads: int,
    *,
    dilation: int = 1,
    border: str = "zero",
    normalize: str | None = "softmax",
    kernel_name: str = "kernel",
) -> None:
    """Raise TypeError / ValueError naming the argument and what was expected."""
    _check_int("kernel_size", kernel_size, odd=True)
    _check_int("num_heads", num_heads)
    check_mode(dilation, border, normalize)
    _check_tensor("x", x)
    _check_tensor(kernel_name, kernel)
    if gate is not None:
        _check_tensor("gate", gate)
    B, C, H, W = x.shape
    if C < num_heads or C % num_heads != 0:
        raise ValueError(f"x: channel count {C} must be a positive multiple of num_heads={num_heads}")
    expected = (B, num_heads * kernel_size * kernel_size, H, W)
    if tuple(kernel.shape) != expected:
        raise ValueError(
            f"{kernel_name}: expected shape (B, num_heads*kernel_size**2, H, W) = {expected} "
            f"for x of shape {tuple(x.shape)}, num_heads={num_heads}, kernel_size={kernel_size}; "
            f"got {tuple(kernel.shape)}"
        )
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate: expected the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
    if border == "clamp" and min(H, W) < kernel_size * dilation:
        raise ValueError(
            f"x: border='clamp' needs H and W of at least kernel_size * dilation = "
            f"{kernel_size * dilation} (every window inside the image), got H={H}, W={W}"
        )
    for name, t in ((kernel_name, kernel), ("gate", gate)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")


def _autocast(x, kernel, gate):
    """Under torch.autocast, run in the autocast dtype (as convolutions do): inside an autocast
    region the inputs typically arrive in mixed precisions (LayerNorm in float32, 1x1 convolutions
    in bfloat16). Outside autocast, mixed dtypes stay an error."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, kernel, gate
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return cast(x), cast(kernel), cast(gate)


def window_conv(
    x: Tensor,
    weights: Tensor,
    gate: Tensor | None = None,
    *,
    kernel_size: int,
    num_heads: int = 1,
    dilation: int = 1,
    border: str = "zero",
    normalize: str | None = "softmax",
    backend: str = "auto",
) -> Tensor:
    """Per-pixel weighted window sum: each pixel's K x K window of ``x`` (taps ``dilation``
    pixels apart), weighted per head by that pixel's own ``weights``, times ``sigmoid(gate)``.

    Args:
        x: features, (B, C, H, W); head h owns channels [h*C/G, (h+1)*C/G).
        weights: per-pixel weights, (B, num_heads*K*K, H, W); channel h*K*K + u*K + v is tap
            (u, v) of head h: logits when ``normalize="softmax"`` (the softmax runs over the K*K
            taps of each head and pixel), the weights themselves when ``normalize=None``.
        gate: gate logits, (B, C, H, W), or None for no gate.
        kernel_size: K, odd. num_heads: G, divides C. dilation: distance between taps, >= 1.
        border: ``"zero"``: the window is centred on its pixel and ``x`` is zero outside the
            image; ``"clamp"``: the window is shifted to stay inside the image (NATTEN's rule;
            needs H and W >= kernel_size * dilation).
        normalize: ``"softmax"`` or None.
        backend: "auto", "unfold", "torch", "triton" or "cuda" (see available_backends()).

    Returns a tensor shaped, typed and laid out (contiguous or channels_last) like ``x``.
    Differentiable in x, weights and gate; works under torch.compile(fullgraph=True).
    :func:`sgdc_conv` is this op with ``border="zero"``, ``normalize="softmax"``, ``dilation=1``.
    """
    check_name(backend)
    x, weights, gate = _autocast(x, weights, gate)
    check_inputs(
        x,
        weights,
        gate,
        kernel_size,
        num_heads,
        dilation=dilation,
        border=border,
        normalize=normalize,
        kernel_name="weights",
    )
    return _run(backend, x, weights, gate, kernel_size, num_heads, dilation, border == "clamp", normalize is not None)


def _run(backend, x, kernel, gate, kernel_size, num_heads, dilation, clamp, softmax) -> Tensor:
    name = resolve_backend(backend, x.device.type, x.dtype)
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    kernel = kernel.contiguous(memory_format=fmt)
    if gate is not None:
        gate = gate.contiguous(memory_format=fmt)
    return forward_op(name)(x, kernel, gate, kernel_size, num_heads, dilation, clamp, softmax)


def sgdc_conv(
    x: Tensor,
    kernel: Tensor,
    gate: Tensor | None = None,
    *,
    kernel_size: int = 7,
    num_heads: int = 4,
    backend: str = "auto",
) -> Tensor:
    """Structurally-guided dynamic convolution: a per-pixel, per-head softmax-weighted window sum
    of ``x``, times ``sigmoid(gate)``.

    Args:
        x: features, (B, C, H, W); head h owns channels [h*C/G, (h+1)*C/G).
        kernel: per-pixel kernel logits, (B, num_heads*K*K, H, W); channel h*K*K + u*K + v is tap
            (u, v) of head h. The softmax runs over the K*K taps of each head and pixel.
        gate: gate logits, (B, C, H, W), or None for no gate.
        kernel_size: K, odd. num_heads: G, divides C.
        backend: "auto", "unfold", "torch", "triton" or "cuda" (see available_backends()).

    Returns a tensor shaped, typed and laid out (contiguous or channels_last) like ``x``.
    Differentiable in x, kernel and gate; works under torch.compile(fullgraph=True).
    This is :func:`window_conv` with centred, zero-padded windows and the softmax.
    """
    check_name(backend)
    x, kernel, gate = _autocast(x, kernel, gate)
    check_inputs(x, kernel, gate, kernel_size, num_heads)
    return _run(backend, x, kernel, gate, kernel_size, num_heads, 1, False, True)
