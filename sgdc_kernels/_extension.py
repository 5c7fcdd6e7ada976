"""Loader of the compiled extension ``sgdc_kernels._C`` (sources in csrc/): backends ``cpu`` and ``cuda``.

The extension defines ``sgdc::cpu_forward`` / ``sgdc::cpu_backward`` (the fused CPU kernels,
csrc/cpu/) and ``sgdc::cuda_forward`` / ``sgdc::cuda_backward`` (csrc/cuda/) in C++ with the schemas
of :mod:`sgdc_kernels.custom_ops`; their ``variant`` argument picks the kernels: for ``cpu`` the
instruction set (``CPU_VARIANTS``: those this CPU runs, the best first, e.g. ``avx512``, ``avx2``,
``baseline``), for ``cuda`` the kernel family (``VARIANTS``, the default first). Importing it calls
:func:`_register` (from its module init), which gives the operators their fake kernels and autograd
through :func:`backends.register_ops`, once, with or without a GPU.

Every build of the extension holds the CPU kernels (they need only a C++ compiler); the CUDA kernels
need a CUDA toolkit of torch's CUDA major at build time.

The extension is written on the LibTorch stable ABI and compiled for the stable ABI of torch 2.10
(``TORCH_TARGET``), so one build loads into every torch from that version on, whichever torch it
was compiled against. ``setup.py`` records both versions, and whether the build holds the CUDA
kernels, in the generated module ``sgdc_kernels._build_config`` beside it; a torch older than the
target, or a CPU-only torch under a build with CUDA kernels, is reported with the versions and the
fix before the library is loaded (loading it would fail with an undefined symbol, or a missing
CUDA library of torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import re

import torch

from . import _install
from .custom_ops import FLOATING_ALL, FLOATING_GPU, Backend, BackendUnavailableError, register_ops

_HOW_TO_BUILD = (
    "build it from the repository root on a machine with a CUDA toolkit: CUDA_HOME=/usr/local/cuda "
    "pip install -e . (or '.' for a regular install; FORCE_CUDA=1 builds the kernels even when no GPU "
    "is visible, and fails loudly when they cannot be built; TORCH_CUDA_ARCH_LIST picks the GPUs)"
)

# Variants that compute sgdc_conv's configuration only (csrc/cuda/kernels.cuh, variant_runs).
DEFAULT_ONLY = frozenset({"v1", "v3"})

_registered = False


def _register() -> None:
    """Fake kernels and autograd for the C++ operators; called by the extension's module init."""
    global _registered
    if not _registered:
        register_ops(torch.ops.sgdc.cuda_forward.default, torch.ops.sgdc.cuda_backward.default)
        if hasattr(torch.ops.sgdc, "cpu_forward"):  # absent from builds older than the CPU kernels
            register_ops(torch.ops.sgdc.cpu_forward.default, torch.ops.sgdc.cpu_backward.default)
        _registered = True


def _build_config():
    """The module setup.py wrote beside the extension, or None when no build recorded one."""
    try:
        return importlib.import_module("sgdc_kernels._build_config")
    except ImportError:
        return None


def built_against() -> str | None:
    """The torch version the extension was compiled against, as setup.py recorded it; None when
    no build recorded one."""
    return getattr(_build_config(), "TORCH_VERSION", None)


def torch_target() -> str | None:
    """The oldest torch the extension loads into (the stable ABI it targets), e.g. ``"2.10"``; None
    when no build recorded one."""
    return getattr(_build_config(), "TORCH_TARGET", None)


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def torch_mismatch() -> str | None:
    """Why the extension cannot load into the running torch, or None when it can (the running torch
    is at least the one it targets; or nothing was recorded)."""
    config = _build_config()
    built, target = getattr(config, "TORCH_VERSION", None), getattr(config, "TORCH_TARGET", None)
    if target is not None and _major_minor(torch.__version__) < _major_minor(target):
        return (
            f"the compiled extension sgdc_kernels._C needs torch {target} or newer (it is built on the "
            f"LibTorch stable ABI of torch {target}, against torch {built}), but torch {torch.__version__} "
            f"is running; upgrade torch (pip install 'torch>={target}'), which needs no rebuild"
        )
    if target is None and built is not None and built != torch.__version__:
        # a build from before the stable ABI, which loads only into the torch it was built against
        return (
            f"the compiled extension sgdc_kernels._C was built against torch {built}, but torch "
            f"{torch.__version__} is running (that build only loads into the torch it was built against); "
            f"rebuild it: {_HOW_TO_BUILD}"
        )
    if getattr(config, "KERNELS", False) and torch.version.cuda is None:
        return (
            f"the compiled extension sgdc_kernels._C holds CUDA kernels (CUDA {config.CUDA_VERSION}), "
            f"but torch {torch.__version__} is a CPU-only build, which lacks the CUDA libraries they "
            "link to; install a CUDA build of torch to use them"
        )
    return None


def _find_extension():
    """The import spec of ``sgdc_kernels._C`` (found, not loaded), or None."""
    return importlib.util.find_spec("sgdc_kernels._C")


def _import_extension():
    """Import ``sgdc_kernels._C`` (which registers the sgdc::cpu_* and sgdc::cuda_* operators, then
    calls _register()); ImportError with the reason when it is missing or cannot load into the running
    torch."""
    if _find_extension() is None:
        note = _install.shadowed_install_note()
        raise ImportError(note or "sgdc_kernels._C is not built")
    mismatch = torch_mismatch()
    if mismatch:
        raise ImportError(mismatch)
    return importlib.import_module("sgdc_kernels._C")


def build_info() -> dict | None:
    """What the extension was compiled for, e.g. ``{"archs": ["sm_80", "sm_90"], "cuda": "13.0",
    "torch": "2.14.1", "loads into": "torch 2.10 and later (stable ABI)", "kernel variants": ["v2",
    "v3", "v1"], "cpu kernels": "avx512 avx2 baseline compiled, avx512 runs here"}`` (``torch``: the
    torch it was compiled against); a build without CUDA kernels has ``"kernels"`` (why not) instead
    of archs, cuda and variants. None when it is not built (or does not load)."""
    try:
        ext = _import_extension()
    except ImportError:
        return None
    info = {}
    if ext.VARIANTS:
        archs = []
        for item in ext.CUDA_ARCH_LIST.split(","):
            item = item.strip()
            if item.isdigit():  # nvcc's __CUDA_ARCH_LIST__ writes 800 for sm_80, 1000 for sm_100
                archs.append(f"sm_{int(item) // 10}")
        info.update(archs=archs, cuda=ext.CUDA_VERSION)
    info["torch"] = ext.TORCH_VERSION or None
    if getattr(ext, "TORCH_TARGET", ""):
        info["loads into"] = f"torch {ext.TORCH_TARGET} and later (stable ABI)"
    if ext.VARIANTS:
        info["kernel variants"] = ext.VARIANTS.split(",")  # the default first
    else:
        info["kernels"] = f"no CUDA kernels, the CUDA operators' schemas only ({_no_kernels_reason()})"
    compiled, available = getattr(ext, "CPU_COMPILED", ""), getattr(ext, "CPU_VARIANTS", "")
    if compiled:
        info["cpu kernels"] = (
            f"{compiled.replace(',', ' ')} compiled, {available.split(',')[0] if available else 'none'} runs here"
        )
    else:
        info["cpu kernels"] = "none (a build from before the CPU kernels: rebuild it)"
    return info


def _no_kernels_reason() -> str:
    return getattr(_build_config(), "NO_KERNELS_REASON", None) or "no reason recorded"


# Parts of a reason that already say what to do.
_REMEDIES = ("pip install", "install a CUDA build of torch")


def _load_extension(name: str):
    """The extension module, for backend ``name``; BackendUnavailableError saying why it does not
    load, and how to fix it."""
    try:
        return _import_extension()
    except ImportError as exc:
        reason = str(exc)
        if "undefined symbol" in reason:
            target = torch_target() or "2.10"
            reason += (
                " (the running torch lacks a function of the LibTorch stable ABI that the extension uses: "
                f"it needs torch {target} or newer)"
            )
        elif "cannot open shared object file" in reason:
            built = getattr(_build_config(), "CUDA_VERSION", None) or "unknown"
            reason += (
                f" (a library the CUDA kernels link to is missing: they were built with CUDA {built}, the "
                f"running torch uses CUDA {torch.version.cuda or 'none: a CPU-only build'}); rebuild the "
                "extension against the torch you run: pip install --no-build-isolation ."
            )
        remedy = "" if any(r in reason for r in _REMEDIES) else f"; {_HOW_TO_BUILD}"
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}{remedy}") from exc


def load_cpu_backend() -> Backend:
    """Backend ``cpu``: the fused C++ CPU kernels; its variants are the instruction sets this CPU
    runs, the best first (the default)."""
    ext = _load_extension("cpu")
    variants = getattr(ext, "CPU_VARIANTS", "")
    if not variants:
        raise BackendUnavailableError(
            "backend 'cpu' is unavailable: the extension sgdc_kernels._C was built before the CPU kernels; "
            f"rebuild it: {_HOW_TO_BUILD}"
        )
    fwd, bwd = torch.ops.sgdc.cpu_forward.default, torch.ops.sgdc.cpu_backward.default
    return Backend(
        "cpu",
        fwd,
        bwd,
        frozenset({"cpu"}),
        FLOATING_ALL,
        "fused C++ CPU kernels (csrc/cpu/), vectorized, on torch's threads",
        variants=tuple(variants.split(",")),
    )


def load_cuda_backend() -> Backend:
    """Backend ``cuda``: the fused CUDA kernels."""
    ext = _load_extension("cuda")
    no_gpu = not torch.cuda.is_available()
    if not ext.VARIANTS:
        raise BackendUnavailableError(
            "backend 'cuda' is unavailable: the extension sgdc_kernels._C is built without CUDA kernels "
            f"(the CPU kernels and the CUDA operators' schemas only): {_no_kernels_reason()}"
            + ("; no CUDA GPU is visible here either" if no_gpu else "")
            + f"; {_HOW_TO_BUILD}"
        )
    if no_gpu:
        raise BackendUnavailableError(
            "backend 'cuda' is unavailable: the extension is built, but no CUDA GPU is visible "
            "(torch.cuda.is_available() is False); run on a machine with an NVIDIA GPU, or use "
            "backend='auto', which runs the 'cpu' backend (else 'torch') on the CPU"
        )
    fwd, bwd = torch.ops.sgdc.cuda_forward.default, torch.ops.sgdc.cuda_backward.default
    variants = tuple(ext.VARIANTS.split(","))
    return Backend(
        "cuda",
        fwd,
        bwd,
        frozenset({"cuda"}),
        FLOATING_GPU,
        "fused CUDA C++ kernels (csrc/)",
        variants=variants,
        default_only=DEFAULT_ONLY & frozenset(variants),
    )
