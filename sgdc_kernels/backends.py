"""The one registry of sgdc_conv backends.

Every backend but the `unfold` oracle (plain autograd) is a pair of ``torch.library`` operators in the ``sgdc`` namespace with the schemas
below, a forward and a backward, wired together by :func:`register_ops`:

    sgdc::<name>_forward(Tensor x, Tensor kernel, Tensor? gate, int kernel_size, int num_heads) -> Tensor
    sgdc::<name>_backward(Tensor grad_out, Tensor x, Tensor kernel, Tensor? gate,
                          int kernel_size, int num_heads) -> (Tensor, Tensor, Tensor)

The backward returns ``(d_x, d_kernel, d_gate)``; ``d_gate`` is an empty tensor when ``gate`` is
None. Both operators receive dense tensors that share one memory format (contiguous or
channels_last, chosen by ``x``) and return tensors shaped and laid out like their inputs
(``torch.empty_like``). Autograd saves only ``x``, ``kernel`` and ``gate``.

Backends are loaded lazily, on first use, by a loader that returns a :class:`Backend` or raises
:class:`BackendUnavailableError` with the reason and the remedy.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Callable, Optional

import torch

FORWARD_SCHEMA = "(Tensor x, Tensor kernel, Tensor? gate, int kernel_size, int num_heads) -> Tensor"
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor kernel, Tensor? gate, int kernel_size, int num_heads)"
    " -> (Tensor, Tensor, Tensor)"
)

FLOATING_GPU = frozenset({torch.float32, torch.float16, torch.bfloat16})
FLOATING_ALL = FLOATING_GPU | {torch.float64}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why and how to get it."""


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable  # the differentiable forward (an operator, or plain autograd for unfold)
    backward: Optional[Callable]  # the backward operator; None where autograd derives it
    device_types: frozenset  # device types whose tensors it accepts, e.g. {"cuda"}
    dtypes: frozenset  # dtypes it accepts
    description: str


# ---------------------------------------------------------------------------------------------
# Wiring shared by every backend: fake kernels and autograd.
# ---------------------------------------------------------------------------------------------


def _fake_forward(x, kernel, gate, kernel_size, num_heads):
    return torch.empty_like(x)


def _fake_backward(grad_out, x, kernel, gate, kernel_size, num_heads):
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(kernel), dgate


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _setup_context(ctx, inputs, output):
    x, kernel, gate, kernel_size, num_heads = inputs
    ctx.save_for_backward(x, kernel, gate)
    ctx.kernel_size = kernel_size
    ctx.num_heads = num_heads


def _autograd_backward(backward_op):
    def backward(ctx, grad_out):
        x, kernel, gate = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
        dx, dkernel, dgate = backward_op(grad_out, x, kernel, gate, ctx.kernel_size, ctx.num_heads)
        return dx, dkernel, (dgate if gate is not None else None), None, None

    return backward


def register_ops(forward_op, backward_op, *, fake: bool = True) -> None:
    """Give a forward/backward operator pair its fake kernels and its autograd formula.

    ``fake=False`` for operators that bring their own fake implementation (``triton_op`` traces
    its Python body with fake tensors).
    """
    if fake:
        torch.library.register_fake(forward_op, _fake_forward)
        torch.library.register_fake(backward_op, _fake_backward)
    torch.library.register_autograd(
        forward_op, _autograd_backward(backward_op), setup_context=_setup_context
    )


def define_ops(name: str, forward_impl: Callable, backward_impl: Callable):
    """Define ``sgdc::<name>_forward`` / ``sgdc::<name>_backward`` from Python functions.

    ``backward_impl`` may return None for ``d_gate``; it becomes the empty tensor of the schema.
    """

    def backward(grad_out, x, kernel, gate, kernel_size, num_heads):
        dx, dkernel, dgate = backward_impl(grad_out, x, kernel, gate, kernel_size, num_heads)
        return dx, dkernel, (dgate if dgate is not None else x.new_empty(0))

    fwd = torch.library.custom_op(
        f"sgdc::{name}_forward", forward_impl, mutates_args=(), schema=FORWARD_SCHEMA
    )
    bwd = torch.library.custom_op(
        f"sgdc::{name}_backward", backward, mutates_args=(), schema=BACKWARD_SCHEMA
    )
    register_ops(fwd, bwd)
    return fwd, bwd


# ---------------------------------------------------------------------------------------------
# Loaders: one per backend. Each returns a Backend or raises BackendUnavailableError.
# ---------------------------------------------------------------------------------------------


def _load_reference(name: str) -> Backend:
    from . import reference

    if name == "unfold":
        # The oracle is plain differentiable PyTorch, not a custom operator: its gradients come
        # from autograd, independently of the hand-written backward formulas of the other
        # backends, and torch.compile traces it like the authors' code.
        fwd, bwd = reference.unfold_forward, None
        desc = "the paper's F.unfold formulation (oracle; needs K*K times the input's memory)"
    else:
        fwd, bwd = define_ops("torch", reference.shift_forward, reference.shift_backward)
        desc = "pure PyTorch shift-and-accumulate, memory proportional to the input"
    return Backend(name, fwd, bwd, frozenset({"cpu", "cuda"}), FLOATING_ALL, desc)


def _load_triton(name: str) -> Backend:
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailableError(
            "backend 'triton' is unavailable: the triton package is not installed "
            "(pip install triton; it comes with CUDA builds of torch on Linux)"
        )
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        raise BackendUnavailableError(
            "backend 'triton' is unavailable: no CUDA GPU is visible (torch.cuda.is_available() is "
            "False). Run on a machine with an NVIDIA GPU, or set TRITON_INTERPRET=1 before importing "
            "triton to run the kernels on CPU tensors through the (slow) interpreter"
        )
    try:
        module = importlib.import_module("sgdc_kernels.triton_ops")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'triton' is unavailable: importing sgdc_kernels.triton_ops failed ({exc})"
        ) from exc
    return module.BACKEND


def _load_cuda(name: str) -> Backend:
    from . import _cuda

    return _cuda.load_backend()


_LOADERS: dict[str, Callable[[str], Backend]] = {
    "unfold": _load_reference,
    "torch": _load_reference,
    "triton": _load_triton,
    "cuda": _load_cuda,
}

BACKEND_NAMES = tuple(_LOADERS)

# "auto" picks the first one that loads and accepts the tensors, in this order per device type.
_AUTO_ORDER = {"cpu": ("torch",), "cuda": ("cuda", "triton", "torch")}


# name -> Backend, or the BackendUnavailableError that explains why it is missing.
_LOADED: dict[str, object] = {}


def _load(name: str):
    """Load backend ``name`` once; returns the Backend or the BackendUnavailableError."""
    if name not in _LOADED:
        try:
            _LOADED[name] = _LOADERS[name](name)
        except BackendUnavailableError as exc:
            _LOADED[name] = exc
    return _LOADED[name]


def get_backend(name: str) -> Backend:
    """The loaded backend ``name``; raises ValueError for an unknown name and
    BackendUnavailableError when it cannot run on this machine."""
    if name not in _LOADERS:
        raise ValueError(
            f"backend: unknown backend {name!r}; expected 'auto' or one of {', '.join(BACKEND_NAMES)}"
        )
    loaded = _load(name)
    if isinstance(loaded, BackendUnavailableError):
        raise BackendUnavailableError(str(loaded))
    return loaded


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend ``name`` loads here, else why not."""
    loaded = _load(name)
    return str(loaded) if isinstance(loaded, BackendUnavailableError) else None


def available_backends(device: Optional[str | torch.device] = None) -> list[str]:
    """Names of the backends that work on this machine; with ``device``, those that accept tensors
    on that device (``"cpu"``, ``"cuda"``, ``torch.device(...)``)."""
    names = [n for n in BACKEND_NAMES if unavailable_reason(n) is None]
    if device is not None:
        dtype = torch.device(device).type
        names = [n for n in names if dtype in _load(n).device_types]
    return names


def _assume_constant_result(fn):
    # Exactly what torch.compiler.assume_constant_result does, without importing torch._dynamo
    # (1.6 s) at `import sgdc_kernels`. The tests compile a first call with fullgraph=True, which
    # fails if torch stops honouring the mark.
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve_backend(name: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend that ``name`` means for tensors of this device type and dtype.

    Raises ValueError / BackendUnavailableError / TypeError with what was expected. Under
    torch.compile this runs once at trace time and its result is a constant.
    """
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
            loaded = _load(candidate)
            if not isinstance(loaded, BackendUnavailableError) and (
                device_type in loaded.device_types and dtype in loaded.dtypes
            ):
                return candidate
        raise ValueError(f"x: no backend accepts {dtype} tensors on device type {device_type!r}")
    backend = get_backend(name)
    if device_type not in backend.device_types:
        raise BackendUnavailableError(
            f"backend {name!r} does not run on {device_type!r} tensors; it accepts "
            f"{', '.join(sorted(backend.device_types))} tensors"
            + (
                " (set TRITON_INTERPRET=1 before importing triton to run it on the CPU)"
                if name == "triton" and device_type == "cpu"
                else ""
            )
        )
    if dtype not in backend.dtypes:
        allowed = ", ".join(sorted(str(d).replace("torch.", "") for d in backend.dtypes))
        raise TypeError(f"x: backend {name!r} does not support dtype {dtype}; it supports {allowed}")
    return name


def forward_op(name: str):
    """The forward of a backend that resolve_backend already loaded (a plain dict read, which
    torch.compile traces without re-running the loader)."""
    return _LOADED[name].forward
