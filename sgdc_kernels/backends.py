"""What every sgdc_conv backend is made of: the :class:`Backend` record and the wiring they share.

Every backend but the `unfold` oracle (plain autograd) is a pair of ``torch.library`` operators in
the ``sgdc`` namespace with the schemas below, a forward and a backward, wired together by
:func:`register_ops`:

    sgdc::<name>_forward(Tensor x, Tensor kernel, Tensor? gate, int kernel_size, int num_heads,
                         int dilation, bool clamp, bool softmax) -> Tensor
    sgdc::<name>_backward(Tensor grad_out, Tensor x, Tensor kernel, Tensor? gate, int kernel_size,
                          int num_heads, int dilation, bool clamp, bool softmax)
                          -> (Tensor, Tensor, Tensor)

``kernel`` holds the per-pixel weights (logits when ``softmax``); ``dilation``, ``clamp`` (NATTEN's
border: windows shifted to stay inside the image, instead of zeros outside it) and ``softmax``
select the configuration of the window sum (docs/op.md). ``sgdc_conv`` is ``dilation=1,
clamp=False, softmax=True``.

The backward returns ``(d_x, d_kernel, d_gate)``; ``d_gate`` is an empty tensor when ``gate`` is
None. Both operators receive dense tensors that share one memory format (contiguous or
channels_last, chosen by ``x``) and return tensors shaped and laid out like their inputs
(``torch.empty_like``). Autograd saves only ``x``, ``kernel`` and ``gate``.

This module imports nothing else from the package: the backends (reference.py, _cuda.py,
triton_ops/) import it to build themselves, and the registry (:mod:`sgdc_kernels.registry`) imports
them lazily, on first use. The fake kernels of the compiled extension must be registered from this
module (its C++ schemas name it), which is why :func:`register_ops` lives here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

_MODE_ARGS = "int kernel_size, int num_heads, int dilation, bool clamp, bool softmax"
FORWARD_SCHEMA = f"(Tensor x, Tensor kernel, Tensor? gate, {_MODE_ARGS}) -> Tensor"
BACKWARD_SCHEMA = f"(Tensor grad_out, Tensor x, Tensor kernel, Tensor? gate, {_MODE_ARGS}) -> (Tensor, Tensor, Tensor)"

FLOATING_GPU = frozenset({torch.float32, torch.float16, torch.bfloat16})
FLOATING_ALL = FLOATING_GPU | {torch.float64}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why and how to get it."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of sgdc_conv, as the registry hands it out.

    ``variants`` names alternative kernels of the same backend, chosen at call time through the
    environment variable ``variant_env`` (read by the kernels on each call). The first listed
    variant is the default, used while the variable is unset.
    """

    name: str
    forward: Callable[..., torch.Tensor]  # the differentiable forward (an operator, or plain autograd)
    backward: Callable[..., Any] | None  # the backward operator; None where autograd derives it
    device_types: frozenset[str]  # device types whose tensors it accepts, e.g. {"cuda"}
    dtypes: frozenset[torch.dtype]  # dtypes it accepts
    description: str
    variants: tuple[str, ...] = ()  # kernel variants; variants[0] is the default
    variant_env: str | None = None  # the environment variable that selects one, e.g. SGDC_CUDA_VARIANT

    def __post_init__(self) -> None:
        if self.variants and not self.variant_env:
            raise ValueError(f"Backend {self.name!r}: variants need a variant_env to select them")


# ---------------------------------------------------------------------------------------------
# Wiring shared by every backend: fake kernels and autograd.
# ---------------------------------------------------------------------------------------------


def _fake_forward(x, kernel, gate, *mode):
    return torch.empty_like(x)


def _fake_backward(grad_out, x, kernel, gate, *mode):
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(kernel), dgate


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _setup_context(ctx, inputs, output):
    x, kernel, gate, *mode = inputs
    ctx.save_for_backward(x, kernel, gate)
    ctx.mode = tuple(mode)  # kernel_size, num_heads, dilation, clamp, softmax


def _autograd_backward(backward_op):
    def backward(ctx, grad_out):
        x, kernel, gate = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
        dx, dkernel, dgate = backward_op(grad_out, x, kernel, gate, *ctx.mode)
        return dx, dkernel, (dgate if gate is not None else None), *(None for _ in ctx.mode)

    return backward


def register_ops(forward_op: Any, backward_op: Any, *, fake: bool = True) -> None:
    """Give a forward/backward operator pair its fake kernels and its autograd formula.

    ``fake=False`` for operators that bring their own fake implementation (``triton_op`` traces
    its Python body with fake tensors).
    """
    if fake:
        torch.library.register_fake(forward_op, _fake_forward)
        torch.library.register_fake(backward_op, _fake_backward)
    torch.library.register_autograd(forward_op, _autograd_backward(backward_op), setup_context=_setup_context)


def define_ops(name: str, forward_impl: Callable, backward_impl: Callable) -> tuple[Any, Any]:
    """Define ``sgdc::<name>_forward`` / ``sgdc::<name>_backward`` from Python functions.

    ``backward_impl`` may return None for ``d_gate``; it becomes the empty tensor of the schema.
    """

    def backward(grad_out, x, kernel, gate, kernel_size, num_heads, dilation, clamp, softmax):
        dx, dkernel, dgate = backward_impl(grad_out, x, kernel, gate, kernel_size, num_heads, dilation, clamp, softmax)
        return dx, dkernel, (dgate if dgate is not None else x.new_empty(0))

    fwd = torch.library.custom_op(f"sgdc::{name}_forward", forward_impl, mutates_args=(), schema=FORWARD_SCHEMA)
    bwd = torch.library.custom_op(f"sgdc::{name}_backward", backward, mutates_args=(), schema=BACKWARD_SCHEMA)
    register_ops(fwd, bwd)
    return fwd, bwd
