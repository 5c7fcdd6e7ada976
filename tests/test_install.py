"""Which installed copy of the package runs, and what it says when its compiled parts are elsewhere or were
built against another torch."""

import importlib.machinery
import os
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch

import sgdc_kernels
from sgdc_kernels import BackendUnavailableError, _extension, _install, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SO = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]


def _fake_checkout(tmp_path, with_extension: bool) -> str:
    """A repository layout: <tmp>/repo/{setup.py, csrc/, triton_ops/__init__.py, sgdc_kernels/}."""
    repo = tmp_path / "repo"
    (repo / "csrc").mkdir(parents=True)
    (repo / "triton_ops").mkdir()
    (repo / "triton_ops" / "__init__.py").write_text("")
    (repo / "setup.py").write_text("")
    (repo / "sgdc_kernels").mkdir()
    if with_extension:
        (repo / "sgdc_kernels" / SO).write_text("")
    return str(repo / "sgdc_kernels")


def _fake_install(tmp_path, with_extension: bool = True) -> str:
    site = tmp_path / "site-packages" / "sgdc_kernels"
    site.mkdir(parents=True)
    if with_extension:
        (site / SO).write_text("")
    return str(site)


def test_a_checkout_without_the_extension_names_the_installed_copy_and_the_fixes(tmp_path, monkeypatch):
    here = _fake_checkout(tmp_path, with_extension=False)
    installed = _fake_install(tmp_path)
    monkeypatch.setattr(_install, "PACKAGE_DIR", here)
    monkeypatch.setattr(_install, "installed_copy", lambda: installed)
    note = _install.shadowed_install_note()
    assert here in note and installed in note
    assert "Run from another directory" in note and "pip install -e ." in note
    assert _install.describe() == f"{here} (source checkout, imported instead of the installed copy {installed})"
    # the cuda backend gives the same reason, whatever the machine has
    monkeypatch.setattr(_extension, "_find_extension", lambda: None)
    with pytest.raises(BackendUnavailableError) as exc:
        _extension.load_cuda_backend()
    assert note in str(exc.value)


@pytest.mark.parametrize("checkout_has_it,installed_has_it", [(True, True), (False, False)])
def test_no_note_when_nothing_is_shadowed(tmp_path, monkeypatch, checkout_has_it, installed_has_it):
    here = _fake_checkout(tmp_path, with_extension=checkout_has_it)
    installed = _fake_install(tmp_path, with_extension=installed_has_it)
    monkeypatch.setattr(_install, "PACKAGE_DIR", here)
    monkeypatch.setattr(_install, "installed_copy", lambda: installed)
    assert _install.shadowed_install_note() is None


def test_describe_an_editable_and_a_regular_install(tmp_path, monkeypatch):
    here = _fake_checkout(tmp_path, with_extension=True)
    monkeypatch.setattr(_install, "PACKAGE_DIR", here)
    monkeypatch.setattr(_install, "installed_copy", lambda: here)
    assert _install.describe() == f"{here} (source checkout, editable install)"
    site = _fake_install(tmp_path)
    monkeypatch.setattr(_install, "PACKAGE_DIR", site)
    monkeypatch.setattr(_install, "installed_copy", lambda: site)
    assert _install.describe() == f"{site} (installed, not editable)"


def test_auto_warns_once_when_it_skips_a_shadowed_extension(monkeypatch):
    note = "the source tree is imported instead of the installed copy"
    monkeypatch.setattr(_install, "shadowed_install_note", lambda: note)
    monkeypatch.setitem(registry._LOADED, "cuda", BackendUnavailableError("no"))
    monkeypatch.setattr(registry, "_WARNED_SHADOWED", [])
    with pytest.warns(UserWarning, match="backend 'auto' skips 'cuda': " + note):
        registry.resolve_backend("auto", "cuda", torch.float32)


def test_info_says_which_copy_is_loaded():
    out = subprocess.run([sys.executable, "-m", "sgdc_kernels.info"], capture_output=True, text=True, check=True).stdout
    assert f"loaded from {_install.describe()}" in out
    assert os.path.realpath(os.path.dirname(sgdc_kernels.__file__)) in out


def test_the_source_tree_finds_its_triton_kernels_without_an_install():
    # -S: no site-packages .pth files, so no editable-install finder; the source tree comes first
    # and must map triton_ops/ itself (TRITON_INTERPRET=1 lets the backend load on a CPU).
    paths = [ROOT] + [p for p in sys.path if p and os.path.isdir(p)]
    code = (
        "import sys, sgdc_kernels\n"
        "assert sgdc_kernels.__file__.startswith(sys.argv[1]), sgdc_kernels.__file__\n"
        "assert sgdc_kernels.unavailable_reason('triton') is None, sgdc_kernels.unavailable_reason('triton')\n"
        "print(sys.modules['sgdc_kernels.triton_ops'].__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-S", "-c", code, ROOT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == os.path.join(ROOT, "triton_ops", "__init__.py")


# ------------------------------------------------------------------------------------------------
# An extension built against another torch: on the stable ABI it loads into its target and later
# ------------------------------------------------------------------------------------------------


def _build_config(monkeypatch, **values):
    config = types.ModuleType("sgdc_kernels._build_config")
    for name, value in values.items():
        setattr(config, name, value)
    monkeypatch.setitem(sys.modules, "sgdc_kernels._build_config", config)


@pytest.fixture
def running_torch_older_than_the_target(monkeypatch):
    """An extension built against torch 2.14.1 for the stable ABI of 2.10, under a running torch
    2.9.1 (the version string is what the loader reads)."""
    _build_config(monkeypatch, TORCH_VERSION="2.14.1+cu130", TORCH_TARGET="2.10", CUDA_VERSION="13.0", KERNELS=True)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    real = _extension._find_extension()
    # where the extension is built (CI), the real one, which must then stay unloaded
    monkeypatch.setattr(_extension, "_find_extension", lambda: real or object())
    return real is not None


def test_a_torch_older_than_the_target_is_reported_before_loading(running_torch_older_than_the_target):
    already_loaded = "sgdc_kernels._C" in sys.modules
    with pytest.raises(BackendUnavailableError) as exc:
        _extension.load_cuda_backend()
    msg = str(exc.value)
    assert "needs torch 2.10 or newer" in msg and "against torch 2.14.1+cu130" in msg, msg
    assert "torch 2.9.1+cu128 is running" in msg, msg
    assert "pip install 'torch>=2.10'" in msg, msg
    if running_torch_older_than_the_target and not already_loaded:
        assert "sgdc_kernels._C" not in sys.modules
    assert _extension.build_info() is None


@pytest.mark.parametrize("running", ["2.10.0+cu128", "2.13.0+cpu", "2.14.1", "3.0.0"])
def test_a_build_for_the_stable_abi_passes_the_check_under_its_target_and_later(monkeypatch, running):
    _build_config(monkeypatch, TORCH_VERSION="2.14.1+cu130", TORCH_TARGET="2.10", KERNELS=False)
    monkeypatch.setattr(torch, "__version__", running)
    assert _extension.torch_mismatch() is None


def test_cuda_kernels_under_a_cpu_only_torch_are_reported_before_loading(monkeypatch):
    _build_config(monkeypatch, TORCH_VERSION="2.14.1+cu130", TORCH_TARGET="2.10", CUDA_VERSION="13.0", KERNELS=True)
    monkeypatch.setattr(torch.version, "cuda", None)
    msg = _extension.torch_mismatch()
    assert msg is not None and "holds CUDA kernels (CUDA 13.0)" in msg and "CPU-only build" in msg, msg
    assert "install a CUDA build of torch" in msg


def test_a_build_from_before_the_stable_abi_needs_its_own_torch(monkeypatch):
    """A build that recorded no target (this package before the stable ABI) loads only into the
    torch it was built against."""
    _build_config(monkeypatch, TORCH_VERSION="1.13.0+cu117")
    msg = _extension.torch_mismatch()
    assert msg is not None and "built against torch 1.13.0+cu117" in msg and f"torch {torch.__version__}" in msg
    assert "pip install -e ." in msg
    _build_config(monkeypatch, TORCH_VERSION=torch.__version__)
    assert _extension.torch_mismatch() is None


def _copy_tracked(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout: cannot copy the tracked files")
    for rel in files.stdout.split():
        if os.path.isfile(os.path.join(ROOT, rel)):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), dest / rel)
    return dest


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch at build time")
def test_a_toolkit_of_another_cuda_major_builds_the_schemas_only_and_says_why(tmp_path):
    """What pip's isolated build does where its torch is built for another CUDA major than the
    local toolkit: one line saying so, the schemas only, and a loud failure with FORCE_CUDA=1.
    setup.py decides when it is loaded, so `setup.py --version` shows it."""
    checkout = _copy_tracked(tmp_path / "checkout")
    other = 12 if int(torch.version.cuda.split(".")[0]) != 12 else 13
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other}.0, V{other}.0.1'\n")
    nvcc.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "SGDC_SKIP_CUDA_BUILD")}
    env["CUDA_HOME"] = str(tmp_path / "cuda")
    setup = [sys.executable, "setup.py", "--version"]
    res = subprocess.run(setup, cwd=checkout, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    said = [line for line in res.stderr.splitlines() if line.startswith("sgdc-kernels:")]
    assert len(said) == 1, said
    assert "without CUDA kernels" in said[0] and f"is CUDA {other}.0, another major version" in said[0], said
    assert f"built for CUDA {torch.version.cuda}" in said[0] and "pip install --no-build-isolation ." in said[0]
    res = subprocess.run(setup, cwd=checkout, env={**env, "FORCE_CUDA": "1"}, capture_output=True, text=True)
    assert res.returncode != 0 and "FORCE_CUDA=1 but the CUDA kernels cannot be built" in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_an_in_place_build_removes_an_older_build_of_the_extension(tmp_path):
    """A _C.cpython-3xx-*.so left by a build from before the stable ABI would be imported instead of
    the new _C.abi3.so (Python prefers the more specific suffix): an in-place build removes it.
    Built without a CUDA toolkit (the CPU kernels and the schemas, about a minute)."""
    checkout = _copy_tracked(tmp_path / "checkout")
    old = checkout / "sgdc_kernels" / SO
    old.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "SGDC_SKIP_CUDA_BUILD")}
    env.update(CUDA_HOME=str(tmp_path / "no-toolkit"), MAX_JOBS=env.get("MAX_JOBS", "2"))
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=checkout, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert not old.exists() and (checkout / "sgdc_kernels" / "_C.abi3.so").exists()
    assert f"removing {os.path.join('sgdc_kernels', SO)}, an older build of the extension" in res.stderr


# ------------------------------------------------------------------------------------------------
# A quiet install
# ------------------------------------------------------------------------------------------------


def test_numpy_is_a_dependency_because_torch_warns_without_it():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "numpy" for d in deps)
    # without it, torch's custom-operator machinery (which every backend uses) prints "Failed to
    # initialize NumPy" on first use: `sys.modules['numpy'] = None` before `import torch` shows it


def test_using_the_package_prints_nothing_to_stderr():
    code = (
        "import torch, sgdc_kernels\n"
        "x = torch.randn(1, 4, 5, 5)\n"
        "sgdc_kernels.sgdc_conv(x, torch.randn(1, 18, 5, 5), kernel_size=3, num_heads=2, backend='torch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr == ""


def test_a_regular_install_then_a_run_from_the_checkout_says_the_source_tree_shadows_it(tmp_path):
    """The README's regular install, as a user runs it: `pip install .` in a checkout (which leaves
    sgdc_kernels.egg-info there; here without build isolation and without the extension, which
    installs the same files offline), then `python -m sgdc_kernels.info` from the repository root.
    The build metadata in the checkout is not an install: info names the installed copy and, where
    that copy has the extension and the checkout does not, the note."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout: cannot copy the tracked files")
    checkout = tmp_path / "checkout"
    for rel in files.stdout.split():
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), checkout / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # the new environment sees this one's packages (torch, pip, setuptools) through a .pth file
    outer = [p for p in sys.path if p.endswith("site-packages") and p != purelib] or [sysconfig.get_paths()["purelib"]]
    Path(purelib, "_outer.pth").write_text("\n".join(outer) + "\n")
    env = {**os.environ, "SGDC_SKIP_CUDA_BUILD": "1", "PIP_NO_INDEX": "1"}
    res = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "."],
                         cwd=checkout, env=env, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (checkout / "sgdc_kernels.egg-info").is_dir(), "the build no longer leaves its metadata in the checkout"
    installed = Path(purelib, "sgdc_kernels")
    (installed / SO).write_text("")  # the installed copy has the extension (found, never loaded here)
    out = subprocess.run([python, "-m", "sgdc_kernels.info"], cwd=checkout, capture_output=True, text=True).stdout
    source = os.path.realpath(checkout / "sgdc_kernels")
    assert f"loaded from {source} (source checkout, imported instead of the installed copy " in out, out
    assert "which has no compiled extension, instead of the installed copy" in out, out
    assert "Run from another directory" in out, out
