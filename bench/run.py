#!/usr/bin/env python
"""Benchmark every available sgdc_conv backend against the paper's unfold path.

    python bench/run.py                      # all backends, default shapes for this machine
    python bench/run.py --device cuda --dtypes float32,bfloat16 --out bench/out/h100.json
    python bench/run.py --backends torch,unfold --shapes 2x64x64x64x4x7 --no-memory

For each case (shape, dtype, backend) it reports the median time of the forward and of
forward+backward, the speedup over `unfold`, the peak memory beyond the inputs during
forward+backward and, on a GPU, the percentage of the memory roofline of SPEC section 5 with the
device-to-device copy bandwidth measured in the same run. On a GPU it also times the strongest
peer a user has without this package: torch.compile of the shift-and-accumulate formulation
(row `torch.compile(shift)`).

Times: CUDA events on a GPU, perf_counter on the CPU; medians after warm-up. Memory: on a GPU,
torch.cuda.max_memory_allocated; on the CPU, the peak resident set (VmHWM, reset through
/proc/self/clear_refs) of a fresh subprocess per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import sgdc_kernels
from sgdc_kernels import available_backends, sgdc_conv, testing
from sgdc_kernels.reference import shift_forward

PEER = "torch.compile(shift)"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
GPU_SHAPES = ["8x256x128x128x4x7", "8x256x64x64x4x7", "8x64x128x128x4x13"]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
CPU_SHAPES = ["2x64x64x64x4x7", "1x32x96x96x4x5"]


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 6:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BxCxHxWxGxK, e.g. 8x256x128x128x4x7")
    return parts


def make_inputs(shape, dtype, device, layout="nchw", requires_grad=False):
    """Random inputs (never zeros) and a gradient, in the given memory layout."""
    torch.manual_seed(0)
    fmt = LAYOUTS[layout]
    x, kernel, gate = testing.make_inputs(shape, dtype, device, memory_format=fmt, scale=1.0)
    grad_out = torch.randn_like(x)
    for t in (x, kernel, gate):
        t.requires_grad_(requires_grad)
    return x, kernel, gate, grad_out


_COMPILED = {}


def make_fn(backend: str, shape):
    """A callable (x, kernel, gate) -> out for a backend name or the compiled peer."""
    K, G = shape[5], shape[4]
    if backend == PEER:
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(shift_forward, dynamic=False)
        compiled = _COMPILED["fn"]
        return lambda x, k, g: compiled(x, k, g, K, G)
    return lambda x, k, g: sgdc_conv(x, k, g, kernel_size=K, num_heads=G, backend=backend)


def roofline_bytes(shape, dtype) -> tuple[int, int]:
    """Fewest bytes moved (SPEC section 5): forward, and forward+backward."""
    B, C, H, W, G, K = shape
    act, taps = B * C * H * W, B * G * K * K * H * W
    size = torch.empty((), dtype=dtype).element_size()
    fwd = (3 * act + taps) * size
    bwd = (5 * act + 2 * taps) * size
    return fwd, fwd + bwd


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def median_ms(step, device: str, warmup: int, iters: int, budget_s: float) -> float:
    for _ in range(warmup):
        step()
    times = []
    start_all = time.perf_counter()
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, iters=20, budget_s=5)
    return 2 * n * 4 / (ms * 1e-3)


def time_case(backend, shape, dtype, layout, device, args) -> dict:
    fn = make_fn(backend, shape)
    x, kernel, gate, grad_out = make_inputs(shape, dtype, device, layout)

    def forward():
        with torch.no_grad():
            fn(x, kernel, gate)

    xg, kg, gg, _ = (t.detach().requires_grad_() for t in (x, kernel, gate, grad_out))

    def forward_backward():
        out = fn(xg, kg, gg)
        torch.autograd.grad(out, (xg, kg, gg), grad_out)

    row = {}
    row["fwd_ms"] = median_ms(forward, device, args.warmup, args.iters, args.budget)
    row["fwdbwd_ms"] = median_ms(forward_backward, device, args.warmup, args.iters, args.budget)
    if device == "cuda" and not args.no_memory:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        row["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


# ------------------------------------------------------------------------------------------------
# CPU peak memory: one fresh process per case
# ------------------------------------------------------------------------------------------------


def read_proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak resident set (VmHWM) to the current one and return the current one (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return read_proc_status("VmRSS")


def measure_cpu_memory_child(backend, shape, dtype_name, layout) -> None:
    """Run in a subprocess: prints the peak resident bytes of one forward+backward beyond the inputs."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dtype = DTYPES[dtype_name]
    fn = make_fn(backend, shape)
    x, kernel, gate, grad_out = make_inputs(shape, dtype, "cpu", layout, requires_grad=True)
    # warm-up on a tiny case: loads the backend (and compiles) without touching the big arrays
    small = (1, shape[1], 2, 2, shape[4], shape[5])
    xs, ks, gs, gos = make_inputs(small, dtype, "cpu", layout, requires_grad=True)
    torch.autograd.grad(make_fn(backend, small)(xs, ks, gs), (xs, ks, gs), gos)
    base = reset_peak_rss()
    out = fn(x, kernel, gate)
    grads = torch.autograd.grad(out, (x, kernel, gate), grad_out)
    del out, grads
    print(json.dumps({"peak_extra_mb": (read_proc_status("VmHWM") - base) / 2**20}))


def cpu_peak_memory(backend, shape, dtype_name, layout) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # large blocks go back to the OS on free
    case = [backend, "x".join(map(str, shape)), dtype_name, layout]
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", *case]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"  memory measurement of {backend} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_mb"]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def format_table(rows, device) -> str:
    headers = ["shape BxCxHxWxGxK", "dtype", "layout", "backend", "fwd ms", "x unfold", "fwd+bwd ms", "x unfold", "peak extra MB"]
    if device == "cuda":
        headers += ["fwd % roof", "f+b % roof"]
    lines = []
    for r in rows:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        cells = [r["shape"], r["dtype"], r["layout"], r["backend"]]
        if "error" in r:
            cells += [f"error: {r['error']}"] + [""] * (len(headers) - 5)
        else:
            cells += [
                f(r["fwd_ms"], ".3f"), f(r.get("fwd_speedup"), ".1f"),
                f(r["fwdbwd_ms"], ".3f"), f(r.get("fwdbwd_speedup"), ".1f"),
                f(r.get("peak_extra_mb"), ".1f"),
            ]  # fmt: skip
            if device == "cuda":
                cells += [f(r.get("fwd_roofline_pct"), ".0f"), f(r.get("fwdbwd_roofline_pct"), ".0f")]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--backends", help="comma-separated backends (default: all available, plus the compiled peer on GPU); "
                        f"'{PEER}' names the compiled shift-and-accumulate peer")  # fmt: skip
    parser.add_argument("--dtypes", help="comma-separated: float32,float16,bfloat16,float64 (default GPU: float32,bfloat16; CPU: float32)")
    parser.add_argument("--shapes", help="comma-separated BxCxHxWxGxK (default depends on the device)")
    parser.add_argument("--layouts", default="nchw", help="comma-separated: nchw,channels_last (default nchw)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default GPU 10, CPU 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default GPU 50, CPU 5)")
    parser.add_argument("--budget", type=float, default=10.0, help="max seconds of timed iterations per measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-peer", action="store_true", help=f"skip the {PEER} peer")
    parser.add_argument("--out", default="bench/out/results.json", help="JSON output path")
    parser.add_argument("--train-step", action="store_true",
                        help="then time a full SGD-Net training step per backend (bench/train_step.py, needs "
                        "the 'train' extra); its JSON goes beside --out as *_train_step.json")  # fmt: skip
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._memory_child:
        backend, shape, dtype_name, layout = args._memory_child
        measure_cpu_memory_child(backend, parse_shape(shape), dtype_name, layout)
        return 0

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    gpu = device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.iters = args.iters if args.iters is not None else (50 if gpu else 5)
    shapes = [parse_shape(s) for s in (args.shapes.split(",") if args.shapes else (GPU_SHAPES if gpu else CPU_SHAPES))]
    dtype_names = args.dtypes.split(",") if args.dtypes else (["float32", "bfloat16"] if gpu else ["float32"])
    for name in dtype_names:
        if name not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {name!r}; expected some of {', '.join(DTYPES)}")
    layouts = args.layouts.split(",")
    for name in layouts:
        if name not in LAYOUTS:
            parser.error(f"--layouts: unknown layout {name!r}; expected some of {', '.join(LAYOUTS)}")
    on_device = [b for b in available_backends(device) if not (b == "triton" and not gpu)]
    if args.backends:
        backends = args.backends.split(",")
        for b in backends:
            if b != PEER and b not in on_device:
                parser.error(f"--backends: {b!r} is not available on {device} ({sgdc_kernels.unavailable_reason(b) or 'see python -m sgdc_kernels.info'})")
    else:
        backends = on_device + ([PEER] if gpu and not args.no_peer else [])
    if "unfold" in backends:  # the baseline first
        backends = ["unfold"] + [b for b in backends if b != "unfold"]

    meta = {
        "sgdc_kernels": sgdc_kernels.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    if gpu:
        meta["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
    print(f"# {meta['device']}, torch {meta['torch']}, sgdc-kernels {meta['sgdc_kernels']}"
          + (f", copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s" if gpu else ""), flush=True)  # fmt: skip

    rows = []
    cases = [(shape, d, layout) for shape in shapes for d in dtype_names for layout in layouts]
    for shape, dtype_name, layout in cases:
        dtype = DTYPES[dtype_name]
        base = None
        for backend in backends:
            row = {"shape": "x".join(map(str, shape)), "dtype": dtype_name, "layout": layout, "backend": backend}
            try:
                row.update(time_case(backend, shape, dtype, layout, device, args))
                if not gpu and not args.no_memory:
                    row["peak_extra_mb"] = cpu_peak_memory(backend, shape, dtype_name, layout)
            except (RuntimeError, TypeError, ValueError) as exc:  # OOM, unsupported dtype, ...
                row["error"] = str(exc).splitlines()[0][:120]
                if gpu:
                    torch.cuda.empty_cache()
            if backend == "unfold" and "error" not in row:
                base = row
            if base is not None and "error" not in row:
                row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"]
                row["fwdbwd_speedup"] = base["fwdbwd_ms"] / row["fwdbwd_ms"]
            if gpu and "error" not in row:
                fwd_bytes, fwdbwd_bytes = roofline_bytes(shape, dtype)
                bw = meta["copy_bandwidth_GBps"] * 1e9
                row["fwd_roofline_ms"] = fwd_bytes / bw * 1e3
                row["fwdbwd_roofline_ms"] = fwdbwd_bytes / bw * 1e3
                row["fwd_roofline_pct"] = 100 * row["fwd_roofline_ms"] / row["fwd_ms"]
                row["fwdbwd_roofline_pct"] = 100 * row["fwdbwd_roofline_ms"] / row["fwdbwd_ms"]
            rows.append(row)
            print(format_table([row], device).splitlines()[-1], flush=True)

    print()
    print(format_table(rows, device))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"\nwrote {args.out}")
    if args.train_step:
        out = os.path.splitext(args.out)[0] + "_train_step.json"
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
        print(f"\n# SGD-Net training step ({script})", flush=True)
        return subprocess.run([sys.executable, script, "--device", device, "--out", out]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
