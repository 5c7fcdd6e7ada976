"""Build script: the pure-Python package, plus the CUDA extension sgdc_kernels._C when it can be built.

Environment variables:
  SGDC_SKIP_CUDA_BUILD=1  never build the extension (pure-Python install)
  FORCE_CUDA=1            build it even when no GPU is visible (needs a CUDA toolkit and CUDA torch)
  TORCH_CUDA_ARCH_LIST    architectures, e.g. "8.0;9.0" (default without a visible GPU: 8.0;9.0)
  MAX_JOBS                parallel compile jobs for ninja
  CUDA_HOME               the CUDA toolkit (e.g. /usr/local/cuda)
"""

import os
import sys

from setuptools import setup

PACKAGES = ["sgdc_kernels", "sgdc_kernels.segmentation", "sgdc_kernels.triton_ops"]
PACKAGE_DIR = {"sgdc_kernels": "sgdc_kernels", "sgdc_kernels.triton_ops": "triton_ops"}


def _say(msg: str) -> None:
    print(f"sgdc-kernels: {msg}", file=sys.stderr, flush=True)


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with one line saying why not."""
    if os.environ.get("SGDC_SKIP_CUDA_BUILD", "0") == "1":
        _say("SGDC_SKIP_CUDA_BUILD=1: installing without the CUDA extension (backend 'cuda' unavailable)")
        return [], {}
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch would otherwise guess from PATH, and a wrong guess fails only at link time
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time: installing without the CUDA extension")
        return [], {}
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        if force:
            raise RuntimeError(f"FORCE_CUDA=1 but {why}")
        _say(f"{why}: installing without the CUDA extension (backend 'cuda' unavailable)")
        return [], {}
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    # The one list of sources: every .cpp and .cu under csrc/ (CMakeLists.txt globs the same).
    sources = sorted(
        os.path.relpath(os.path.join(root, f))
        for root, _, files in os.walk("csrc")
        for f in files
        if f.endswith((".cpp", ".cu"))
    )
    if not sources:
        _say("no sources in csrc/: installing without the CUDA extension")
        return [], {}
    _say(
        f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r} "
        f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')})"
    )
    torch_version = torch.__version__.split("+")[0]
    ext = cpp_extension.CUDAExtension(
        "sgdc_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        define_macros=[("SGDC_PYTHON_MODULE", None)],
        extra_compile_args={
            "cxx": ["-O3", f"-DSGDC_TORCH_VERSION={torch_version}"],
            "nvcc": ["-O3", "-lineinfo"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
