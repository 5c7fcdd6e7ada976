"""Compile every variant's kernels for Hopper (sm_90) without a GPU, and summarize their SASS.

    python -m sgdc_kernels.triton_ops.sm90 [--layouts nchw,channels_last] [--dtypes fp32,bf16]
                                           [--configs sgdc,overlock] [--sass DIR]

Triton compiles to a cubin with its own ptxas and needs no device for that; the wheel also ships
cuobjdump, whose SASS listing gives, per kernel: registers, spills, shared memory, and the count of
global loads (LDG), shared loads (LDS, LDSM), and tensor-core instructions (HMMA, HGMMA) in the
code, for each configuration asked for (``--configs``): "sgdc", sgdc_conv at the paper shape (B=8,
C=256, 128x128, 4 heads, K=7), and "overlock", NATTEN's na2d_av as OverLoCK's ContMix calls it
(clamped windows, raw weights, K=17, no gate) on x of shape (64, 64, 56, 56): B*heads = 64 items
of 64 channels, one head each, as sgdc_kernels.compat.na2d_av folds the heads into the batch. Run it with
TRITON_INTERPRET unset (the interpreter never compiles).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import band, ops, taps
from .common import _geometry

INTS = ["H", "W", "CG", "G", "sxb", "sxc", "sxp", "swb", "swc", "swp"]
# Static instruction counts, by SASS opcode prefix (each one line of the listing).
OPCODES = {"STL": r"\bSTL(\.|\s)", "LDG": r"\bLDG\.", "LDGSTS": r"\bLDGSTS\.", "LDS": r"\bLDS(\.|\s)",
           "LDSM": r"\bLDSM\.", "STS": r"\bSTS(\.|\s)", "STG": r"\bSTG\.", "HMMA": r"\bHMMA\.",
           "HGMMA": r"\bHGMMA\.", "FFMA": r"\bFFMA\b", "MUFU": r"\bMUFU\."}  # fmt: skip


PAPER_SHAPE = (8, 256, 128, 128, 4, 7)  # B, C, H, W, heads, K
# name: (shape, dilation, clamp, softmax, gate)
CONFIGS = {
    "sgdc": (PAPER_SHAPE, 1, False, True, True),
    "overlock": ((64, 64, 56, 56, 1, 17), 1, True, False, False),
}


def _kernels(config: str, dtype: str):
    """(name, kernel, pointer arguments, launch parameters) for every variant's kernels, at the
    launch parameters the operators would pick on a GPU for ``config``."""
    (_, C, H, W, G, K), dilation, clamp, softmax, gate = CONFIGS[config]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    mode = {"K": K, "HAS_GATE": gate, "D": dilation, "CLAMP": clamp, "SOFTMAX": softmax}
    taps_params = {**ops._blocks(C // G, H * W), **mode}
    band_params = {**ops._dot_blocks(C // G, K, torch_dtype), **mode, "SPLIT": dtype != "fp32" and softmax}
    band_dx_params = {**band_params, "HALO": ops._dx_halo(band_params, K, clamp)}
    stats, dp = ("stats_ptr", "fp32"), ("dp_ptr", "fp32")
    yield "v1 forward", taps._sgdc_fwd_kernel, ["x_ptr", "w_ptr", "g_ptr", "out_ptr"], taps_params
    yield "v1 backward taps", taps._sgdc_bwd_taps_kernel, ["dout_ptr", "x_ptr", "w_ptr", "g_ptr", "dw_ptr", "dg_ptr",
                                                           "gy_ptr", dp, stats], taps_params  # fmt: skip
    yield "v1 backward dx", taps._sgdc_bwd_dx_kernel, ["gy_ptr", "w_ptr", stats, "dx_ptr"], taps_params
    yield "band forward", band._sgdc_fwd_dot_kernel, ["x_ptr", "w_ptr", "g_ptr", "out_ptr"], band_params
    yield "band backward", band._sgdc_bwd_dot_kernel, ["dout_ptr", "x_ptr", "w_ptr", "g_ptr", "dw_ptr", "dg_ptr",
                                                       "gy_ptr", stats], band_params  # fmt: skip
    yield "band backward dx", band._sgdc_bwd_dx_dot_kernel, ["gy_ptr", "w_ptr", stats, "dx_ptr"], band_dx_params


def _integer_arguments(shape, layout: str) -> dict:
    """The integer arguments of a launch on tensors of ``shape`` in ``layout`` (strides included)."""
    B, C, H, W, G, K = shape
    fmt = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}[layout]
    x = torch.empty(B, C, H, W, device="meta").contiguous(memory_format=fmt)
    weights = torch.empty(B, G * K * K, H, W, device="meta").contiguous(memory_format=fmt)
    return dict(zip(INTS, _geometry(x, weights, G)))


def _sass_stats(cubin: bytes, tool: Path) -> tuple[dict, str]:
    """Registers, local memory (spills), and the opcode counts of one cubin; and its SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()

        def run(*args):
            return subprocess.run([str(tool), *args, f.name], check=True, capture_output=True, text=True).stdout

        usage, sass = run("-res-usage"), run("-sass")
    stats = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    stats.update({name: len(re.findall(pattern, sass)) for name, pattern in OPCODES.items()})
    return stats, sass


def compile_all(
    layouts=("nchw", "channels_last"), dtypes=("fp32", "bf16"), configs=("sgdc",), sass_dir=None
) -> list[dict]:
    """Compile every kernel for sm_90 as a launch in each of ``configs`` would (Triton specializes
    integer arguments equal to 1, such as the unit stride, and marks those divisible by 16, and
    the pointers, as 16-aligned); one row of statistics per (config, layout, dtype, kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mode_keys = ("K", "HAS_GATE", "D", "CLAMP", "SOFTMAX")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for config, layout in itertools.product(configs, layouts):
        ints = _integer_arguments(CONFIGS[config][0], layout)
        for dtype in dtypes:
            for name, kernel, pointers, params in _kernels(config, dtype):
                consts = {k: v for k, v in params.items() if k in kernel.arg_names}
                consts.update({k: 1 for k, v in ints.items() if v == 1})
                signature = {}
                for p in pointers:
                    arg, ty = p if isinstance(p, tuple) else (p, dtype)
                    signature[arg] = "*" + ty
                signature.update({n: "i32" for n in INTS if n not in consts})
                signature.update({n: "constexpr" for n in consts})
                aligned = [p if isinstance(p, str) else p[0] for p in pointers] + [
                    k for k, v in ints.items() if v % 16 == 0
                ]
                attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
                src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
                warps = params.get("num_warps", 4)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                shown = {k: v for k, v in params.items() if k.isupper() and k not in mode_keys}
                row = {"config": config, "layout": layout, "dtype": dtype, "kernel": name, "warps": warps, **shown,
                       "smem_bytes": compiled.metadata.shared}  # fmt: skip
                if tool.exists():
                    stats, sass = _sass_stats(compiled.asm["cubin"], tool)
                    row.update(stats)
                    if sass_dir:
                        Path(sass_dir).mkdir(parents=True, exist_ok=True)
                        path = Path(sass_dir) / f"{config}_{layout}_{dtype}_{name.replace(' ', '_')}.sass"
                        path.write_text(sass)
                rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="nchw,channels_last", help="comma-separated: nchw, channels_last")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--configs", default="sgdc", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--sass", metavar="DIR", help="also write each kernel's SASS listing into DIR")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    layouts, dtypes, configs = args.layouts.split(","), args.dtypes.split(","), args.configs.split(",")
    for name, values, allowed in (
        ("--layouts", layouts, ("nchw", "channels_last")),
        ("--dtypes", dtypes, ("fp32", "bf16")),
        ("--configs", configs, tuple(CONFIGS)),
    ):
        if not set(values) <= set(allowed):
            parser.error(f"{name} takes a comma-separated list of {', '.join(allowed)}, got {','.join(values)}")
    rows = compile_all(layouts=layouts, dtypes=dtypes, configs=configs, sass_dir=args.sass)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
