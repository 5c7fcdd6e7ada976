"""SGD-Net, an application of the SGDC operator: lesion segmentation with its losses, metrics,
datasets and training CLI (``sgdc-train`` or ``python -m sgdc_kernels.segmentation.train``).

Needs the ``train`` extra (``pip install "sgdc-kernels[train]"``); importing this package without
it raises an ImportError that says so. The operator library (``sgdc_kernels``) does not need it.
"""

from __future__ import annotations

import importlib
import importlib.util

# import name -> distribution name, for what the application imports beyond torch
REQUIRED = {
    "timm": "timm",
    "monai": "monai",
    "torchvision": "torchvision",
    "tqdm": "tqdm",
    "PIL": "pillow",
    "numpy": "numpy",
    "scipy": "scipy",
}


def missing_requirements() -> list[str]:
    """Distributions of the ``train`` extra that are not importable here."""
    missing = []
    for module, dist in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # a module set to None in sys.modules, or without a spec
            found = False
        if not found:
            missing.append(dist)
    return missing


_missing = missing_requirements()
if _missing:
    raise ImportError(
        f"sgdc_kernels.segmentation needs the 'train' extra ({', '.join(_missing)} missing): "
        'pip install "sgdc-kernels[train]"'
    )

# Public names, imported on first use (timm and MONAI take seconds to import).
_EXPORTS = {
    "SGDNet": "models",
    "SGDNetOutput": "models",
    "SegEdgeLoss": "losses",
    "soft_dice_loss": "losses",
    "boundary_target": "losses",
    "MetricTracker": "metrics",
    "per_image_metrics": "metrics",
    "hd95": "metrics",
    "SyntheticLesions": "data",
    "LesionFolder": "data",
    "build_datasets": "data",
    "find_pairs": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
