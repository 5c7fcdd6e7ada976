"""CMakeLists.txt builds the csrc/ sources into libsgdc_ops.so, which registers the operators, on
the LibTorch stable ABI like the Python extension (no C++ symbol of c10, ATen or torch).

Runs where cmake, ninja and nvcc are found (CI has them); the GPU tests of the operators are in
test_cuda.py.
"""

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc")


@pytest.mark.skipif(
    shutil.which("cmake") is None
    or shutil.which("ninja") is None
    or not os.path.exists(NVCC)
    or torch.version.cuda is None,
    reason="needs cmake, ninja, nvcc and a CUDA build of torch",
)
def test_cmake_builds_a_library_that_registers_the_operators(tmp_path):
    args = [
        "cmake", "-S", ROOT, "-B", str(tmp_path), "-G", "Ninja",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DCMAKE_CUDA_COMPILER={NVCC}",
        f"-DTORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '9.0')}",
    ]  # fmt: skip
    # A toolkit without NVRTC (torch's CMake config asks for it): use the one pip installed with torch.
    if not glob.glob(os.path.join(CUDA_HOME, "lib64", "libnvrtc.so*")):
        site = os.path.dirname(os.path.dirname(torch.__file__))
        found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so.*")))
        if found:
            args.append(f"-DCUDA_nvrtc_LIBRARY={found[0]}")
    subprocess.run(args, check=True, capture_output=True, text=True)
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    lib = tmp_path / "libsgdc_ops.so"
    assert lib.exists()
    code = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "print(torch.ops.sgdc.cuda_forward.default._schema)\n"
        "print(torch.ops.sgdc.cuda_backward.default._schema)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(lib)], check=True, capture_output=True, text=True).stdout
    assert "sgdc::cuda_forward(Tensor x, Tensor weights, Tensor? gate" in out
    assert "sgdc::cuda_backward(Tensor grad_out" in out
    if shutil.which("nm"):
        nm = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], check=True, capture_output=True, text=True)
        symbols = [line.split()[-1] for line in nm.stdout.splitlines() if line.strip()]
        unstable = [s for s in symbols if s.startswith(("_ZN3c10", "_ZNK3c10", "_ZN2at", "_ZNK2at", "_ZN5torch"))]
        assert not unstable, unstable
