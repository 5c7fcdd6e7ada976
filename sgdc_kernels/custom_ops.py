"""The custom operators every backend defines, and the :class:`Backend` record the registry hands out.

Every backend but the `unfold` oracle (plain autograd) is a pair of ``torch.library`` operators in the
``sgdc`` namespace with these schemas, a forward and a backward, wired together by
:func:`register_ops`:

    sgdc::<name>_forward(Tensor x, Tensor weights, Tensor? gate, int kernel_size, int num_heads,
                         int dilation, bool clamp, bool softmax, str variant) -> Tensor
    sgdc::<name>_backward(Tensor grad_out, Tensor x, Tensor weights, Tensor? gate, int kernel_size,
                          int num_heads, int dilation, bool clamp, bool softmax, str variant)
                          -> (Tensor, Tensor, Tensor)

``weights`` holds the per-pixel weights of the taps (logits when ``softmax``); ``dilation``,
``clamp`` (NATTEN's border: windows shifted to stay inside the image, instead of zeros outside it)
and ``softmax`` select the configuration of the window sum (docs/op.md); ``sgdc_conv`` is
``dilation=1, clamp=False, softmax=True``. ``variant`` names the kernel variant that runs the call
(one of :attr:`Backend.variants`, or ``""`` for a backend without variants): it is an argument, so
two variants can run in one process and in one compiled graph.

The backward returns ``(d_x, d_weights, d_gate)``; ``d_gate`` is an empty tensor when ``gate`` is
None. Both operators receive dense tensors that share one memory format (contiguous or
channels_last, chosen by ``x``) and return tensors shaped and laid out like their inputs
(``torch.empty_like``). Autograd saves only ``x``, ``weights`` and ``gate``.

This module imports nothing else from the package: the backends (reference.py, _extension.py,
triton_ops/) import it to build themselves, and the registry (:mod:`sgdc_kernels.registry`) imports
them lazily, on first use. The fake kernels of the compiled extension must be registered from this
module (its C++ schemas name it), which is why :func:`register_ops` lives here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

_CONFIG_ARGS = "int kernel_size, int num_heads, int dilation, bool clamp, bool softmax, str variant"
FORWARD_SCHEMA = f"(Tensor x, Tensor weights, Tensor? gate, {_CONFIG_ARGS}) -> Tensor"
BACKWARD_SCHEMA = (
    f"(Tensor grad_out, Tensor x, Tensor weights, Tensor? gate, {_CONFIG_ARGS}) -> (Tensor, Tensor, Tensor)"
)

FLOATING_GPU = frozenset({torch.float32, torch.float16, torch.bfloat16})
FLOATING_ALL = FLOATING_GPU | {torch.float64}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why and how to get it."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of window_conv, as the registry hands it out.

    ``variants`` names alternative kernels of the same backend, in order of preference; a call
    names one in its ``variant`` argument (``backend="cuda@v1"``), and a call that names none runs
    the first variant that runs its configuration. ``default_only`` lists the variants that run
    only sgdc_conv's configuration (dilation 1, zero border, softmax).
    """

    name: str
    forward: Callable[..., torch.Tensor]  # the differentiable forward (an operator, or plain autograd)
    backward: Callable[..., Any] | None  # the backward operator; None where autograd derives it
    device_types: frozenset[str]  # device types whose tensors it accepts, e.g. {"cuda"}
    dtypes: frozenset[torch.dtype]  # dtypes it accepts
    description: str
    variants: tuple[str, ...] = ()  # kernel variants, the default first
    default_only: frozenset[str] = frozenset()  # variants limited to sgdc_conv's configuration

    def __post_init__(self) -> None:
        unknown = set(self.default_only) - set(self.variants)
        if unknown:
            raise ValueError(f"Backend {self.name!r}: default_only names unknown variants {sorted(unknown)}")
        if self.variants and self.variants[0] in self.default_only:
            raise ValueError(f"Backend {self.name!r}: the default variant must run every configuration")

    def runs(self, variant: str, dilation: int, clamp: bool, softmax: bool) -> bool:
        """Whether ``variant`` computes this configuration of the window sum."""
        return variant not in self.default_only or (dilation == 1 and not clamp and softmax)

    def variant_for(self, dilation: int, clamp: bool, softmax: bool) -> str:
        """The variant a call that names none runs: the first listed that runs the configuration
        (``""`` for a backend without variants)."""
        return next((v for v in self.variants if self.runs(v, dilation, clamp, softmax)), "")


# ---------------------------------------------------------------------------------------------
# Wiring shared by every backend: fake kernels and autograd.
# ---------------------------------------------------------------------------------------------


def _fake_forward(x, weights, gate, *config):
    return torch.empty_like(x)


def _fake_backward(grad_out, x, weights, gate, *config):
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weights), dgate


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _setup_context(ctx, inputs, output):
    x, weights, gate, *config = inputs
    ctx.save_for_backward(x, weights, gate)
    ctx.config = tuple(config)  # kernel_size, num_heads, dilation, clamp, softmax, variant


def _autograd_backward(backward_op):
    def backward(ctx, grad_out):
        x, weights, gate = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
        dx, dweights, dgate = backward_op(grad_out, x, weights, gate, *ctx.config)
        return dx, dweights, (dgate if gate is not None else None), *(None for _ in ctx.config)

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
    """Define ``sgdc::<name>_forward`` / ``sgdc::<name>_backward`` from Python functions of
    ``(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax)``, for a backend without
    kernel variants (the operators accept only ``variant=""``).

    ``backward_impl`` may return None for ``d_gate``; it becomes the empty tensor of the schema.
    """

    def check_variant(variant):
        if variant:
            raise ValueError(f"backend: {name!r} has no kernel variants; got variant {variant!r}")

    def forward(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax, variant):
        check_variant(variant)
        return forward_impl(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax)

    def backward(grad_out, x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax, variant):
        check_variant(variant)
        config = (kernel_size, num_heads, dilation, clamp, softmax)
        dx, dweights, dgate = backward_impl(grad_out, x, weights, gate, *config)
        return dx, dweights, (dgate if dgate is not None else x.new_empty(0))

    fwd = torch.library.custom_op(f"sgdc::{name}_forward", forward, mutates_args=(), schema=FORWARD_SCHEMA)
    bwd = torch.library.custom_op(f"sgdc::{name}_backward", backward, mutates_args=(), schema=BACKWARD_SCHEMA)
    register_ops(fwd, bwd)
    return fwd, bwd
