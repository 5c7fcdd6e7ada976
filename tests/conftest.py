"""Test configuration.

On a machine without an NVIDIA GPU, the Triton kernels are tested through Triton's interpreter,
which must be switched on before triton is first imported: this file is loaded before any test
module, so it sets TRITON_INTERPRET=1 here, without importing torch (which would be too late).
Set SGDC_NO_TRITON_INTERPRET=1 to opt out.
"""

import os
import shutil
import types


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


if not _has_nvidia_gpu() and os.environ.get("SGDC_NO_TRITON_INTERPRET") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _run_outside_the_checkout(tmp_path_factory):
    """Tests start from an empty folder, so that `python -m sgdc_kernels...` and `python -c` in a
    subprocess import the package as a program elsewhere does (the working directory comes first
    on sys.path); tests/test_readme.py runs the README's commands from the repository root."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)


@pytest.fixture
def fake_variants(monkeypatch):
    """Backend 'torch' replaced, for one test, by one with kernel variants v1 (the default), v2 and
    v3, of which v3 runs sgdc_conv's configuration only, and what "auto" picks on a CPU;
    ``fake_variants.seen`` records the ``variant`` argument of each call."""
    from sgdc_kernels import registry
    from sgdc_kernels.custom_ops import FLOATING_ALL, Backend
    from sgdc_kernels.reference import unfold_forward

    seen = []

    def forward(x, weights, gate, *config):
        *config, variant = config
        seen.append(variant)
        return unfold_forward(x, weights, gate, *config)

    fake = Backend(
        "torch", forward, None, frozenset({"cpu"}), FLOATING_ALL, "fake", ("v1", "v2", "v3"), frozenset({"v3"})
    )
    monkeypatch.setitem(registry._LOADED, "torch", fake)
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", ("torch",))
    return types.SimpleNamespace(backend=fake, seen=seen)
