"""Triton kernels for window_conv and sgdc_conv (installed as sgdc_kernels.triton_ops).

Importing this module defines the operators ``sgdc::triton_forward`` / ``sgdc::triton_backward``
(ops.py) and exposes them as :data:`BACKEND` for the registry (sgdc_kernels.registry). The files:
common.py (what both kernel families share: notation, configurations, layout, helpers, launch),
taps.py (the per-tap kernels, variant v1), band.py (the band-matrix tl.dot kernels, variants
v2dot and v2dot16), ops.py (the operators, the variants and the launch parameters), sm90.py
(compiles every kernel for Hopper without a GPU and summarizes its SASS).

Under TRITON_INTERPRET=1 the kernels run on CPU tensors through Triton's interpreter (float32 only,
slow: for testing the kernels' logic on machines without a GPU).
"""

import torch

from sgdc_kernels.custom_ops import FLOATING_GPU, Backend

from .common import INTERPRET
from .ops import VARIANTS, sgdc_triton_backward, sgdc_triton_forward

BACKEND = Backend(
    "triton",
    sgdc_triton_forward,
    sgdc_triton_backward,
    frozenset({"cuda", "cpu"}) if INTERPRET else frozenset({"cuda"}),
    frozenset({torch.float32}) if INTERPRET else FLOATING_GPU,
    "fused Triton kernels, forward and deterministic backward"
    + (" (TRITON_INTERPRET=1: CPU tensors through the interpreter, float32)" if INTERPRET else ""),
    variants=VARIANTS,
)

__all__ = ["BACKEND"]
