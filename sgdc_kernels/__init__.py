"""sgdc-kernels: fast, exact Structurally-Guided Dynamic Convolution (SGDC) for PyTorch.

>>> from sgdc_kernels import sgdc_conv, available_backends, SGDC, SGE
"""

from ._version import __version__
from .custom_ops import Backend, BackendUnavailableError
from .modules import SGDC, SGE, LayerNorm2d
from .ops import sgdc_conv, window_conv
from .registry import available_backends, get_backend, unavailable_reason

__all__ = [
    "__version__",
    "sgdc_conv",
    "window_conv",
    "available_backends",
    "get_backend",
    "unavailable_reason",
    "Backend",
    "BackendUnavailableError",
    "LayerNorm2d",
    "SGDC",
    "SGE",
]
