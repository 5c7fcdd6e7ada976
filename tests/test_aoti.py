"""AOTInductor: ``torch.export`` and ``torch._inductor.aoti_compile_and_package`` of a model that
calls the package's operators keeps the compiled CPU kernels (``sgdc::cpu_forward`` calls in the
package), and the package runs with dynamic batch and image sizes: from Python with
``aoti_load_package`` after ``import sgdc_kernels``, and from C++ without Python through
examples/aoti_cpp (built here with CMake where cmake, ninja and a compiler are found). One package
holds every configuration of window_conv, na2d_av and an SGDC block, checked against PyTorch at two
sizes."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdc_kernels import SGDC, available_backends, window_conv
from sgdc_kernels.compat import na2d_av
from sgdc_kernels.testing import EXPORT_CONFIGS

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends("cpu"), reason="needs the compiled CPU operators (backend 'cpu')"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 16
SIZES = ((2, 12, 14), (3, 18, 10))  # (batch, H, W): the example's, and another


class Everything(nn.Module):
    """Every configuration of window_conv (weights and gate from 1x1 convolutions of the input),
    na2d_av (K=5, dilation 2) and an SGDC block guided by a pooled projection, on backend 'cpu';
    one input, (B, 16, H, W) with H and W even and at least 10."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weights = nn.ModuleList(
            nn.Conv2d(C, c["num_heads"] * c["kernel_size"] ** 2, 1) for c in EXPORT_CONFIGS
        )  # fmt: skip
        self.gate = nn.Conv2d(C, C, 1)
        self.attn, self.value = nn.Conv2d(C, 2 * 25, 1), nn.Conv2d(C, 2 * 8, 1)
        self.guide = nn.Conv2d(C, 4, 1)
        self.block = SGDC(dim=C, guide_ch=4, num_heads=2, kernel_size=5, ls_init=1.0, backend="cpu")

    def forward(self, x):
        gate = self.gate(x)
        outs = [window_conv(x, w(x), gate, backend="cpu", **c) for w, c in zip(self.weights, EXPORT_CONFIGS)]
        B, _, H, W = x.shape
        attn = self.attn(x).view(B, 2, 25, H, W).permute(0, 1, 3, 4, 2).softmax(-1)
        value = self.value(x).view(B, 2, 8, H, W).permute(0, 1, 3, 4, 2)
        outs.append(na2d_av(attn, value, kernel_size=5, dilation=2, backend="cpu"))
        outs.append(self.block(x, F.avg_pool2d(self.guide(x), 2)))
        return tuple(outs)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(the model, the path of its AOTInductor package, the exported program)."""
    model = Everything().eval()
    batch, h, w = (
        torch.export.Dim("batch"),
        torch.export.Dim("h", min=5, max=512),
        torch.export.Dim("w", min=5, max=512),
    )
    b, H, W = SIZES[0]
    program = torch.export.export(model, (torch.randn(b, C, H, W),), dynamic_shapes=({0: batch, 2: 2 * h, 3: 2 * w},))
    path = tmp_path_factory.mktemp("aoti") / "everything.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return model, path, program


def _inputs(b, h, w):
    return torch.randn(b, C, h, w, generator=torch.Generator().manual_seed(b * 1000 + h))


def test_the_package_keeps_the_compiled_operators(package):
    _, _, program = package
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "sgdc.cpu_forward.default" in targets, sorted(targets)
    assert not {t for t in targets if t.startswith("sgdc.") and t != "sgdc.cpu_forward.default"}, sorted(targets)


def test_the_package_runs_from_python_at_two_sizes(package):
    model, path, _ = package
    compiled = torch._inductor.aoti_load_package(str(path))
    for size in SIZES:
        x = _inputs(*size)
        with torch.no_grad():
            want = model(x)
        got = compiled(x)
        assert len(got) == len(want)
        for k, (g, r) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m, k=k, s=size: f"output {k} at {s}: {m}")


def _cmake_tools() -> str | None:
    """Why the C++ example cannot be built here, or None."""
    missing = [tool for tool in ("cmake", "ninja", os.environ.get("CXX", "c++")) if shutil.which(tool) is None]
    return f"needs {', '.join(missing)} on PATH" if missing else None


@pytest.mark.skipif(_cmake_tools() is not None, reason=str(_cmake_tools()))
def test_the_package_runs_from_cpp_without_python(package, tmp_path):
    model, path, _ = package
    build = tmp_path / "build"
    torch_root = os.path.dirname(torch.__file__)
    configure = ["cmake", "-S", os.path.join(ROOT, "examples", "aoti_cpp"), "-B", str(build), "-G", "Ninja",
                 f"-DTORCH_ROOT={torch_root}"]  # fmt: skip
    for argv in (configure, ["cmake", "--build", str(build)]):
        run = subprocess.run(argv, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    import sgdc_kernels._C as ext  # the operator library: the package's own extension module

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for size in SIZES:
        x = _inputs(*size)
        x.numpy().tofile(tmp_path / "input.bin")
        argv = [str(build / "sgdc_aoti_run"), str(path), ext.__file__, str(tmp_path / "input.bin"),
                *map(str, x.shape), str(tmp_path / "out_")]  # fmt: skip
        run = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        with torch.no_grad():
            want = model(x)
        assert run.stdout.count("output ") == len(want), run.stdout
        for k, r in enumerate(want):
            got = torch.from_numpy(np.fromfile(tmp_path / f"out_{k}.bin", dtype=np.float32)).view(r.shape)
            torch.testing.assert_close(
                got, r, atol=1e-5, rtol=1e-5, msg=lambda m, k=k, s=size: f"output {k} at {s}: {m}"
            )
