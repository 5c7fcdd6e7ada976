"""The public operators: :func:`window_conv`, the per-pixel weighted window sum, and
:func:`sgdc_conv`, its SGDC configuration (definition and gradients: docs/op.md); and the
validation of every user-facing argument of the package's operators (``compat`` uses it too).

A call is validated here, cast under autocast, laid out densely in ``x``'s memory format, and
handed to the backend's forward operator that :func:`registry.resolve` picks, with the kernel
variant as an argument. The backends themselves check only what protects memory."""

from __future__ import annotations

import torch

from .custom_ops import memory_format_of
from .registry import check_name, dots_op, forward_op, resolve

Tensor = torch.Tensor


def check_int(name: str, value: object, *, odd: bool = False, minimum: int = 1) -> None:
    """``value`` is an int (not a bool) of at least ``minimum``, odd if asked."""
    if isinstance(value, bool) or not isinstance(value, int):
        what = "a positive int" if minimum == 1 else f"an int greater than {minimum - 1}"
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__} {value!r}")
    if minimum > 1 and (value < minimum or (odd and value % 2 == 0)):
        # the odd ints from an odd minimum are those greater than minimum - 2 (from 3: greater than 1)
        bound = minimum - 2 if odd and minimum % 2 else minimum - 1
        raise ValueError(f"{name}: expected an {'odd ' if odd else ''}int greater than {bound}, got {value}")
    if value < minimum:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name}: expected an odd int (the window is centred), got {value}")


def check_tensor(name: str, t: object, layout: str = "(B, C, H, W)") -> None:
    """``t`` is a floating-point tensor with one dimension per name in ``layout``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    ndim = layout.count(",") + 1
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D {layout} tensor, got {t.dim()}-D shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}"
        )


def check_like(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` is on ``ref``'s device and of its dtype."""
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


BORDERS = ("zero", "clamp")
NORMALIZATIONS = ("softmax", None)


def check_config(dilation: int, border: str, normalize: str | None) -> None:
    check_int("dilation", dilation)
    if border not in BORDERS:
        raise ValueError(f"border: expected 'zero' or 'clamp', got {border!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected 'softmax' or None, got {normalize!r}")


def check_inputs(
    x: Tensor,
    weights: Tensor,
    gate: Tensor | None,
    kernel_size: int,
    num_heads: int,
    *,
    dilation: int = 1,
    border: str = "zero",
    normalize: str | None = "softmax",
    weights_name: str = "weights",
) -> None:
    """Raise TypeError / ValueError naming the argument and what was expected (``weights_name``:
    what the caller calls ``weights``, e.g. sgdc_conv's ``kernel``)."""
    check_int("kernel_size", kernel_size, odd=True)
    check_int("num_heads", num_heads)
    check_config(dilation, border, normalize)
    check_tensor("x", x)
    check_tensor(weights_name, weights)
    if gate is not None:
        check_tensor("gate", gate)
    B, C, H, W = x.shape
    if C < num_heads or C % num_heads != 0:
        raise ValueError(f"x: channel count {C} must be a positive multiple of num_heads={num_heads}")
    expected = (B, num_heads * kernel_size * kernel_size, H, W)
    if tuple(weights.shape) != expected:
        raise ValueError(
            f"{weights_name}: expected shape (B, num_heads*kernel_size**2, H, W) = {expected} "
            f"for x of shape {tuple(x.shape)}, num_heads={num_heads}, kernel_size={kernel_size}; "
            f"got {tuple(weights.shape)}"
        )
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate: expected the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
    if border == "clamp" and min(H, W) < kernel_size * dilation:
        raise ValueError(
            f"x: border='clamp' needs H and W of at least kernel_size * dilation = "
            f"{kernel_size * dilation} (every window inside the image), got H={H}, W={W}"
        )
    for name, t in ((weights_name, weights), ("gate", gate)):
        if t is not None:
            check_like(name, t, "x", x)


def autocast_inputs(x, weights, gate):
    """Under torch.autocast, run in the autocast dtype (as convolutions do): inside an autocast
    region the inputs typically arrive in mixed precisions (LayerNorm in float32, 1x1 convolutions
    in bfloat16). Outside autocast, mixed dtypes stay an error."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, weights, gate
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return cast(x), cast(weights), cast(gate)


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
        backend: "auto", "unfold", "torch", "triton" or "cuda" (see available_backends()), or
            "name@variant" for one kernel variant of a backend (e.g. "cuda@v2").

    Returns a tensor shaped, typed and laid out (contiguous or channels_last) like ``x``.
    Differentiable in x, weights and gate; works under torch.compile(fullgraph=True).
    :func:`sgdc_conv` is this op with ``border="zero"``, ``normalize="softmax"``, ``dilation=1``.
    """
    check_name(backend)
    x, weights, gate = autocast_inputs(x, weights, gate)
    check_inputs(x, weights, gate, kernel_size, num_heads, dilation=dilation, border=border, normalize=normalize)
    return _run(backend, x, weights, gate, kernel_size, num_heads, dilation, border == "clamp", normalize is not None)


def _run(backend, x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax) -> Tensor:
    """The validated call, on the backend and variant that ``backend`` means for it.

    Under ``torch.onnx.export`` the call is the `torch` backend's formulation itself, made of
    standard operators that ONNX has (no custom operator of this package reaches the graph), with
    the image axes symbolic, so one exported file serves every batch and image size."""
    if torch.onnx.is_in_onnx_export():
        from .reference import shift_forward  # the backends load on first use, this one too

        return shift_forward(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax)
    name, variant = resolve(backend, x.device.type, x.dtype, dilation, clamp, softmax)
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    weights = weights.contiguous(memory_format=fmt)
    if gate is not None:
        gate = gate.contiguous(memory_format=fmt)
    return forward_op(name)(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax, variant)


def window_dots(backend: str, grad_out: Tensor, x: Tensor, kernel_size: int, dilation: int, clamp: bool) -> Tensor:
    """The window sum's weight pass for one head, validated by the caller: per pixel p and tap t,
    ``sum_c grad_out[c, p] * x[c, tap_t(p)]``, (B, K*K, H, W) in ``x``'s memory format, on the
    backend and variant that ``backend`` means for raw weights (``compat.na2d_qk`` calls it)."""
    name, variant = resolve(backend, x.device.type, x.dtype, dilation, clamp, False)
    fmt = memory_format_of(x)
    grad_out, x = grad_out.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
    return dots_op(name)(grad_out, x, kernel_size, dilation, clamp, variant)


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
        backend: "auto", "unfold", "torch", "triton" or "cuda" (see available_backends()), or
            "name@variant" for one kernel variant of a backend (e.g. "cuda@v2").

    Returns a tensor shaped, typed and laid out (contiguous or channels_last) like ``x``.
    Differentiable in x, kernel and gate; works under torch.compile(fullgraph=True).
    This is :func:`window_conv` with centred, zero-padded windows and the softmax.
    """
    check_name(backend)
    x, kernel, gate = autocast_inputs(x, kernel, gate)
    check_inputs(x, kernel, gate, kernel_size, num_heads, weights_name="kernel")
    return _run(backend, x, kernel, gate, kernel_size, num_heads, 1, False, True)
