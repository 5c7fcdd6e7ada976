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

Each backend with a backward operator also gets the window dot products, the backward's weight
pass on its own, as an operator (:func:`define_dots_op`, registered when the backend loads):

    sgdc::<name>_dots(Tensor grad_out, Tensor x, int kernel_size, int dilation, bool clamp,
                      str variant) -> Tensor

per pixel p and tap t, ``sum_c grad_out[c, p] * x[c, tap_t(p)]`` for one head ((B, K*K, H, W));
NATTEN's ``na2d_qk`` is this operator with ``grad_out`` the query and ``x`` the key.

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


# ---------------------------------------------------------------------------------------------
# The window dot products (NATTEN's na2d_qk) on a backend's own operators.
# ---------------------------------------------------------------------------------------------

DOTS_SCHEMA = "(Tensor grad_out, Tensor x, int kernel_size, int dilation, bool clamp, str variant) -> Tensor"


def _dots_shape(x: torch.Tensor, kernel_size: int) -> tuple[int, ...]:
    return (x.shape[0], kernel_size * kernel_size, x.shape[2], x.shape[3])


def define_dots_op(backend: Backend) -> Any:
    """``sgdc::<name>_dots`` for a backend with forward and backward operators, made of them and
    of nothing else: with raw weights (no softmax), no gate and one head, the weight gradient of the
    window sum does not depend on the weights, so the backward operator called with zero weights
    returns the dot products as its ``d_weights`` (and a ``d_x`` of zeros, computed and discarded:
    that pass is the price of sharing the kernels). Its gradients are the same operators again:
    ``d grad_out`` is the forward with the incoming gradient as the weights, ``d x`` the backward's
    ``d_x`` with those weights. Inputs: dense, in one memory format; the result is in that format.
    """
    forward_op, backward_op = backend.forward, backend.backward

    def config(kernel_size, dilation, clamp, variant):
        return (kernel_size, 1, dilation, clamp, False, variant)  # one head, raw weights

    def dots(grad_out, x, kernel_size, dilation, clamp, variant):
        weights = x.new_zeros(_dots_shape(x, kernel_size)).contiguous(memory_format=memory_format_of(x))
        return backward_op(grad_out, x, weights, None, *config(kernel_size, dilation, clamp, variant))[1]

    def fake(grad_out, x, kernel_size, dilation, clamp, variant):
        return x.new_empty(_dots_shape(x, kernel_size)).contiguous(memory_format=memory_format_of(x))

    def setup_context(ctx, inputs, output):
        grad_out, x, *cfg = inputs
        ctx.save_for_backward(grad_out, x)
        ctx.config = config(*cfg)

    def backward(ctx, d_dots):
        grad_out, x = ctx.saved_tensors
        d_dots = d_dots.contiguous(memory_format=memory_format_of(x))
        d_grad_out = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad_out = forward_op(x, d_dots, None, *ctx.config)
        if ctx.needs_input_grad[1]:
            d_x = backward_op(grad_out, x, d_dots, None, *ctx.config)[0]
        return d_grad_out, d_x, None, None, None, None

    op = torch.library.custom_op(f"sgdc::{backend.name}_dots", dots, mutates_args=(), schema=DOTS_SCHEMA)
    torch.library.register_fake(op, fake)
    torch.library.register_autograd(op, backward, setup_context=setup_context)
    return op
