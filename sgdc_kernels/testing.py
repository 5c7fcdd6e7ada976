"""Checking a window_conv backend against the float64 oracle (like ``torch.testing``).

The test suite uses these for every backend; they are public so that a new backend, or a user's
own build, can be checked the same way:

    >>> from sgdc_kernels.testing import check_backend
    >>> check_backend("torch", (2, 8, 9, 11, 2, 3), torch.float32, "cpu")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .custom_ops import memory_format_of
from .ops import window_conv
from .reference import unfold_forward
from .registry import get_backend

Tensor = torch.Tensor

# Forward and gradients of a float32-accumulating backend against the float64 oracle computed from
# the same (rounded) inputs.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# One window_conv call per kind of configuration (keyword arguments), for the tests of the export
# paths (ONNX, AOTInductor): both borders, raw weights, dilation, K=1, one head and several.
EXPORT_CONFIGS = (
    dict(kernel_size=3, num_heads=2),
    dict(kernel_size=5, num_heads=2, border="clamp", normalize=None),
    dict(kernel_size=3, num_heads=1, dilation=2),
    dict(kernel_size=3, num_heads=2, dilation=2, border="clamp"),
    dict(kernel_size=1, num_heads=2, normalize=None),
)


def make_inputs(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    gate: bool = True,
    memory_format: torch.memory_format = torch.contiguous_format,
    scale: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Random ``x``, weights as logits (times ``scale``, so the softmax is far from uniform) and gate
    logits (or None) for ``shape = (B, C, H, W, num_heads, kernel_size)``."""
    B, C, H, W, G, K = shape

    def make(channels, s=1.0):
        t = (s * torch.randn(B, channels, H, W, device=device)).to(dtype)
        return t.contiguous(memory_format=memory_format)

    return make(C), make(G * K * K, scale), (make(C) if gate else None)


def forward_backward(
    fn: Callable[..., Tensor], tensors: Sequence[Tensor | None], grad_out: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``fn(*leaves)`` and the gradients of ``<fn(...), grad_out>`` for leaves made from ``tensors``
    (``detach`` keeps their strides; a None stays None and gets no gradient)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)


def mode_args(mode: dict | None) -> tuple[int, bool, bool]:
    """``(dilation, clamp, softmax)`` of window_conv keywords ``dilation``, ``border``, ``normalize``."""
    mode = mode or {}
    return mode.get("dilation", 1), mode.get("border", "zero") == "clamp", mode.get("normalize", "softmax") is not None


def oracle(kernel_size: int, num_heads: int, mode: dict | None = None) -> Callable[..., Tensor]:
    """The paper's formulation in float64; its gradients come from autograd. ``mode``: the
    window_conv keywords ``dilation``, ``border``, ``normalize`` (default: sgdc_conv's)."""

    def fn(x, weights, gate):
        gate = gate.double() if gate is not None else None
        return unfold_forward(x.double(), weights.double(), gate, kernel_size, num_heads, *mode_args(mode))

    return fn


def natten_window_start(i: int, n: int, kernel_size: int, dilation: int) -> int:
    """NATTEN's ``get_window_start``, by its own formula: the first index of pixel ``i``'s clamped
    window on an axis of length ``n`` (independent of :func:`reference.window_starts`)."""
    K, d, r = kernel_size, dilation, kernel_size // 2
    if d == 1:
        return max(i - r, 0) + (i + r >= n) * (n - i - r - 1)
    if i - r * d < 0:
        return i % d
    if i + r * d >= n:
        a = (n // d) * d
        b = n - a
        return n - b + i % d - 2 * r * d if i % d < b else a + i % d - K * d
    return i - r * d


def gather_reference(
    x: Tensor, weights: Tensor, gate: Tensor | None, kernel_size: int, num_heads: int, mode: dict | None = None
) -> Tensor:
    """The window sum written from its definition, independently of ``F.unfold`` and of the
    backends, in float64: for every tap, the image index each pixel reads along each axis (NATTEN's
    window start for clamped windows, computed by its own formula), zero where it leaves the image.
    Differentiable by autograd."""
    dilation, clamp, softmax = mode_args(mode)
    B, C, H, W = x.shape
    K, G, d, r = kernel_size, num_heads, dilation, kernel_size // 2

    def start(i: int, n: int) -> int:
        return natten_window_start(i, n, K, d) if clamp else i - r * d

    w = weights.double().reshape(B, G, K * K, H, W)
    w = w.softmax(dim=2) if softmax else w
    xs = x.double().reshape(B, G, C // G, H, W)
    out = torch.zeros_like(xs)
    for u in range(K):
        rows = torch.tensor([start(i, H) + u * d for i in range(H)], device=x.device)
        for v in range(K):
            cols = torch.tensor([start(j, W) + v * d for j in range(W)], device=x.device)
            inside = ((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :]
            tap = torch.where(inside, xs[..., rows.clamp(0, H - 1), :][..., cols.clamp(0, W - 1)], 0.0)
            out = out + w[:, :, None, u * K + v] * tap
    out = out.reshape(B, C, H, W)
    return out * torch.sigmoid(gate.double()) if gate is not None else out


def backend_fn(backend: str, kernel_size: int, num_heads: int, mode: dict | None = None) -> Callable[..., Tensor]:
    return lambda x, k, g: window_conv(
        x, k, g, kernel_size=kernel_size, num_heads=num_heads, backend=backend, **(mode or {})
    )


# `unfold` computes in the input's dtype, softmax and einsum included (as the authors' code does
# under autocast), so in 16 bits it rounds every intermediate and gets looser bounds.
NATIVE_PRECISION_TOLERANCES = {
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=8e-2, rtol=8e-2),
}


def tolerances(backend: str, dtype: torch.dtype) -> dict:
    if backend == "unfold" and dtype in NATIVE_PRECISION_TOLERANCES:
        return NATIVE_PRECISION_TOLERANCES[dtype]
    return TOLERANCES[dtype]


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "", tol: dict | None = None) -> None:
    """``torch.testing.assert_close`` in float64 with the dtype's tolerances; NaN must stand exactly
    where ``expected`` has NaN, and infinities must match (docs/op.md, "Non-finite inputs")."""
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        **(tol or TOLERANCES[dtype]),
        equal_nan=True,
        msg=lambda m: f"{what}: {m}" if what else m,
    )


def error_scales(
    tensors: Sequence[Tensor | None],
    grad_out: Tensor,
    kernel_size: int,
    num_heads: int,
    mode: dict | None = None,
    *,
    spread: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Per element of ``out`` and of each gradient (d_x, d_weights, d_gate when there is a gate), the
    sum of the magnitudes of the terms that the definition adds up (docs/op.md), in float64.

    Any order of summing n terms with unit roundoff u is within n*u times this of the exact sum,
    whatever the cancellation, so a tolerance proportional to it holds where |result| is small.
    out: s * sum_t P_t |x_t|; d_x: sum over the (p, t) reading x of P_t(p) s |dout|; dP:
    sum_c s |dout| |x_t|, and d_weights P_t (dP_t + sum_t' P_t' dP_t') with the softmax, dP without;
    d_gate: |dout| y s (1 - s) with y = sum_t P_t |x_t|, plus |dout| y s, the scale of the rounding
    of 1 - s, which is absolute. P is the softmax of the logits, or |weights| without it.

    ``spread=True`` gives the same sums with each probability P_t weighted by |l_t - max_t' l_t'|:
    a softmax that subtracts the max rounds that difference, so exp(l_t - max) is off by up to
    |l_t - max| units of roundoff, relative (0 with raw weights)."""
    dilation, clamp, softmax = mode_args(mode)
    x, weights, gate = (t.detach().double() if t is not None else None for t in tensors)
    B, _, H, W = x.shape
    KK = kernel_size**2

    def per_pixel(t: Tensor) -> Tensor:  # (B, G, KK, H, W)
        return t.reshape(B, num_heads, KK, H, W)

    if softmax:
        p = per_pixel(weights).softmax(dim=2)
        spread_p = (per_pixel(weights) - per_pixel(weights).amax(dim=2, keepdim=True)).abs()
        q = torch.where(p > 0, p * spread_p, 0.0) if spread else p
    else:
        p = per_pixel(weights).abs()
        q = torch.zeros_like(p) if spread else p
    raw = {"dilation": dilation, "border": "clamp" if clamp else "zero", "normalize": None}
    dout = grad_out.detach().double().abs()
    out, grads = forward_backward(oracle(kernel_size, num_heads, raw), (x.abs(), q.reshape(weights.shape), gate), dout)
    dx, dp = grads[0], per_pixel(grads[1])
    if softmax:
        dweights = q * (dp + (p * dp).sum(dim=2, keepdim=True))
        if spread:
            dweights = dweights + p * (q * dp).sum(dim=2, keepdim=True)
    else:
        dweights = dp
    dweights = dweights.reshape(weights.shape)
    if gate is None:
        return out, (dx, dweights)
    return out, (dx, dweights, grads[2] if spread else grads[2] + dout * out)


def underflow_reference(
    tensors: Sequence[Tensor | None],
    grad_out: Tensor,
    kernel_size: int,
    num_heads: int,
    mode: dict | None = None,
    *,
    tiny: float,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The oracle's out and gradients in float64 with every probability below ``tiny`` set to 0, as a
    backend whose precision flushes or rounds them to 0 computes them (``tiny``: the smallest normal
    number of that precision). They differ from the oracle's only where such a probability meets
    an infinity (0 * inf = NaN where the oracle has +-inf); with raw weights they are the oracle's."""
    dilation, clamp, softmax = mode_args(mode)
    x, weights, gate = (t.detach().double() if t is not None else None for t in tensors)
    dout = grad_out.detach().double()
    if not softmax:
        return forward_backward(oracle(kernel_size, num_heads, mode), (x, weights, gate), dout)
    B, _, H, W = x.shape
    shape5 = (B, num_heads, kernel_size**2, H, W)
    p = weights.reshape(shape5).softmax(dim=2)
    p = torch.where(p < tiny, 0.0, p)
    raw = {"dilation": dilation, "border": "clamp" if clamp else "zero", "normalize": None}
    out, grads = forward_backward(oracle(kernel_size, num_heads, raw), (x, p.reshape(weights.shape), gate), dout)
    dp = grads[1].reshape(shape5)
    dweights = (p * (dp - (p * dp).sum(dim=2, keepdim=True))).reshape(weights.shape)
    return out, (grads[0], dweights, *grads[2:])


def assert_close_scaled(
    actual: Tensor,
    expected: Tensor,
    tol: Tensor,
    *,
    what: str = "",
    alternative: Tensor | None = None,
) -> None:
    """|actual - expected| <= ``tol`` elementwise where ``expected`` is finite, NaN exactly where it
    has NaN, and the same infinities (docs/op.md, "Non-finite inputs"). ``alternative``, if given,
    is what the same arithmetic gives where some probabilities are 0 instead of tiny (they underflow
    in the backend's precision): where the two differ in their NaN or infinities, ``actual`` may be
    NaN or match either."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    tol = tol.double()

    def matches(ref: Tensor) -> Tensor:
        finite = ref.isfinite()
        close = (a - torch.where(finite, ref, 0.0)).abs() <= torch.where(finite, tol, 0.0)
        return torch.where(finite, close & a.isfinite(), (ref.isnan() & a.isnan()) | (ref.isinf() & (a == ref)))

    ok = matches(e)
    if alternative is not None:
        alt = alternative.detach().double()
        ambiguous = (e.isnan() != alt.isnan()) | (e.isinf() != alt.isinf()) | (e.isinf() & alt.isinf() & (e != alt))
        ok |= ambiguous & (a.isnan() | matches(alt))
    if not ok.all():
        k = int((~ok).reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ; first at flat index {k}: got "
            f"{a.reshape(-1)[k].item():.8g}, expected {e.reshape(-1)[k].item():.8g}, tolerance "
            f"{tol.reshape(-1)[k].item():.3g}"
        )


def check_tensors(
    backend: str, tensors: Sequence[Tensor | None], kernel_size: int, num_heads: int, mode: dict | None = None
) -> None:
    """``backend`` on these very tensors (any strides) against the oracle: forward and every
    gradient, and results laid out like ``torch.empty_like`` of the inputs in ``x``'s memory
    format (the gradients of ``unfold`` are autograd's, whatever their layout). ``mode``: the
    window_conv keywords ``dilation``, ``border``, ``normalize`` (default: sgdc_conv's)."""
    x = tensors[0]
    check_strides = get_backend(backend.partition("@")[0]).backward is not None
    dtype = x.dtype
    grad_out = torch.randn(x.shape, device=x.device).to(dtype)
    out, grads = forward_backward(backend_fn(backend, kernel_size, num_heads, mode), tensors, grad_out)
    ref_out, ref_grads = forward_backward(oracle(kernel_size, num_heads, mode), tensors, grad_out.double())
    assert out.dtype == dtype and out.shape == x.shape
    tol = tolerances(backend, dtype)
    assert_close(out, ref_out, dtype, "out", tol)
    fmt = memory_format_of(x)
    present = [t for t in tensors if t is not None]
    for name, got, want, inp in zip(("d_x", "d_weights", "d_gate"), grads, ref_grads, present):
        assert got.dtype == dtype, name
        if check_strides:
            assert got.stride() == torch.empty_like(inp.contiguous(memory_format=fmt)).stride(), name
        assert_close(got, want, dtype, name, tol)
    assert out.stride() == torch.empty_like(x.contiguous(memory_format=fmt)).stride(), "out"


def check_backend(
    backend: str,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    gate: bool = True,
    memory_format: torch.memory_format = torch.contiguous_format,
    mode: dict | None = None,
) -> None:
    """Fresh random inputs of ``shape = (B, C, H, W, num_heads, kernel_size)``; see check_tensors."""
    *_, G, K = shape
    tensors = make_inputs(shape, dtype, device, gate=gate, memory_format=memory_format)
    check_tensors(backend, tensors, K, G, mode)
