"""Build script: the pure-Python package, plus the compiled extension sgdc_kernels._C when it can be built.

The extension is written on the LibTorch stable ABI and compiled for the stable ABI of torch 2.10
(TORCH_TARGET_VERSION) and Python's limited API (3.10, an abi3 wheel): one build loads into every
torch from 2.10 on and every CPython from 3.10 on. So it is built against whatever torch the build
sees: in pip's isolated build, the torch of ``[build-system] requires`` (pyproject.toml); with
``--no-build-isolation``, the environment's.

What is built:
  - the CPU kernels (csrc/cpu/, backend 'cpu'), whenever the extension is built: they need only a
    C++ compiler; GCC on x86-64 compiles them for AVX-512, AVX2 and the baseline (each
    instruction set's file selects its target itself), other compilers and architectures for the
    baseline only, and the extension picks the best one the CPU runs when it loads;
  - the CUDA kernels and the CUDA operators' schemas, where torch is a CUDA build and a CUDA
    toolkit of the same major version as that torch is found;
  - without CUDA kernels (the CUDA operators exist, with fake kernels and autograd, but have no
    CUDA kernel), where torch is CPU-only, no toolkit is found or the toolkit's CUDA major differs
    from torch's; the build says why in one line, and so does ``python -m sgdc_kernels.info``;
  - nothing (the pure-Python package), where torch is not importable or is older than 2.10, where
    there is no C++ compiler, or with SGDC_SKIP_CUDA_BUILD=1.

Environment variables:
  SGDC_SKIP_CUDA_BUILD=1  never build the extension, CPU kernels included (pure-Python install)
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible, and fail loudly when they
                          cannot be built (no toolkit, CPU-only torch, another CUDA major)
  TORCH_CUDA_ARCH_LIST    architectures, e.g. "8.0;9.0" (default without a visible GPU: 8.0;9.0)
  MAX_JOBS                parallel compile jobs for ninja
  CUDA_HOME               the CUDA toolkit (e.g. /usr/local/cuda)

Building the extension also writes sgdc_kernels/_build_config.py (not in git) beside it (in the
build tree; in the source tree too for an in-place or editable build), which records the torch it
is compiled against, the torch version it targets, that it holds the CPU kernels and whether it
holds CUDA kernels (and why not): the package reads it before loading the extension.
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

PACKAGES = ["sgdc_kernels", "sgdc_kernels.segmentation", "sgdc_kernels.triton_ops"]
PACKAGE_DIR = {"sgdc_kernels": "sgdc_kernels", "sgdc_kernels.triton_ops": "triton_ops"}
BUILD_CONFIG = "_build_config.py"  # written beside the built extension, in package sgdc_kernels
# The stable ABI the extension is written for: torch 2.10, the first release whose stable ABI passes
# a `str` argument (the operators' `variant`) and has the allocation ops, device guard and stream
# the operators use. TORCH_TARGET_VERSION is (major << 56) | (minor << 48).
TORCH_TARGET = (2, 10)
TORCH_TARGET_FLAG = f"-DTORCH_TARGET_VERSION=0x{(TORCH_TARGET[0] << 56) | (TORCH_TARGET[1] << 48):016x}"
# Python's limited API: the module stub works on every CPython from 3.10 (an abi3 wheel, cp310).
PY_LIMITED_API = "0x030A0000"  # as torch.utils.cpp_extension spells it
PY_LIMITED_TAG = "cp310"


def _say(msg: str) -> None:
    print(f"sgdc-kernels: {msg}", file=sys.stderr, flush=True)


def _version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def _nvcc_version(cuda_home: str) -> str | None:
    """The toolkit's CUDA version, e.g. "13.0", from `nvcc --version`; None if nvcc does not run."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _isolated(torch) -> bool:
    """Whether this torch is the one pip installed into an isolated build environment."""
    return "pip-build-env" in torch.__file__


def _without_kernels(torch, cpp_extension) -> str | None:
    """Why the CUDA kernels cannot be compiled against this torch here, or None when they can."""
    which = f"torch {torch.__version__}" + (" (the isolated build's torch, from [build-system] requires)"
                                             if _isolated(torch) else "")  # fmt: skip
    if torch.version.cuda is None:
        return f"{which} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    nvcc = _nvcc_version(cpp_extension.CUDA_HOME)
    if nvcc is None:
        return f"nvcc in {cpp_extension.CUDA_HOME} does not run"
    if _version(nvcc)[0] != _version(torch.version.cuda)[0]:
        return (
            f"{which} is built for CUDA {torch.version.cuda}, but the toolkit in {cpp_extension.CUDA_HOME} "
            f"is CUDA {nvcc}, another major version; to build the kernels, install a torch built for CUDA "
            f"{_version(nvcc)[0]} and build against it: pip install --no-build-isolation ."
        )
    return None


def _build_config(torch, cuda: str | None, why_not: str | None) -> str:
    """The text of sgdc_kernels/_build_config.py; cuda: the toolkit's CUDA version that compiled the
    kernels, None without kernels."""
    return (
        '"""Generated by setup.py when it builds sgdc_kernels._C: the torch it is compiled against, the\n'
        "torch whose stable ABI it targets (it loads into that torch and every later one), and whether it\n"
        'holds the CPU kernels (always) and the CUDA kernels."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_TARGET = {'.'.join(map(str, TORCH_TARGET))!r}\n"
        f"CUDA_VERSION = {cuda!r}\n"
        "CPU_KERNELS = True\n"
        f"KERNELS = {cuda is not None!r}\n"
        f"NO_KERNELS_REASON = {why_not!r}\n"
    )


def _build_ext(cpp_extension, config: str):
    """torch's BuildExtension (with ninja), which also writes sgdc_kernels/_build_config.py beside the
    extension it built: in the build tree (what a wheel or a regular install packages) and, for an
    in-place or editable build, in the source tree, and nowhere else (a regular install from a
    checkout leaves the checkout's own build alone). An in-place build also removes the source
    tree's other builds of the extension (e.g. a _C.cpython-311-*.so from before the stable-ABI
    build, whose more specific suffix Python would load instead of the new _C.abi3.so)."""

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            super().run()
            dirs = [os.path.join(self.build_lib, "sgdc_kernels")]
            if self.inplace:
                source = self.get_finalized_command("build_py").get_package_dir("sgdc_kernels")
                dirs.append(source)
                built = os.path.basename(self.get_ext_fullpath("sgdc_kernels._C"))
                for name in os.listdir(source or "."):
                    if name.startswith("_C.") and name.endswith(".so") and name != built:
                        _say(f"removing {os.path.join(source, name)}, an older build of the extension")
                        os.remove(os.path.join(source, name))
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, BUILD_CONFIG), "w") as f:
                    f.write(config)

    return BuildExt.with_options(use_ninja=True)


def extension():
    """(ext_modules, cmdclass) for the extension, or ([], {}) with one line saying why not."""
    if os.environ.get("SGDC_SKIP_CUDA_BUILD", "0") == "1":
        _say(
            "SGDC_SKIP_CUDA_BUILD=1: installing without the compiled extension (backends 'cpu' and 'cuda' unavailable)"
        )
        return [], {}
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch would otherwise guess from PATH, and a wrong guess fails only at link time
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if force:
            raise RuntimeError("FORCE_CUDA=1 but torch is not importable at build time") from None
        _say(
            "torch is not importable at build time: installing without the compiled extension; pip's "
            "isolated build installs the torch of [build-system] requires, and a build without isolation "
            "(pip install --no-build-isolation .) needs torch in the environment"
        )
        return [], {}
    if _version(torch.__version__) < TORCH_TARGET:
        why = (
            f"torch {torch.__version__} is older than {'.'.join(map(str, TORCH_TARGET))}, whose stable ABI "
            "the extension is written for"
        )
        if force:
            raise RuntimeError(f"FORCE_CUDA=1 but {why}")
        _say(f"{why}: installing without the compiled extension")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        if force:
            raise RuntimeError(f"FORCE_CUDA=1 but there is no C++ compiler ({cxx!r} is not on PATH)")
        _say(f"no C++ compiler ({cxx!r} is not on PATH): installing without the compiled extension")
        return [], {}
    why_not = _without_kernels(torch, cpp_extension)
    if why_not and force:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    # The one list of sources: every .cpp and .cu under csrc/ (CMakeLists.txt globs the same).
    sources = sorted(
        os.path.relpath(os.path.join(root, f))
        for root, _, files in os.walk("csrc")
        for f in files
        if f.endswith((".cpp", ".cu"))
    )
    if why_not:
        sources = [s for s in sources if s.endswith(".cpp")]
    if not sources:
        _say("no sources in csrc/: installing without the compiled extension")
        return [], {}
    torch_version = torch.__version__.split("+")[0]
    cxx_flags = ["-O3", TORCH_TARGET_FLAG, f"-DPy_LIMITED_API={PY_LIMITED_API}"]
    cxx_flags.append(f"-DSGDC_TORCH_VERSION={torch_version}")
    macros = [("SGDC_PYTHON_MODULE", None)]
    if why_not:
        _say(f"building the extension without CUDA kernels (CPU kernels, CUDA operators' schemas): {why_not}")
        ext = cpp_extension.CppExtension(
            "sgdc_kernels._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            py_limited_api=True,
        )
    else:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        _say(
            f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r} "
            f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}) against torch {torch.__version__}, "
            f"for the stable ABI of torch {'.'.join(map(str, TORCH_TARGET))} and later"
        )
        ext = cpp_extension.CUDAExtension(
            "sgdc_kernels._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            # USE_CUDA: the CUDA part of the C shim (the current stream)
            define_macros=macros + [("SGDC_CUDA_KERNELS", None), ("USE_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", TORCH_TARGET_FLAG]},
            py_limited_api=True,
        )
    # The stable ABI lives in libtorch_cpu (and, for the current CUDA stream, libtorch_cuda); c10,
    # c10_cuda and the libtorch wrapper are left out so that any use of an unstable symbol fails
    # to load instead of tying the build to one torch.
    ext.libraries = [lib for lib in ext.libraries if lib not in ("c10", "c10_cuda", "torch")]
    config = _build_config(torch, None if why_not else _nvcc_version(cpp_extension.CUDA_HOME), why_not)
    return [ext], {"build_ext": _build_ext(cpp_extension, config)}


ext_modules, cmdclass = extension()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"sgdc_kernels": ["py.typed"]},  # the public API is typed (PEP 561)
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # one wheel for every CPython from 3.10 (the limited API), tagged so
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_TAG}} if ext_modules else {},
)
