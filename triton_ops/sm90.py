"""Compile every variant's kernels for Hopper (sm_90) without a GPU, and summarize their SASS.

    python -m sgdc_kernels.triton_ops.sm90 [--kernel-size 7] [--channels-per-head 64] [--sass DIR]

Triton compiles to a cubin with its own ptxas and needs no device for that; the wheel also ships
cuobjdump, whose SASS listing gives, per kernel: registers, spills, shared memory, and the count of
global loads (LDG), shared loads (LDS, LDSM), and tensor-core instructions (HMMA, HGMMA) in the
code. Run it with TRITON_INTERPRET unset (the interpreter never compiles).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

INTS = ["H", "W", "CG", "G", "sxb", "sxc", "sxp", "skb", "skc", "skp"]
# Static instruction counts, by SASS opcode prefix (each one line of the listing).
OPCODES = {"STL": r"\bSTL(\.|\s)", "LDG": r"\bLDG\.", "LDS": r"\bLDS(\.|\s)", "LDSM": r"\bLDSM\.", "STS": r"\bSTS(\.|\s)",
           "STG": r"\bSTG\.", "HMMA": r"\bHMMA\.", "HGMMA": r"\bHGMMA\.", "FFMA": r"\bFFMA\b", "MUFU": r"\bMUFU\."}  # fmt: skip


def _kernels(m, kernel_size: int, block_c: int):
    """(name, kernel, pointer arguments, constexprs, num_warps) per dtype, for every variant's
    kernels at the launch parameters the operators would pick on a GPU."""
    for dtype in ("fp32", "bf16"):
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        taps = {**m._blocks(block_c, 128 * 128), "K": kernel_size, "HAS_GATE": True}
        band = {**m._dot_blocks(block_c, 128, kernel_size, torch_dtype), "K": kernel_size, "HAS_GATE": True}
        fp32 = [("dp_ptr", "fp32"), ("lse_ptr", "fp32")]
        yield dtype, "v1 forward", m._sgdc_fwd_kernel, ["x_ptr", "k_ptr", "g_ptr", "out_ptr"], taps
        yield dtype, "v1 backward taps", m._sgdc_bwd_taps_kernel, ["dout_ptr", "x_ptr", "k_ptr", "g_ptr", "dk_ptr", "dg_ptr", "gy_ptr", *fp32], taps  # fmt: skip
        yield dtype, "v1 backward dx", m._sgdc_bwd_dx_kernel, ["gy_ptr", "k_ptr", fp32[1], "dx_ptr"], taps
        yield dtype, "band forward", m._sgdc_fwd_dot_kernel, ["x_ptr", "k_ptr", "g_ptr", "out_ptr"], band
        yield dtype, "band backward", m._sgdc_bwd_dot_kernel, ["dout_ptr", "x_ptr", "k_ptr", "g_ptr", "dk_ptr", "dg_ptr", "gy_ptr", fp32[1]], band  # fmt: skip
        yield dtype, "band backward dx", m._sgdc_bwd_dx_dot_kernel, ["gy_ptr", "k_ptr", fp32[1], "dx_ptr"], band


def _sass_stats(cubin: bytes, tool: Path) -> tuple[dict, str]:
    """Registers, local memory (spills), and the opcode counts of one cubin; and its SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = lambda *a: subprocess.run([str(tool), *a, f.name], check=True, capture_output=True, text=True).stdout
        usage, sass = run("-res-usage"), run("-sass")
    stats = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    stats.update({name: len(re.findall(pattern, sass)) for name, pattern in OPCODES.items()})
    return stats, sass


def compile_all(kernel_size: int = 7, block_c: int = 64, sass_dir: str | None = None) -> list[dict]:
    """Compile every kernel for sm_90 in fp32 and bf16; one row of statistics per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import sgdc_conv as m

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for dtype, name, kernel, pointers, params in _kernels(m, kernel_size, block_c):
        consts = {k: v for k, v in params.items() if k in kernel.arg_names}
        signature = {}
        for p in pointers:
            arg, ty = p if isinstance(p, tuple) else (p, dtype)
            signature[arg] = "*" + ty
        signature.update({n: "i32" for n in INTS})
        signature.update({n: "constexpr" for n in consts})
        src = ASTSource(fn=kernel, signature=signature, constexprs=consts)
        warps = params.get("num_warps", 4)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        meta = compiled.metadata
        row = {"kernel": name, "dtype": dtype, "warps": warps, "smem_bytes": meta.shared, **{k: v for k, v in consts.items() if k.isupper() and k not in ("K", "HAS_GATE")}}  # fmt: skip
        if tool.exists():
            stats, sass = _sass_stats(compiled.asm["cubin"], tool)
            row.update(stats)
            if sass_dir:
                Path(sass_dir).mkdir(parents=True, exist_ok=True)
                (Path(sass_dir) / f"{name.replace(' ', '_')}_{dtype}.sass").write_text(sass)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--channels-per-head", type=int, default=64)
    parser.add_argument("--sass", metavar="DIR", help="also write each kernel's SASS listing into DIR")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size must be a positive odd number, got {args.kernel_size}")
    rows = compile_all(args.kernel_size, args.channels_per_head, args.sass)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
