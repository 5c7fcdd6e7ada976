#!/usr/bin/env python
"""What the compiler made of every CUDA kernel, without a GPU: registers, spills, shared memory
(ptxas), and per kernel the SASS instruction counts that set its speed (shared loads/stores,
global loads/stores, FMAs), read with cuobjdump.

    python bench/cuda_resources.py                  # sm_90, K=7 kernels, all dtypes and layouts
    python bench/cuda_resources.py --all --arch 80  # every instantiation, for sm_80

It compiles csrc/cuda/kernels.cuh alone (no ATen, a few seconds per architecture) with every
kernel instantiated through run_forward/run_backward, the same code the extension builds.
Needs nvcc (CUDA_HOME or /usr/local/cuda) and torch's headers. bench/NOTES_cuda.md uses its output.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TU = r"""
#include "cuda/kernels.cuh"
using namespace sgdc::cuda_impl;
template <typename T, bool CL> void instantiate() {
  for (Variant v : {Variant::kV1, Variant::kV2}) {
    run_forward<T, CL>(v, Shape{}, nullptr, nullptr, nullptr, nullptr, nullptr);
    run_backward<T, CL>(v, Shape{}, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                        nullptr, nullptr);
  }
}
"""
INSTANCES = {
    "float": ["float, false", "float, true"],
    "all": [f"{t}, {cl}" for t in ("float", "c10::Half", "c10::BFloat16") for cl in ("false", "true")],
}

# SASS opcodes counted per kernel (the prefix before the first '.').
COUNTED = ("LDS", "STS", "LDG", "STG", "FFMA", "HMMA", "MUFU", "BAR", "LDL", "STL")


def find_nvcc() -> str:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = os.path.join(home, "bin", "nvcc")
    if os.path.exists(nvcc):
        return nvcc
    found = shutil.which("nvcc")
    if not found:
        sys.exit("cuda_resources: nvcc not found (set CUDA_HOME)")
    return found


def find_tool(name: str, nvcc: str) -> str:
    """A CUDA binary utility: beside nvcc, on PATH, or the copy Triton's wheel ships."""
    for candidate in (os.path.join(os.path.dirname(nvcc), name), shutil.which(name)):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    sys.exit(f"cuda_resources: {name} not found (install the CUDA toolkit or triton)")


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(pretty: str) -> str:
    """'void sgdc::cuda_impl::v2::window_v2<(Mode)0, 7, 16, ...>(Params<float>)' -> readable."""
    pretty = pretty.replace("sgdc::cuda_impl::", "").replace("(sgdc::cuda_impl::Mode)", "mode")
    pretty = pretty.replace("c10::", "").replace("void ", "")
    return re.sub(r"\(Params<[^)]*>\)$", "", pretty)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    ap.add_argument("--all", action="store_true", help="every kernel, not only the K=7 ones")
    ap.add_argument(
        "--dtypes",
        choices=sorted(INSTANCES),
        default="all",
        help="instantiate every dtype (default) or float32 only (faster)",
    )
    args = ap.parse_args(argv)
    import torch.utils.cpp_extension as ce

    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        tu = os.path.join(tmp, "kernels.cu")
        with open(tu, "w") as f:
            f.write(TU + "".join(f"template void instantiate<{i}>();\n" for i in INSTANCES[args.dtypes]))
        cubin = os.path.join(tmp, "kernels.cubin")
        cmd = [nvcc, "-cubin", f"-arch=sm_{args.arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
               "-I", os.path.join(ROOT, "csrc"), *(f"-I{p}" for p in ce.include_paths()), tu, "-o", cubin]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            return res.returncode
        ptxas = res.stderr
        cuobjdump = find_tool("cuobjdump", nvcc)
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout

    # ptxas: "Compiling entry function '_Z...' for 'sm_90'" then "Used N registers, ... N bytes smem"
    usage = {}
    current = None
    for line in ptxas.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"entry function '(\S+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            usage.setdefault(current, {}).update(stack=int(m.group(1)), spill=int(m.group(2)) + int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            usage.setdefault(current, {})["regs"] = int(m.group(1))

    counts = collections.defaultdict(collections.Counter)
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)(\S*)", line)
        if m and current:
            op = m.group(1)
            if op in COUNTED:
                counts[current][op] += 1

    names = sorted(set(usage) | set(counts))
    pretty = demangle(names)
    rows = []
    for name in names:
        label = short_name(pretty[name])
        if not args.all and not re.search(r"[<,] ?7, ", label):
            continue
        u, c = usage.get(name, {}), counts.get(name, {})
        rows.append(
            (label, u.get("regs", "?"), u.get("spill", 0), u.get("stack", 0), *(c.get(op, 0) for op in COUNTED))
        )
    header = ("kernel", "regs", "spill B", "stack B", *COUNTED)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    print("\n(static SASS instruction counts per kernel: unrolled loops count once per unrolled copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
