"""Checking an sgdc_conv implementation against the float64 oracle (like ``torch.testing``).

The test suite uses these for every backend; they are public so that a new backend, or a user's
own build, can be checked the same way:

    >>> from sgdc_kernels.testing import check_backend
    >>> check_backend("torch", (2, 8, 9, 11, 2, 3), torch.float32, "cpu")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .backends import memory_format_of
from .ops import sgdc_conv
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


def make_inputs(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    gate: bool = True,
    memory_format: torch.memory_format = torch.contiguous_format,
    scale: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Random ``x``, kernel logits (times ``scale``, so the softmax is far from uniform) and gate
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


def oracle(kernel_size: int, num_heads: int) -> Callable[..., Tensor]:
    """The paper's formulation in float64; its gradients come from autograd."""

    def fn(x, kernel, gate):
        gate = gate.double() if gate is not None else None
        return unfold_forward(x.double(), kernel.double(), gate, kernel_size, num_heads)

    return fn


def backend_fn(backend: str, kernel_size: int, num_heads: int) -> Callable[..., Tensor]:
    return lambda x, k, g: sgdc_conv(x, k, g, kernel_size=kernel_size, num_heads=num_heads, backend=backend)


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
    torch.testing.assert_close(
        actual.double(), expected.double(), **(tol or TOLERANCES[dtype]), msg=lambda m: f"{what}: {m}" if what else m
    )


def check_tensors(backend: str, tensors: Sequence[Tensor | None], kernel_size: int, num_heads: int) -> None:
    """``backend`` on these very tensors (any strides) against the oracle: forward and every
    gradient, and results laid out like ``torch.empty_like`` of the inputs in ``x``'s memory
    format (the gradients of ``unfold`` are autograd's, whatever their layout)."""
    x = tensors[0]
    check_strides = get_backend(backend).backward is not None
    dtype = x.dtype
    grad_out = torch.randn(x.shape, device=x.device).to(dtype)
    out, grads = forward_backward(backend_fn(backend, kernel_size, num_heads), tensors, grad_out)
    ref_out, ref_grads = forward_backward(oracle(kernel_size, num_heads), tensors, grad_out.double())
    assert out.dtype == dtype and out.shape == x.shape
    tol = tolerances(backend, dtype)
    assert_close(out, ref_out, dtype, "out", tol)
    fmt = memory_format_of(x)
    present = [t for t in tensors if t is not None]
    for name, got, want, inp in zip(("d_x", "d_kernel", "d_gate"), grads, ref_grads, present):
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
) -> None:
    """Fresh random inputs of ``shape = (B, C, H, W, num_heads, kernel_size)``; see check_tensors."""
    *_, G, K = shape
    tensors = make_inputs(shape, dtype, device, gate=gate, memory_format=memory_format)
    check_tensors(backend, tensors, K, G)
