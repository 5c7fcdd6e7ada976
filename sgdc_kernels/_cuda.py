"""Loader of the compiled CUDA extension ``sgdc_kernels._C`` (sources in csrc/).

The extension defines ``sgdc::cuda_forward`` and ``sgdc::cuda_backward`` in C++ with the schemas of
:mod:`sgdc_kernels.custom_ops`; their ``variant`` argument picks the kernels (``VARIANTS``, the
default first). Importing it calls :func:`_register` (from its module init), which
gives the operators their fake kernels and autograd through :func:`backends.register_ops`, once,
with or without a GPU.

An extension only loads into the torch it was compiled against (a C++ ABI). ``setup.py`` records
that torch's version in the generated module ``sgdc_kernels._build_config`` beside it, so a
mismatch is reported, with both versions and the fix, before the library is loaded (loading it
would fail with an undefined-symbol error, or worse, succeed and crash later).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from . import _install
from .custom_ops import FLOATING_GPU, Backend, BackendUnavailableError, register_ops

_HOW_TO_BUILD = (
    "rebuild it against the torch you run, from the repository root on a machine with a CUDA "
    "toolkit and a CUDA build of torch: CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e . "
    "(or '.' for a regular install; FORCE_CUDA=1 builds even when no GPU is visible; "
    "TORCH_CUDA_ARCH_LIST picks the GPUs)"
)

# Variants that compute sgdc_conv's configuration only (csrc/cuda/kernels.cuh, variant_runs).
DEFAULT_ONLY = frozenset({"v1", "v3"})

_registered = False


def _register() -> None:
    """Fake kernels and autograd for the C++ operators; called by the extension's module init."""
    global _registered
    if not _registered:
        register_ops(torch.ops.sgdc.cuda_forward.default, torch.ops.sgdc.cuda_backward.default)
        _registered = True


def built_against() -> str | None:
    """The torch version the extension was compiled against, as setup.py recorded it; None when
    no build recorded one."""
    try:
        config = importlib.import_module("sgdc_kernels._build_config")
    except ImportError:
        return None
    return getattr(config, "TORCH_VERSION", None)


def torch_mismatch() -> str | None:
    """Why the extension cannot load into the running torch, or None when the versions match (or
    none was recorded)."""
    built = built_against()
    if built is None or built == torch.__version__:
        return None
    return (
        f"the compiled extension sgdc_kernels._C was built against torch {built}, but torch "
        f"{torch.__version__} is running (a C++ extension only loads into the torch it was built "
        f"against); {_HOW_TO_BUILD}"
    )


def _find_extension():
    """The import spec of ``sgdc_kernels._C`` (found, not loaded), or None."""
    return importlib.util.find_spec("sgdc_kernels._C")


def _import_extension():
    """Import ``sgdc_kernels._C`` (which registers the sgdc::cuda_* operators, then calls
    _register()); ImportError with the reason when it is missing or built for another torch."""
    if _find_extension() is None:
        note = _install.shadowed_install_note()
        raise ImportError(note or "sgdc_kernels._C is not built")
    mismatch = torch_mismatch()
    if mismatch:
        raise ImportError(mismatch)
    return importlib.import_module("sgdc_kernels._C")


def build_info() -> dict | None:
    """What the extension was compiled for, e.g. ``{"archs": ["sm_80", "sm_90"], "cuda": "13.0",
    "torch": "2.14.1", "kernel variants": ["v2", "v3", "v1"]}``; None when it is not built (or does not
    load)."""
    try:
        ext = _import_extension()
    except ImportError:
        return None
    archs = []
    for item in ext.CUDA_ARCH_LIST.split(","):
        item = item.strip()
        if item.isdigit():  # nvcc's __CUDA_ARCH_LIST__ writes 800 for sm_80, 1000 for sm_100
            archs.append(f"sm_{int(item) // 10}")
    return {
        "archs": archs,
        "cuda": ext.CUDA_VERSION,
        "torch": ext.TORCH_VERSION or None,
        "kernel variants": ext.VARIANTS.split(","),  # the default first
    }


def load_backend() -> Backend:
    try:
        _import_extension()
    except ImportError as exc:
        reason = str(exc)
        if "undefined symbol" in reason:  # a build without a recorded torch version
            reason += " (the usual cause: it was built against another torch than the one running)"
        has_remedy = _HOW_TO_BUILD in reason or _install.EDITABLE_HINT in reason
        remedy = "" if has_remedy else f"; {_HOW_TO_BUILD}"
        raise BackendUnavailableError(f"backend 'cuda' is unavailable: {reason}{remedy}") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "backend 'cuda' is unavailable: the extension is built, but no CUDA GPU is visible "
            "(torch.cuda.is_available() is False); run on a machine with an NVIDIA GPU, or use "
            "backend='auto', which runs the 'torch' backend on the CPU"
        )
    fwd, bwd = torch.ops.sgdc.cuda_forward.default, torch.ops.sgdc.cuda_backward.default
    variants = tuple(build_info()["kernel variants"])
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
