"""The one registry of window_conv backends: their names, how each is loaded, and what "auto" picks.

Backends are loaded lazily, on first use, by a loader that returns a
:class:`~sgdc_kernels.custom_ops.Backend` or raises :class:`BackendUnavailableError` with the reason
and the remedy. A backend name may carry a kernel variant, ``"name@variant"`` (see
:func:`parse_backend`); :func:`resolve` turns a name into the backend and the variant that a call
passes to the backend's operators.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from . import _install
from .custom_ops import FLOATING_ALL, Backend, BackendUnavailableError, define_dots_op, define_ops

# ---------------------------------------------------------------------------------------------
# Loaders: one per backend. Each returns a Backend or raises BackendUnavailableError.
# ---------------------------------------------------------------------------------------------


def _load_reference(name: str) -> Backend:
    from . import reference

    if name == "unfold":
        # The oracle is plain differentiable PyTorch, not a custom operator: its gradients come
        # from autograd, independently of the hand-written backward formulas of the other
        # backends, and torch.compile traces it like the authors' code.
        def fwd(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax, variant):
            return reference.unfold_forward(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax)

        bwd = None
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
        module = _install.import_triton_ops()
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'triton' is unavailable: importing sgdc_kernels.triton_ops failed ({exc})"
        ) from exc
    return module.BACKEND


def _load_cuda(name: str) -> Backend:
    from . import _extension

    return _extension.load_cuda_backend()


def _load_cpu(name: str) -> Backend:
    from . import _extension

    return _extension.load_cpu_backend()


_LOADERS: dict[str, Callable[[str], Backend]] = {
    "unfold": _load_reference,
    "torch": _load_reference,
    "triton": _load_triton,
    "cuda": _load_cuda,
    "cpu": _load_cpu,
}

BACKEND_NAMES: tuple[str, ...] = tuple(_LOADERS)

# "auto" picks the first one that loads and accepts the tensors, in this order per device type.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


# name -> Backend, or the BackendUnavailableError that explains why it is missing.
_LOADED: dict[str, Backend | BackendUnavailableError] = {}
# name -> the window dot products of a loaded backend (dots_op), defined when it loads.
_DOTS: dict[str, Callable[..., torch.Tensor]] = {}


def _load(name: str) -> Backend | BackendUnavailableError:
    """Load backend ``name`` once; returns the Backend or the BackendUnavailableError."""
    if name not in _LOADED:
        try:
            backend = _LOADERS[name](name)
        except BackendUnavailableError as exc:
            _LOADED[name] = exc
        else:
            _DOTS[name] = _dots_of(backend)
            _LOADED[name] = backend
    return _LOADED[name]


def _dots_of(backend: Backend) -> Callable[..., torch.Tensor]:
    """A backend's window dot products (NATTEN's na2d_qk): the operator ``sgdc::<name>_dots`` made
    of its forward and backward operators; for a backend differentiated by autograd (the `unfold`
    oracle), its formulation, differentiated by autograd too."""
    if backend.backward is not None:
        return define_dots_op(backend)
    from . import reference

    def dots(grad_out, x, kernel_size, dilation, clamp, variant):
        return reference.unfold_dots(grad_out, x, kernel_size, dilation, clamp)

    return dots


def check_name(spec: object, *, allow_auto: bool = True) -> str:
    """``spec`` itself when it names a backend (``"name"`` or ``"name@variant"``, or ``"auto"``);
    else the TypeError / ValueError that every entry point raises for a mistyped backend. The
    variant is checked when the backend loads (:func:`parse_backend`)."""
    if not isinstance(spec, str):
        raise TypeError(f"backend: expected a str, got {type(spec).__name__}")
    name = spec.partition("@")[0]
    if name in _LOADERS or (allow_auto and spec == "auto"):
        return spec
    expected = ("'auto' or one of " if allow_auto else "one of ") + ", ".join(BACKEND_NAMES)
    raise ValueError(f"backend: unknown backend {name!r}; expected {expected}")


def _check_plain_name(name: object) -> None:
    check_name(name, allow_auto=False)
    if "@" in name:
        raise ValueError(f"backend: expected a backend name without a variant, got {name!r}")


def get_backend(name: str) -> Backend:
    """The loaded backend ``name``; raises ValueError for an unknown name and
    BackendUnavailableError when it cannot run on this machine."""
    _check_plain_name(name)
    loaded = _load(name)
    if isinstance(loaded, BackendUnavailableError):
        raise BackendUnavailableError(str(loaded))
    return loaded


def unavailable_reason(name: str) -> str | None:
    """None when backend ``name`` loads here, else why not; ValueError for an unknown name."""
    _check_plain_name(name)
    loaded = _load(name)
    return str(loaded) if isinstance(loaded, BackendUnavailableError) else None


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends that work on this machine; with ``device``, those that accept tensors
    on that device (``"cpu"``, ``"cuda"``, ``torch.device(...)``)."""
    names = [n for n in BACKEND_NAMES if unavailable_reason(n) is None]
    if device is not None:
        dtype = torch.device(device).type
        names = [n for n in names if dtype in get_backend(n).device_types]
    return names


# ---------------------------------------------------------------------------------------------
# Kernel variants: "name@variant"
# ---------------------------------------------------------------------------------------------


def parse_backend(spec: str) -> tuple[str, str | None]:
    """Split ``"name"`` or ``"name@variant"`` into (name, variant or None) and check both.

    ``"name@all"`` is returned as is (variant ``"all"``); :func:`expand_variants` lists them.
    Raises ValueError naming what was expected; the backend must load to check a variant.
    """
    check_name(spec, allow_auto=False)
    name, sep, variant = spec.partition("@")
    if not sep:
        return name, None
    backend = get_backend(name)
    if not backend.variants:
        raise ValueError(f"backend: {name!r} has no kernel variants; use {name!r} without '@{variant}'")
    if variant != "all" and variant not in backend.variants:
        raise ValueError(
            f"backend: unknown variant {variant!r} of {name!r}; expected 'all' or one of " + ", ".join(backend.variants)
        )
    return name, variant


def expand_variants(spec: str) -> list[str]:
    """``"name@all"`` -> ``["name@v1", "name@v2", ...]``; other specs are checked and kept."""
    name, variant = parse_backend(spec)
    if variant == "all":
        return [f"{name}@{v}" for v in get_backend(name).variants]
    return [spec]


# ---------------------------------------------------------------------------------------------
# Resolution, as sgdc_conv does it
# ---------------------------------------------------------------------------------------------


def _assume_constant_result(fn):
    # Exactly what torch.compiler.assume_constant_result does, without importing torch._dynamo
    # (1.6 s) at `import sgdc_kernels`. The tests compile a first call with fullgraph=True, which
    # fails if torch stops honouring the mark.
    fn._dynamo_marked_constant = True
    return fn


_WARNED_SHADOWED = []


@_assume_constant_result
def resolve_backend(spec: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend that ``spec`` (``"auto"``, ``"name"`` or ``"name@variant"``) means for tensors of
    this device type and dtype: its name.

    Raises ValueError / BackendUnavailableError / TypeError with what was expected. Under
    torch.compile this runs once at trace time and its result is a constant.
    """
    check_name(spec)
    if spec == "auto":
        for candidate in AUTO_ORDER.get(device_type, ("torch",)):
            loaded = _load(candidate)
            if not isinstance(loaded, BackendUnavailableError) and (
                device_type in loaded.device_types and dtype in loaded.dtypes
            ):
                return candidate
            if candidate == "cuda" and not _WARNED_SHADOWED:
                note = _install.shadowed_install_note()
                if note:  # the user installed the extension but imports a copy without it
                    _WARNED_SHADOWED.append(note)
                    warnings.warn(f"backend 'auto' skips 'cuda': {note}", stacklevel=4)
        raise ValueError(f"x: no backend accepts {dtype} tensors on device type {device_type!r}")
    name, _ = parse_backend(spec)
    backend = get_backend(name)
    if device_type not in backend.device_types:
        raise BackendUnavailableError(
            f"backend {name!r} does not run on {device_type!r} tensors; it accepts "
            f"{', '.join(sorted(backend.device_types))} tensors"
            + (
                " (set TRITON_INTERPRET=1 before importing triton to run it on the CPU)"
                if name == "triton" and device_type == "cpu"
                else f"; move the tensors there, or use backend='auto', which picks {AUTO_ORDER[device_type][0]!r}"
                if device_type in AUTO_ORDER
                else ""
            )
        )
    if dtype not in backend.dtypes:
        allowed = ", ".join(sorted(str(d).replace("torch.", "") for d in backend.dtypes))
        raise TypeError(f"x: backend {name!r} does not support dtype {dtype}; it supports {allowed}")
    return name


@_assume_constant_result
def resolve(
    spec: str, device_type: str, dtype: torch.dtype, dilation: int, clamp: bool, softmax: bool
) -> tuple[str, str]:
    """``(name, variant)``: the backend and the kernel variant that run a call of this
    configuration (``variant`` is ``""`` for a backend without variants). A variant that does not
    run the configuration raises ValueError, naming the variants that do. Under torch.compile the
    result is a constant of the graph."""
    name = resolve_backend(spec, device_type, dtype)
    backend = _LOADED[name]
    _, variant = parse_backend(spec) if spec != "auto" else (name, None)
    if variant is None:
        return name, backend.variant_for(dilation, clamp, softmax)
    if variant == "all":
        raise ValueError(f"backend: {spec!r} names every variant, which only bench/run.py runs; name one")
    if not backend.runs(variant, dilation, clamp, softmax):
        able = ", ".join(f"{name}@{v}" for v in backend.variants if backend.runs(v, dilation, clamp, softmax))
        raise ValueError(
            f"backend: {spec!r} runs only sgdc_conv's configuration (dilation=1, border='zero', "
            f"normalize='softmax'); got dilation={dilation}, border={'clamp' if clamp else 'zero'!r}, "
            f"normalize={'softmax' if softmax else None!r}; use {name!r} or one of {able}"
        )
    return name, variant


def forward_op(name: str) -> Callable[..., torch.Tensor]:
    """The forward of a backend that resolve_backend already loaded (a plain dict read, which
    torch.compile traces without re-running the loader)."""
    return _LOADED[name].forward


def dots_op(name: str) -> Callable[..., torch.Tensor]:
    """The window dot products of a backend that resolve_backend already loaded, with the schema
    of ``sgdc::<name>_dots`` (custom_ops.DOTS_SCHEMA); a plain dict read, as in forward_op."""
    return _DOTS[name]
