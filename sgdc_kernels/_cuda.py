"""Loader of the compiled CUDA extension ``sgdc_kernels._C`` (sources in csrc/).

The extension defines ``sgdc::cuda_forward`` and ``sgdc::cuda_backward`` in C++ with the schemas of
:mod:`sgdc_kernels.backends`. Importing it calls :func:`_register` (from its module init), which
gives the operators their fake kernels and autograd through :func:`backends.register_ops`, once,
with or without a GPU; the C++ schemas name this module as the home of those fakes.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backends import FLOATING_GPU, Backend, BackendUnavailableError, register_ops

_HOW_TO_BUILD = (
    "reinstall from a source checkout on a machine with a CUDA toolkit and a CUDA build of torch: "
    "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation . "
    "(FORCE_CUDA=1 builds even when no GPU is visible; TORCH_CUDA_ARCH_LIST picks the GPUs)"
)

_registered = False


def _register() -> None:
    """Fake kernels and autograd for the C++ operators; called by the extension's module init."""
    global _registered
    if not _registered:
        register_ops(torch.ops.sgdc.cuda_forward.default, torch.ops.sgdc.cuda_backward.default)
        _registered = True


def _import_extension():
    from . import _C  # registers the sgdc::cuda_* operators, then calls _register()

    return _C


def build_info() -> Optional[dict]:
    """What the extension was compiled for, e.g. ``{"archs": ["sm_80", "sm_90"], "cuda": "13.0",
    "torch": "2.14.1"}``; None when it is not built (or does not load)."""
    try:
        ext = _import_extension()
    except ImportError:
        return None
    archs = []
    for item in ext.CUDA_ARCH_LIST.split(","):
        item = item.strip()
        if item.isdigit():  # nvcc's __CUDA_ARCH_LIST__ writes 800 for sm_80, 1000 for sm_100
            archs.append(f"sm_{int(item) // 10}")
    return {"archs": archs, "cuda": ext.CUDA_VERSION, "torch": ext.TORCH_VERSION or None}


def load_backend() -> Backend:
    try:
        _import_extension()
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'cuda' is unavailable: the compiled extension sgdc_kernels._C is not built "
            f"or does not load ({exc}); {_HOW_TO_BUILD}"
        ) from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "backend 'cuda' is unavailable: the extension is built, but no CUDA GPU is visible "
            "(torch.cuda.is_available() is False)"
        )
    fwd, bwd = torch.ops.sgdc.cuda_forward.default, torch.ops.sgdc.cuda_backward.default
    return Backend(
        "cuda", fwd, bwd, frozenset({"cuda"}), FLOATING_GPU, "fused CUDA C++ kernels (csrc/)"
    )
