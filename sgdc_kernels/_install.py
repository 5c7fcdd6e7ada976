"""Which installed copy of the package is running, and where its compiled and Triton parts are.

In the repository, ``sgdc_kernels/``, ``triton_ops/`` and ``csrc/`` sit side by side; an install
maps ``triton_ops/`` to ``sgdc_kernels.triton_ops`` and compiles ``csrc/`` into
``sgdc_kernels._C``. Run from the repository root, Python imports the source tree first (the
current directory leads ``sys.path``). This module lets that copy find its Triton kernels, and says
plainly when it lacks the compiled extension that an installed copy elsewhere has.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from types import ModuleType

DIST = "sgdc-kernels"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
EDITABLE_HINT = "pip install -e . (from the repository root)"


def checkout_root() -> str | None:
    """The repository root when this copy of the package is a source checkout, else None."""
    root = os.path.dirname(PACKAGE_DIR)
    markers = ("setup.py", os.path.join("triton_ops", "__init__.py"), "csrc")
    return root if all(os.path.exists(os.path.join(root, m)) for m in markers) else None


def _distribution() -> importlib.metadata.Distribution | None:
    """The installed distribution. A regular install (``pip install .``) leaves its build metadata,
    ``sgdc_kernels.egg-info``, in the checkout; run from the repository root, importlib.metadata
    finds that first, though it describes no install: it is skipped."""
    root = checkout_root()
    for dist in importlib.metadata.distributions(name=DIST):
        base = os.path.realpath(str(dist.locate_file("")))
        if root is not None and base == os.path.realpath(root) and _editable_root(dist) is None:
            continue
        return dist
    return None


def _editable_root(dist: importlib.metadata.Distribution) -> str | None:
    """The source folder of an editable install (from its direct_url.json), else None."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return None
    url = info.get("url", "")
    if info.get("dir_info", {}).get("editable") and url.startswith("file://"):
        return os.path.realpath(url[len("file://") :])
    return None


def installed_copy() -> str | None:
    """The folder of the installed package (the checkout's for an editable install), or None."""
    dist = _distribution()
    if dist is None:
        return None
    editable = _editable_root(dist)
    if editable is not None:
        return os.path.join(editable, "sgdc_kernels")
    return os.path.realpath(str(dist.locate_file("sgdc_kernels")))


def has_extension(package_dir: str) -> bool:
    """Whether ``package_dir`` holds a compiled ``_C`` module (found, not loaded)."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return any(os.path.exists(os.path.join(package_dir, "_C" + s)) for s in suffixes)


def describe() -> str:
    """One line: which copy of the package is loaded, e.g. ``/src/sgdc_kernels (source checkout,
    editable install)``."""
    installed = installed_copy()
    here = os.path.realpath(PACKAGE_DIR)
    if checkout_root() is None:
        kind = (
            "installed, not editable" if installed == here else f"found on sys.path; the installed copy is {installed}"
        )
    elif installed == here:
        kind = "source checkout, editable install"
    elif installed is None:
        kind = f"source checkout, not installed; install it: {EDITABLE_HINT}"
    else:
        kind = f"source checkout, imported instead of the installed copy {installed}"
    return f"{here} ({kind})"


def shadowed_install_note() -> str | None:
    """Why the compiled extension is missing when this copy is a source checkout without it while
    the installed copy has it (the user runs from the repository root after a regular install)."""
    installed = installed_copy()
    here = os.path.realpath(PACKAGE_DIR)
    if checkout_root() is None or installed in (None, here) or has_extension(here):
        return None
    if not has_extension(installed):
        return None
    return (
        f"Python imported the source tree {here} (the current directory comes first on sys.path), "
        f"which has no compiled extension, instead of the installed copy {installed}, which has it. "
        f"Run from another directory, or install the checkout in place: {EDITABLE_HINT}"
    )


def import_triton_ops() -> ModuleType:
    """``sgdc_kernels.triton_ops``: the installed subpackage, or in a source checkout the
    repository's ``triton_ops/`` folder, loaded under that name."""
    name = "sgdc_kernels.triton_ops"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        root = checkout_root()
        if exc.name != name or root is None:
            raise
    folder = os.path.join(root, "triton_ops")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
