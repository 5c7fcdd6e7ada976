"""The stable-ABI promise across torch releases: the extension built against one torch loads into another.

The other torch is torch 2.13.0+cpu (``SGDC_OTHER_TORCH``), in a virtual environment of its own:
the interpreter named by ``SGDC_OTHER_TORCH_PYTHON``, or one this file creates and caches under
``~/.cache/sgdc_kernels`` (pip must find that torch, e.g. through PyTorch's CPU wheel index in
``PIP_EXTRA_INDEX_URL``). Two directions:

- built against torch 2.13.0 (CPU-only, so the operators' schemas without CUDA kernels), as a wheel,
  then loaded under the running torch: the library loads, registers the schemas of
  sgdc_kernels.custom_ops with their fake kernels, and the ``cuda`` backend is unavailable only for
  want of kernels (and of a GPU), never for an ABI mismatch;
- the running torch's CUDA build of this checkout (the editable install's, or a wheel built here)
  under torch 2.13.0: the package reports, before loading, that CUDA kernels need a CUDA build of
  torch; loading the library anyway fails only for a missing CUDA library of torch, and every
  symbol of the stable ABI it uses outside CUDA is exported by torch 2.13.0.

Slow (minutes: a virtual environment with torch, a build), so it runs only when asked for with
``-m slow``: ``pytest -m slow tests/test_stable_abi.py -v -rs -s`` (``-s`` shows what each direction
saw). Run it before a release (docs/backends.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sgdc_kernels.custom_ops import BACKWARD_SCHEMA, FORWARD_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
OTHER_TORCH = os.environ.get("SGDC_OTHER_TORCH", "2.13.0+cpu")
CACHE = Path.home() / ".cache" / "sgdc_kernels"
# Libraries a CUDA build of torch has and a CPU-only one lacks.
CUDA_LIBRARIES = ("libtorch_cuda.so", "libc10_cuda.so", "libcudart.so")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip(
            f"slow (a virtual environment with torch {OTHER_TORCH} and a build, minutes): "
            "run it with pytest -m slow tests/test_stable_abi.py"
        )


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


def _torch_version(python) -> str | None:
    res = _run([python, "-c", "import torch; print(torch.__version__)"])
    return res.stdout.strip() if res.returncode == 0 else None


@pytest.fixture(scope="module")
def other_python() -> Path:
    """An interpreter whose torch is OTHER_TORCH, in an environment that does not see this one's."""
    named = os.environ.get("SGDC_OTHER_TORCH_PYTHON")
    if named:
        version = _torch_version(named)
        if version != OTHER_TORCH:
            pytest.skip(f"SGDC_OTHER_TORCH_PYTHON={named} runs torch {version}, not {OTHER_TORCH}")
        return Path(named)
    venv = CACHE / f"venv-torch-{OTHER_TORCH}"
    python = venv / "bin" / "python"
    if python.exists() and _torch_version(python) == OTHER_TORCH:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    res = _run([sys.executable, "-m", "venv", venv])
    if res.returncode != 0:
        pytest.skip(f"cannot create a virtual environment for torch {OTHER_TORCH}: {res.stderr.strip()[-500:]}")
    # the build's requirements too: the extension is built there without isolation
    res = _run([python, "-m", "pip", "install", "-q", f"torch=={OTHER_TORCH}", "numpy", "setuptools>=69", "wheel",
                "ninja"], timeout=1200)  # fmt: skip
    if res.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"torch {OTHER_TORCH} is not installable here: {last}")
    assert _torch_version(python) == OTHER_TORCH
    return python


def _copy_checkout(dest: Path) -> Path:
    """The tracked files of the checkout (not its build products) in dest."""
    files = _run(["git", "ls-files"], cwd=ROOT)
    if files.returncode != 0:
        pytest.skip("not a git checkout: cannot copy the tracked files")
    for rel in files.stdout.split():
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def _build_wheel(python, src: Path, out: Path, **env) -> tuple[Path, str]:
    """A wheel of src built by python's torch, without isolation; (the wheel, the build's log)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "SGDC_SKIP_CUDA_BUILD")}
    environ.update(env)
    res = _run([python, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", out, src],
               env=environ, timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = sorted(out.glob("sgdc_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], res.stdout + res.stderr


def _site(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    return dest


def _python_json(python, code: str, site: Path, cwd: Path) -> dict:
    """Run code (which prints one JSON object last) under python, with site first on sys.path."""
    env = dict(os.environ, PYTHONPATH=str(site))
    res = _run([python, "-c", code], env=env, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


LOAD_AND_REPORT = """
import json, torch, sgdc_kernels
from sgdc_kernels import _extension
reason = sgdc_kernels.unavailable_reason("cuda")  # the package's report (it loads the library)
import sgdc_kernels._C as ext
fwd, bwd = torch.ops.sgdc.cuda_forward.default, torch.ops.sgdc.cuda_backward.default
x = torch.empty(2, 8, 5, 6, device="meta")
out = fwd(x, torch.empty(2, 18, 5, 6, device="meta"), None, 3, 2, 1, False, True, "")  # the fake kernel
print(json.dumps(dict(
    package=sgdc_kernels.__file__, ext=ext.__file__, torch=torch.__version__, reason=reason,
    forward=str(fwd._schema), backward=str(bwd._schema), build_info=_extension.build_info(),
    cuda_kernel=torch._C._dispatch_has_kernel_for_dispatch_key(fwd.name(), "CUDA"),
    fake_shape=list(out.shape),
)))
"""


def test_built_against_the_other_torch_loads_under_this_one(other_python, tmp_path):
    src = _copy_checkout(tmp_path / "src")
    wheel, log = _build_wheel(other_python, src, tmp_path / "wheel")
    print(f"\nbuilt against torch {OTHER_TORCH}: {wheel.name}")
    assert "-cp310-abi3-" in wheel.name, wheel.name  # one wheel for every CPython from 3.10
    assert "building the extension without CUDA kernels" in log and "CPU-only build" in log, log[-3000:]
    site = _site(wheel, tmp_path / "site")
    seen = _python_json(sys.executable, LOAD_AND_REPORT, site, tmp_path)
    print(f"loaded under torch {torch.__version__}: {json.dumps(seen, indent=2)}")
    assert seen["package"].startswith(str(site)) and seen["ext"].endswith("_C.abi3.so"), seen
    assert seen["forward"] == "sgdc::cuda_forward" + FORWARD_SCHEMA
    assert seen["backward"] == "sgdc::cuda_backward" + BACKWARD_SCHEMA
    assert seen["fake_shape"] == [2, 8, 5, 6] and not seen["cuda_kernel"]
    info = seen["build_info"]
    assert info["torch"] == OTHER_TORCH.split("+")[0] and info["loads into"] == "torch 2.10 and later (stable ABI)"
    assert "CPU-only build" in info["kernels"], info
    # unavailable for want of kernels (and of a GPU here), not for the torch it was built against
    assert (
        "built without CUDA kernels" in seen["reason"] and f"torch {OTHER_TORCH} is a CPU-only build" in seen["reason"]
    ), seen["reason"]
    assert "undefined symbol" not in seen["reason"] and "needs torch" not in seen["reason"]


def _cuda_build(tmp_path: Path) -> Path:
    """A CUDA build of this checkout against the running torch: the installed one in the checkout
    (the editable install's), or a wheel built here."""
    config = ROOT / "sgdc_kernels" / "_build_config.py"
    built = sorted((ROOT / "sgdc_kernels").glob("_C*.so"))
    if built and config.exists() and "KERNELS = True" in config.read_text():
        site = tmp_path / "site"
        shutil.copytree(ROOT / "sgdc_kernels", site / "sgdc_kernels", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "triton_ops", site / "sgdc_kernels" / "triton_ops")
        return site
    if torch.version.cuda is None or not (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc").exists():
        pytest.skip("no CUDA build of this checkout, and no CUDA torch and toolkit to make one")
    env = {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    wheel, _ = _build_wheel(sys.executable, _copy_checkout(tmp_path / "src"), tmp_path / "wheel", **env)
    return _site(wheel, tmp_path / "site")


LOAD_RAW = """
import json, sys, torch, sgdc_kernels
reason = sgdc_kernels.unavailable_reason("cuda")
try:
    torch.ops.load_library(sys.argv[1])  # past the package's check: what the dynamic linker says
    loaded, error = True, None
except OSError as exc:  # torch's message, then the dynamic linker's (its cause)
    loaded, error = False, str(exc) + (f" <- {exc.__cause__}" if exc.__cause__ else "")
print(json.dumps(dict(torch=torch.__version__, reason=reason, loaded=loaded, error=error,
                      schema=str(torch.ops.sgdc.cuda_forward.default._schema) if loaded else None)))
"""


def _dynamic_symbols(lib: Path, *flags: str) -> set[str]:
    res = _run(["nm", "-D", *flags, lib])
    assert res.returncode == 0, res.stderr
    return {line.split()[-1].split("@")[0] for line in res.stdout.splitlines() if line.strip()}


def test_the_cuda_build_of_this_torch_under_the_other_torch(other_python, tmp_path):
    if shutil.which("nm") is None:
        pytest.skip("no nm (binutils) on PATH")
    site = _cuda_build(tmp_path)
    lib = next((site / "sgdc_kernels").glob("_C*.so"))
    res = _run([other_python, "-c", LOAD_RAW, lib], env=dict(os.environ, PYTHONPATH=str(site)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nthe CUDA build against torch {torch.__version__} under torch {seen['torch']}:")
    print(json.dumps(seen, indent=2))
    # the package says why before loading
    assert "holds CUDA kernels" in seen["reason"] and "CPU-only build" in seen["reason"], seen["reason"]
    # the library itself: loads (registering the schemas), or fails only for a CUDA library of torch
    if seen["loaded"]:
        assert seen["schema"] == "sgdc::cuda_forward" + FORWARD_SCHEMA
    else:
        assert "undefined symbol" not in seen["error"], seen["error"]
        assert any(name in seen["error"] for name in CUDA_LIBRARIES), seen["error"]
    # every stable-ABI symbol it uses is exported by the other torch's libtorch_cpu, but for the
    # shim's CUDA part, which a CUDA build of torch has in libtorch_cuda
    other_lib = _run([other_python, "-c", "import torch, os; print(os.path.dirname(torch.__file__))"]).stdout.strip()
    exported = _dynamic_symbols(Path(other_lib) / "lib" / "libtorch_cpu.so", "--defined-only")
    used = {s for s in _dynamic_symbols(lib, "--undefined-only") if s.startswith(("aoti_torch_", "torch_"))}
    elsewhere = sorted(used - exported)
    print(f"stable-ABI symbols used: {len(used)}; not in torch {OTHER_TORCH}'s libtorch_cpu: {elsewhere}")
    assert used and all("cuda" in s for s in elsewhere), elsewhere
