"""What this installation can do: ``python -m sgdc_kernels.info``."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__, _install
from .registry import BACKEND_NAMES, get_backend, unavailable_reason


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extension_info() -> str:
    from . import _extension

    info = _extension.build_info()
    if info:
        return ", ".join(f"{k}: {' '.join(v) if isinstance(v, (list, tuple)) else v}" for k, v in info.items())
    if not _install.has_extension(_install.PACKAGE_DIR):
        return "not built" + (f" in this copy: {note}" if (note := _install.shadowed_install_note()) else "")
    return "built, but does not load (see the 'cuda' backend below)"


def _variants_line(name: str) -> str | None:
    backend = get_backend(name)
    if not backend.variants:
        return None
    limited = [v for v in backend.variants if v in backend.default_only]
    note = f"; {', '.join(limited)} run sgdc_conv's configuration only" if limited else ""
    return (
        f"            variants {', '.join(backend.variants)} (backend='{name}@<variant>'; "
        f"default {backend.variants[0]}{note})"
    )


def report() -> str:
    """The whole report, as ``python -m sgdc_kernels.info`` prints it."""
    lines = [
        f"sgdc-kernels {__version__}",
        f"loaded from {_install.describe()}",
        f"python      {platform.python_version()}",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})",
        f"triton      {_version('triton')}",
    ]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"GPU         {torch.cuda.get_device_name()} (sm_{major}{minor})")
    else:
        lines.append("GPU         none visible")
    lines.append(f"extension   sgdc_kernels._C: {_extension_info()}")
    lines.append("backends:")
    for name in BACKEND_NAMES:
        reason = unavailable_reason(name)
        if reason is None:
            backend = get_backend(name)
            devices = ",".join(sorted(backend.device_types))
            lines.append(f"  {name:<7} available   [{devices}] {backend.description}")
            variants = _variants_line(name)
            if variants:
                lines.append(variants)
        else:
            lines.append(f"  {name:<7} unavailable {reason}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
