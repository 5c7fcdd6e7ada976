"""Builds csrc/cpu/ with tests/cpu_kernels/capi.cpp into a shared library and calls it through
ctypes on torch tensors: the CPU kernels before the extension calls them (tests/test_cpu_kernels.py,
bench/cpu_kernels.py).

Each instruction-set translation unit is compiled with its own flags (ISA_FLAGS), the rest with
none; the library and its objects are cached by a hash of the sources, the flags and the compiler's version, in
$SGDC_CPU_KERNELS_CACHE or ~/.cache/sgdc_kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from sgdc_kernels.custom_ops import memory_format_of

ROOT = Path(__file__).resolve().parents[2]
CPU = ROOT / "csrc" / "cpu"
CAPI = Path(__file__).resolve().parent / "capi.cpp"

# Isa codes of csrc/cpu/window_conv_cpu.h, and the flags of each instruction set's translation unit.
ISAS = {"baseline": 1, "avx2": 2, "avx512": 3}
ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c", "-mprefer-vector-width=512"],
}
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-Wall", "-Wextra", f"-I{ROOT / 'csrc'}"]
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def objects(cxx: str, out_dir: Path) -> dict[str, Path]:
    """Compiles every source (in parallel) into out_dir; {name: object}. Raises RuntimeError with
    the compiler's message on failure."""
    jobs = {}
    units = {f"window_conv_cpu_{isa}": (CPU / f"window_conv_cpu_{isa}.cpp", flags) for isa, flags in ISA_FLAGS.items()}
    units["window_conv_cpu"] = (CPU / "window_conv_cpu.cpp", [])
    units["capi"] = (CAPI, [])
    for name, (src, flags) in units.items():
        obj = out_dir / f"{name}.o"
        cmd = [cxx, *COMMON_FLAGS, *flags, "-c", str(src), "-o", str(obj)]
        jobs[name] = (obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    errors = []
    for name, (_, proc) in jobs.items():
        out = proc.communicate()[0]
        if proc.returncode != 0:
            errors.append(f"{name}:\n{out[-4000:]}")
    if errors:
        raise RuntimeError("the CPU kernels do not compile:\n" + "\n".join(errors))
    return {name: obj for name, (obj, _) in jobs.items()}


def build(cache: Path | None = None) -> Path:
    """The folder of the built library (lib.so) and its objects (<unit>.o), built once per state of
    the sources, flags and compiler."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++) on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for p in sorted(CPU.glob("*")) + [CAPI]:
        digest.update(p.name.encode() + p.read_bytes())
    digest.update(repr((cxx, version, COMMON_FLAGS[:-1], ISA_FLAGS)).encode())
    cache = cache or Path(os.environ.get("SGDC_CPU_KERNELS_CACHE", Path.home() / ".cache" / "sgdc_kernels"))
    folder = cache / f"cpu_kernels_{digest.hexdigest()[:16]}"
    if not (folder / "lib.so").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f"{folder.name}.tmp"))
        try:
            objs = objects(cxx, tmp)
            link = [cxx, "-shared", "-o", str(tmp / "lib.so"), *map(str, objs.values()), "-lpthread"]
            res = subprocess.run(link, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError("the CPU kernels do not link:\n" + res.stderr[-4000:])
            try:
                tmp.rename(folder)  # atomic: another process may have built the same folder meanwhile
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


class CpuKernels:
    """The C ABI of capi.cpp on torch tensors. `isa`: a name of ISAS, or None for the best."""

    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        i64, c_int, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.sgdc_cpu_forward.argtypes = [i64] * 7 + [c_int] * 6 + [ptr] * 4
        lib.sgdc_cpu_backward.argtypes = [i64] * 7 + [c_int] * 6 + [ptr] * 7
        lib.sgdc_cpu_forward.restype = lib.sgdc_cpu_backward.restype = c_int
        lib.sgdc_cpu_last_error.restype = ctypes.c_char_p
        lib.sgdc_cpu_isa_available.argtypes = [c_int]
        self.names = {code: name for name, code in ISAS.items()}

    def available_isas(self) -> list[str]:
        return [name for name, code in ISAS.items() if self.lib.sgdc_cpu_isa_available(code)]

    def best_isa(self) -> str:
        return self.names[self.lib.sgdc_cpu_best_isa()]

    @staticmethod
    def _config(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax):
        fmt = memory_format_of(x)  # as the operators choose it: x's, every other tensor laid out alike
        for t in (x, weights, gate):
            if t is not None:
                assert t.is_contiguous(memory_format=fmt) and t.dtype == x.dtype and t.device.type == "cpu"
        B, C, H, W = x.shape
        return [B, C, H, W, num_heads, kernel_size, dilation, int(clamp), int(softmax), DTYPES[x.dtype],
                int(fmt == torch.channels_last)]  # fmt: skip

    def _check(self, ran: int, isa: str | None) -> str:
        if ran < 0:
            raise ValueError(self.lib.sgdc_cpu_last_error().decode())
        return self.names[ran]

    def forward(self, x, weights, gate, kernel_size, num_heads, dilation=1, clamp=False, softmax=True, *,
                threads=1, isa=None, out=None):  # fmt: skip
        """out = window_conv(x, weights, gate); returns (out, the instruction set that ran)."""
        config = self._config(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax)
        out = torch.empty_like(x) if out is None else out
        ran = self.lib.sgdc_cpu_forward(*config, threads, ISAS.get(isa, 0), x.data_ptr(), weights.data_ptr(),
                                        gate.data_ptr() if gate is not None else None, out.data_ptr())  # fmt: skip
        return out, self._check(ran, isa)

    def backward(self, grad_out, x, weights, gate, kernel_size, num_heads, dilation=1, clamp=False, softmax=True, *,
                 threads=1, isa=None, outs=None):  # fmt: skip
        """(dx, dweights, dgate or None) of window_conv; returns (grads, the instruction set that ran)."""
        config = self._config(x, weights, gate, kernel_size, num_heads, dilation, clamp, softmax)
        assert grad_out.shape == x.shape and grad_out.dtype == x.dtype
        assert grad_out.is_contiguous(memory_format=memory_format_of(x))
        if outs is None:
            outs = (torch.empty_like(x), torch.empty_like(weights), None if gate is None else torch.empty_like(gate))
        ptrs = [None if t is None else t.data_ptr() for t in (grad_out, x, weights, gate, *outs)]
        ran = self.lib.sgdc_cpu_backward(*config, threads, ISAS.get(isa, 0), *ptrs)
        return outs, self._check(ran, isa)


def load(cache: Path | None = None) -> CpuKernels:
    return CpuKernels(build(cache) / "lib.so")
