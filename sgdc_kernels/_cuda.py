"""Loader of the compiled CUDA extension ``sgdc_kernels._C`` (sources in csrc/).

The extension defines ``sgdc::cuda_forward`` and ``sgdc::cuda_backward`` in C++ with the schemas of
:mod:`sgdc_kernels.backends`; this module gives them fake kernels and autograd, once.
"""

from __future__ import annotations

import torch

from .backends import FLOATING_GPU, Backend, BackendUnavailableError, register_ops

_HOW_TO_BUILD = (
    "reinstall from a source checkout on a machine with a CUDA toolkit and a CUDA build of torch: "
    "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation . "
    "(FORCE_CUDA=1 builds even when no GPU is visible)"
)


def load_backend() -> Backend:
    try:
        from . import _C  # noqa: F401  (registers the sgdc::cuda_* operators)
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
    register_ops(fwd, bwd)
    return Backend(
        "cuda", fwd, bwd, frozenset({"cuda"}), FLOATING_GPU, "fused CUDA C++ kernels (csrc/)"
    )
