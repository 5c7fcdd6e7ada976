#!/usr/bin/env python
"""Benchmark every available sgdc_conv backend against the paper's unfold path.

    python bench/run.py                      # all backends, default shapes for this machine
    python bench/run.py --device cuda --dtypes float32,bfloat16 --out bench/out/h100.json
    python bench/run.py --backends torch,unfold --shapes 2x64x64x64x4x7 --no-memory --threads 1
    python bench/run.py --backends unfold,cuda@all      # every kernel variant of the cuda backend
    python bench/run.py --shapes overlock               # NATTEN's na2d_av at OverLoCK's shapes

For each case (shape, dtype, backend) it reports the median time of the forward and of
forward+backward with their spread, the speedup over `unfold`, the peak memory beyond the inputs
during forward+backward and, on a GPU, the percentage of the memory roofline (docs/performance.md)
with the device-to-device copy bandwidth measured in the same run. On a GPU it also times the
strongest peer a user has without this package: torch.compile of the shift-and-accumulate
formulation (row `torch.compile(shift)`).

A shape is BxCxHxWxGxK (an sgdc_conv call) or the name of an na2d_av call of OverLoCK's
dynamic (ContMix) blocks, e.g. overlock-t-s3-k13 (model overlock_t, stage 3, kernel 13; at a
512x512 input, batch 8; `overlock` names all of them): those rows time sgdc_kernels.compat.na2d_av,
NATTEN's layout and clamped windows, through each backend, beside `unfold` (the F.unfold +
replicate-pad formulation) and, on a GPU, its torch.compile (row `torch.compile(unfold)`).

Times: CUDA events on a GPU, perf_counter on the CPU. Each measurement warms up for --warmup-time
seconds, then repeats for --time seconds (at least --min-iters times); the table shows the median
and the interquartile range as a percentage of it, the JSON also the quartiles, min and max, and a
warning names every row whose spread is large (a busy machine: rerun, or pin --threads).
A backend name may carry a kernel variant, `name@variant` or `name@all`, selected through the
backend's environment variable while its row is timed. Memory: on a GPU,
torch.cuda.max_memory_allocated; on the CPU, the peak resident set (VmHWM, reset through
/proc/self/clear_refs) of a fresh subprocess per case.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# OpenMP threads that spin between parallel regions (the default) turn any other busy process
# into huge, random delays for backends made of many small ops (`torch` runs a few per tap, K*K
# taps): measured on a shared 2-core machine, its forward took 23 to 660 ms from run to run with
# spinning threads, 20 to 27 ms with sleeping ones. Set before torch loads the OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import sgdc_kernels  # noqa: E402
from sgdc_kernels import available_backends, registry, sgdc_conv, testing  # noqa: E402
from sgdc_kernels.compat import na2d_av  # noqa: E402
from sgdc_kernels.reference import shift_forward  # noqa: E402
from sgdc_kernels.registry import get_backend, parse_backend  # noqa: E402

PEER = "torch.compile(shift)"  # sgdc_conv shapes only
UNFOLD_PEER = "torch.compile(unfold)"
PEERS = (PEER, UNFOLD_PEER)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
GPU_SHAPES = ["8x256x128x128x4x7", "8x256x64x64x4x7", "8x64x128x128x4x13"]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
CPU_SHAPES = ["2x64x64x64x4x7", "1x32x96x96x4x5"]
SPREAD_WARN = 0.10  # interquartile range over median above which a row is flagged


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


class ConvCase:
    """An sgdc_conv call: x, kernel logits and gate logits of shape BxCxHxWxGxK."""

    op, default_peer = "sgdc_conv", PEER

    def __init__(self, dims: tuple[int, ...]):
        self.dims, self.label = dims, "x".join(map(str, dims))

    def layouts(self, requested: list[str]) -> list[str]:
        return requested

    def inputs(self, dtype, device, layout):
        """Random inputs (never zeros) in the given memory layout, and a gradient for the output."""
        torch.manual_seed(0)
        x, kernel, gate = testing.make_inputs(self.dims, dtype, device, memory_format=LAYOUTS[layout], scale=1.0)
        return (x, kernel, gate), torch.randn_like(x)

    def call(self, backend: str, x, kernel, gate):
        B, C, H, W, G, K = self.dims
        return sgdc_conv(x, kernel, gate, kernel_size=K, num_heads=G, backend=backend)

    def shift(self, x, kernel, gate):
        """The shift-and-accumulate formulation, for torch.compile (the PEER row)."""
        return shift_forward(x, kernel, gate, self.dims[5], self.dims[4])

    def tiny(self) -> ConvCase:
        B, C, H, W, G, K = self.dims
        return ConvCase((1, C, 2, 2, G, K))

    def roofline_bytes(self, dtype) -> tuple[int, int]:
        """Fewest bytes moved (docs/performance.md): forward, and forward+backward."""
        B, C, H, W, G, K = self.dims
        act, taps = B * C * H * W, B * G * K * K * H * W
        size = torch.empty((), dtype=dtype).element_size()
        fwd = (3 * act + taps) * size  # read x, kernel, gate; write out
        bwd = (5 * act + 2 * taps) * size  # read x, kernel, gate, dout; write dx, dkernel, dgate
        return fwd, fwd + bwd


class NA2DCase:
    """An na2d_av call in NATTEN's layout: attn (B, heads, H, W, K*K), softmaxed as a model passes
    it, and value (B, heads, H, W, D); dims = (B, heads, H, W, D, K)."""

    op, default_peer = "na2d_av", UNFOLD_PEER

    def __init__(self, label: str, dims: tuple[int, ...]):
        self.label, self.dims = label, dims

    def layouts(self, requested: list[str]) -> list[str]:
        return ["natten"]

    def inputs(self, dtype, device, layout="natten"):
        B, G, H, W, D, K = self.dims
        torch.manual_seed(0)
        attn = torch.randn(B, G, H, W, K * K, device=device).softmax(dim=-1).to(dtype)
        value = torch.randn(B, G, H, W, D, device=device).to(dtype)
        return (attn, value), torch.randn_like(value)

    def call(self, backend: str, attn, value):
        return na2d_av(attn, value, self.dims[5], backend=backend)

    def tiny(self) -> NA2DCase:
        B, G, H, W, D, K = self.dims
        return NA2DCase(self.label, (1, G, K, K, D, K))

    def describe(self) -> str:
        B, G, H, W, D, K = self.dims
        same = [n for n, dims in OVERLOCK_SHAPES.items() if dims == self.dims and n != self.label]
        also = f" (the same call as {', '.join(same)})" if same else ""
        return (f"{self.label}: na2d_av, attn ({B}, {G}, {H}, {W}, {K * K}), value ({B}, {G}, {H}, {W}, {D}), "
                f"kernel_size {K}{also}")  # fmt: skip

    def roofline_bytes(self, dtype) -> tuple[int, int]:
        """Fewest bytes moved: forward, and forward+backward."""
        B, G, H, W, D, K = self.dims
        pixels = B * G * H * W
        size = torch.empty((), dtype=dtype).element_size()
        fwd = (K * K + 2 * D) * pixels * size  # read attn, value; write out
        bwd = (2 * K * K + 3 * D) * pixels * size  # read attn, value, dout; write dattn, dvalue
        return fwd, fwd + bwd


# The na2d_av calls of OverLoCK's dynamic (ContMix) blocks, from the OverLoCK code: per model, the
# embedding widths and sub_num_heads of stages 3 and 4, which run at 1/16 and 1/32 of the input
# with a large kernel of 13 and 7 and a small kernel of 5. A block has 2*sub_num_heads heads; each
# of its two na2d_av calls (small and large kernel) takes every head, with half of the channels.
OVERLOCK_MODELS = {"xt": ((256, 336), (4, 6)), "t": ((256, 512), (4, 8))}
OVERLOCK_KERNELS = {3: (5, 13), 4: (5, 7)}
OVERLOCK_INPUT, OVERLOCK_BATCH = 512, 8  # a segmentation input; the batch of the sgdc_conv reference shape


def overlock_shapes() -> dict[str, tuple[int, ...]]:
    """``overlock-<model>-s<stage>-k<K>`` -> (B, heads, H, W, D, K) of its na2d_av call."""
    shapes = {}
    for model, (widths, sub_heads) in OVERLOCK_MODELS.items():
        for stage, dim, sub in zip((3, 4), widths, sub_heads):
            heads, side = 2 * sub, OVERLOCK_INPUT // 2 ** (stage + 1)
            for K in OVERLOCK_KERNELS[stage]:
                shapes[f"overlock-{model}-s{stage}-k{K}"] = (OVERLOCK_BATCH, heads, side, side, dim // (2 * heads), K)
    return shapes


OVERLOCK_SHAPES = overlock_shapes()


def parse_shapes(text: str) -> list:
    """The cases of a --shapes list: BxCxHxWxGxK, OverLoCK names, or `overlock` for every distinct
    OverLoCK call (models sharing a call are timed once, under the first name)."""
    cases = []
    for item in text.split(","):
        if item == "overlock":
            first = {}
            for name, dims in OVERLOCK_SHAPES.items():
                first.setdefault(dims, name)
            cases += [NA2DCase(name, dims) for dims, name in first.items()]
        elif item in OVERLOCK_SHAPES:
            cases.append(NA2DCase(item, OVERLOCK_SHAPES[item]))
        else:
            cases.append(ConvCase(parse_shape(item)))
    return cases


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) != 6 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"shape {text!r}: expected BxCxHxWxGxK, e.g. 8x256x128x128x4x7, 'overlock' or one of "
            + ", ".join(OVERLOCK_SHAPES)
        )
    return tuple(int(p) for p in parts)


_COMPILED = {}


def make_fn(backend: str, case):
    """A callable (*inputs) -> out for a backend name (a variant suffix is dropped: the variant is
    selected through the environment, see :func:`variant_env`) or a compiled peer."""
    backend = backend.partition("@")[0]
    if backend == PEER and not hasattr(case, "shift"):
        raise ValueError(f"{PEER} times sgdc_conv shapes only")
    if backend in PEERS:
        # one compiled callable per peer and case; torch.compile keeps its graphs per code object
        # (shared by the cases), so main() resets dynamo between cases to stay under its recompile limit
        key = (backend, case.label)
        if key not in _COMPILED:
            fn = case.shift if backend == PEER else functools.partial(case.call, "unfold")
            _COMPILED[key] = torch.compile(fn, dynamic=False)
        return _COMPILED[key]
    return functools.partial(case.call, backend)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


class Timing:
    """How long each measurement runs: warm-up and timed phases by time, with an iteration floor."""

    def __init__(self, warmup_s: float, time_s: float, min_iters: int, max_iters: int = 10_000):
        self.warmup_s, self.time_s, self.min_iters, self.max_iters = warmup_s, time_s, min_iters, max_iters


def summarize(times: list[float]) -> dict:
    """Median, quartiles, min, max (ms) and the count of a list of times."""
    t = sorted(times)
    q1, median, q3 = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else (t[0],) * 3
    return {"median": median, "q1": q1, "q3": q3, "min": t[0], "max": t[-1], "n": len(t)}


def measure(step, device: str, timing: Timing) -> dict:
    """Warm up for timing.warmup_s (at least one call), then time calls for timing.time_s (at
    least timing.min_iters); returns :func:`summarize` of the times in ms."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()  # the first call: loading, compiling, autotuning
    sync()
    end = time.perf_counter() + timing.warmup_s
    while time.perf_counter() < end:
        step()
    sync()
    times: list[float] = []
    end = time.perf_counter() + timing.time_s
    while len(times) < timing.max_iters and (len(times) < timing.min_iters or time.perf_counter() < end):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def median_ms(step, device: str, warmup: int, iters: int, budget_s: float) -> float:
    """Median of at most ``iters`` calls after ``warmup`` calls, stopping after ``budget_s``
    seconds (at least 3 calls): the count-based timer of bench/train_step.py."""
    for _ in range(warmup):
        step()
    return measure(step, device, Timing(0.0, budget_s, min(3, iters), max_iters=iters))["median"]


def spread(stats: dict) -> float:
    """Interquartile range over the median."""
    return (stats["q3"] - stats["q1"]) / stats["median"]


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, Timing(0.2, 0.5, 10))["median"]
    return 2 * n * 4 / (ms * 1e-3)


class variant_env:
    """Context manager: select the kernel variant of ``name@variant`` through the backend's
    environment variable, and restore the variable afterwards. A plain name changes nothing."""

    def __init__(self, spec: str):
        name, variant = parse_backend(spec) if spec not in PEERS else (spec, None)
        self.var = get_backend(name).variant_env if variant else None
        self.value = variant

    def __enter__(self):
        if self.var:
            self.saved = os.environ.get(self.var)
            os.environ[self.var] = self.value
        return self

    def __exit__(self, *exc):
        if self.var:
            if self.saved is None:
                os.environ.pop(self.var, None)
            else:
                os.environ[self.var] = self.saved


def time_case(backend, case, dtype, layout, device, timing: Timing, memory: bool) -> dict:
    fn = make_fn(backend, case)
    inputs, grad_out = case.inputs(dtype, device, layout)

    def forward():
        with torch.no_grad():
            fn(*inputs)

    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward_backward():
        torch.autograd.grad(fn(*leaves), leaves, grad_out)

    row = {}
    with variant_env(backend):
        for key, step in (("fwd", forward), ("fwdbwd", forward_backward)):
            stats = measure(step, device, timing)
            row[f"{key}_ms"] = stats.pop("median")
            row.update({f"{key}_{k}" + ("" if k == "n" else "_ms"): v for k, v in stats.items()})
        if device == "cuda" and memory:
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


def measure_cpu_memory_child(backend, case, dtype_name, layout) -> None:
    """Run in a subprocess: prints the peak resident bytes of one forward+backward beyond the inputs."""
    with variant_env(backend):
        _measure_cpu_memory(backend, case, dtype_name, layout)


def _forward_backward_once(backend, case, dtype, layout):
    """Inputs, then a function that runs one forward+backward on them."""
    inputs, grad_out = case.inputs(dtype, "cpu", layout)
    leaves = [t.requires_grad_() for t in inputs]
    fn = make_fn(backend, case)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)


def _measure_cpu_memory(backend, case, dtype_name, layout) -> None:
    dtype = DTYPES[dtype_name]
    step = _forward_backward_once(backend, case, dtype, layout)
    # warm-up on a tiny case: loads the backend (and compiles) without touching the big arrays
    _forward_backward_once(backend, case.tiny(), dtype, layout)()
    base = reset_peak_rss()
    step()
    print(json.dumps({"peak_extra_mb": (read_proc_status("VmHWM") - base) / 2**20}))


def cpu_peak_memory(backend, case, dtype_name, layout) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # large blocks go back to the OS on free
    threads = ["--threads", str(torch.get_num_threads())]
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        *threads,
        "--_memory-child",
        backend,
        case.label,
        dtype_name,
        layout,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"  memory measurement of {backend} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_mb"]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


class Table:
    """Rows printed once, as they are measured, in columns sized up front (the label columns from
    the cases to come, the numbers to a fixed width)."""

    def __init__(self, cases, backends, device: str):
        self.columns = [  # (header, width, row -> text)
            (
                "shape BxCxHxWxGxK" if all(c[0].op == "sgdc_conv" for c in cases) else "shape",
                max(len(c[0].label) for c in cases),
                lambda r: r["shape"],
            ),
            ("dtype", max(len(c[1]) for c in cases), lambda r: r["dtype"]),
            ("layout", max(len(c[2]) for c in cases), lambda r: r["layout"]),
            ("backend", max(len(b) for b in backends), lambda r: r["backend"]),
        ]
        for key, title in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            self.columns += [
                (f"{title} ms", 10, lambda r, k=key: _num(r.get(f"{k}_ms"), ".3f")),
                ("iqr %", 5, lambda r, k=key: _num(100 * spread(_stats(r, k)) if f"{k}_ms" in r else None, ".0f")),
                ("x unfold", 8, lambda r, k=key: _num(r.get(f"{k}_speedup"), ".1f")),
            ]
        self.columns.append(("peak extra MB", 13, lambda r: _num(r.get("peak_extra_mb"), ".1f")))
        if device == "cuda":
            self.columns += [
                ("fwd % roof", 10, lambda r: _num(r.get("fwd_roofline_pct"), ".0f")),
                ("f+b % roof", 10, lambda r: _num(r.get("fwdbwd_roofline_pct"), ".0f")),
            ]
        self.widths = [max(w, len(h)) for h, w, _ in self.columns]

    def header(self) -> str:
        heads = "  ".join(h.ljust(w) for (h, _, _), w in zip(self.columns, self.widths))
        return heads + "\n" + "  ".join("-" * w for w in self.widths)

    def line(self, row: dict) -> str:
        labels = [get(row).ljust(w) for (_, _, get), w in zip(self.columns[:4], self.widths)]
        if "error" in row:
            return "  ".join(labels + [f"error: {row['error']}"])
        cells = [get(row).rjust(w) for (_, _, get), w in zip(self.columns[4:], self.widths[4:])]
        return "  ".join(labels + cells).rstrip()


def _num(v, fmt) -> str:
    return "-" if v is None else format(v, fmt)


def _stats(row: dict, key: str) -> dict:
    return {"median": row[f"{key}_ms"], "q1": row[f"{key}_q1_ms"], "q3": row[f"{key}_q3_ms"]}


def check_backends(text: str, device: str, gpu: bool) -> list[str]:
    """The --backends list, variants expanded; raises ValueError with one line on a bad entry."""
    on_device = [b for b in available_backends(device) if not (b == "triton" and not gpu)]
    specs = []
    for spec in text.split(","):
        if spec in PEERS:
            specs.append(spec)
            continue
        name = spec.partition("@")[0]
        try:
            parse_backend(name)  # an unknown name first, before asking whether it is available
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("backend: ")) from None
        if name not in on_device:
            why = sgdc_kernels.unavailable_reason(name) or f"it does not run on {device} tensors here"
            raise ValueError(f"{name!r} is not available on {device}: {why}")
        try:
            specs += registry.expand_variants(spec)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("backend: ")) from None
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--backends", help="comma-separated backends, each optionally name@variant or name@all "
                        f"(default: all available, plus the compiled peer on GPU); '{PEER}' names the compiled "
                        f"shift-and-accumulate peer (sgdc_conv shapes only), '{UNFOLD_PEER}' the compiled unfold "
                        "formulation")  # fmt: skip
    parser.add_argument(
        "--dtypes",
        help="comma-separated: float32,float16,bfloat16,float64 (default GPU: float32,bfloat16; CPU: float32)",
    )
    parser.add_argument("--shapes", help="comma-separated BxCxHxWxGxK of sgdc_conv, or names of OverLoCK's na2d_av "
                        f"calls: {', '.join(OVERLOCK_SHAPES)}, or 'overlock' for all of them "
                        "(default depends on the device)")  # fmt: skip
    parser.add_argument(
        "--layouts",
        default="nchw",
        help="comma-separated: nchw,channels_last (default nchw); OverLoCK's shapes use NATTEN's layout",
    )
    parser.add_argument(
        "--warmup-time", type=float, default=None, help="seconds of warm-up per measurement (default GPU 0.2, CPU 0.5)"
    )
    parser.add_argument(
        "--time", type=float, default=None, help="seconds of timed calls per measurement (default GPU 0.5, CPU 1.5)"
    )
    parser.add_argument(
        "--min-iters", type=int, default=None, help="fewest timed calls per measurement (default GPU 20, CPU 5)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (torch.set_num_threads; default: torch's)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-peer", action="store_true",
                        help=f"skip the compiled peer of the default backends ({PEER} for sgdc_conv shapes, "
                        f"{UNFOLD_PEER} for OverLoCK's)")  # fmt: skip
    parser.add_argument(
        "--out", default="bench/out/results.json", help="JSON output path (default bench/out/results.json)"
    )
    parser.add_argument("--train-step", action="store_true",
                        help="then time a full SGD-Net training step per backend (bench/train_step.py, needs "
                        "the 'train' extra); its JSON goes beside --out as *_train_step.json")  # fmt: skip
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("warmup_time", "time", "min_iters", "threads"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name in ("min_iters", "threads"))):
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args._memory_child:
        backend, shape, dtype_name, layout = args._memory_child
        measure_cpu_memory_child(backend, parse_shapes(shape)[0], dtype_name, layout)
        return 0

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    gpu = device == "cuda"
    timing = Timing(
        args.warmup_time if args.warmup_time is not None else (0.2 if gpu else 0.5),
        args.time if args.time is not None else (0.5 if gpu else 1.5),
        args.min_iters or (20 if gpu else 5),
    )
    try:
        shapes = parse_shapes(args.shapes or ",".join(GPU_SHAPES if gpu else CPU_SHAPES))
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--shapes: {exc}")
    dtype_names = args.dtypes.split(",") if args.dtypes else (["float32", "bfloat16"] if gpu else ["float32"])
    for name in dtype_names:
        if name not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {name!r}; expected some of {', '.join(DTYPES)}")
    layouts = args.layouts.split(",")
    for name in layouts:
        if name not in LAYOUTS:
            parser.error(f"--layouts: unknown layout {name!r}; expected some of {', '.join(LAYOUTS)}")
    if args.backends:
        try:
            backends = check_backends(args.backends, device, gpu)
        except ValueError as exc:
            parser.error(f"--backends: {exc}")
    else:
        on_device = [b for b in available_backends(device) if not (b == "triton" and not gpu)]
        peers = [] if args.no_peer or not gpu else list(dict.fromkeys(c.default_peer for c in shapes))
        backends = on_device + peers
    if "unfold" in backends:  # the baseline first
        backends = ["unfold"] + [b for b in backends if b != "unfold"]

    meta = {
        "sgdc_kernels": sgdc_kernels.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name()
        if gpu
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "timing": {"warmup_s": timing.warmup_s, "time_s": timing.time_s, "min_iters": timing.min_iters},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    if gpu:
        meta["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
    header = f"# {meta['device']}, torch {meta['torch']}, sgdc-kernels {meta['sgdc_kernels']}, "
    header += f"{meta['threads']} threads (OMP_WAIT_POLICY={meta['OMP_WAIT_POLICY']})"
    if gpu:
        header += f", copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s"
    print(header, flush=True)

    for case in shapes:
        if case.op == "na2d_av":
            print(f"# {case.describe()}")
    rows = []
    cases = [(case, d, layout) for case in shapes for d in dtype_names for layout in case.layouts(layouts)]
    table = Table(cases, backends, device)
    print(table.header(), flush=True)
    for case, dtype_name, layout in cases:
        dtype = DTYPES[dtype_name]
        base = None
        # a compiled peer chosen by default runs for the cases it is the peer of; named ones for all
        case_backends = [b for b in backends if args.backends or b not in PEERS or b == case.default_peer]
        if any(b in PEERS for b in case_backends):
            torch._dynamo.reset()  # fresh compile caches: one compile per case, never the recompile limit
        for backend in case_backends:
            row = {"shape": case.label, "op": case.op, "dtype": dtype_name, "layout": layout, "backend": backend}
            if "@" in backend:
                row["variant"] = backend.partition("@")[2]
            try:
                row.update(time_case(backend, case, dtype, layout, device, timing, not args.no_memory))
                if not gpu and not args.no_memory:
                    row["peak_extra_mb"] = cpu_peak_memory(backend, case, dtype_name, layout)
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
                fwd_bytes, fwdbwd_bytes = case.roofline_bytes(dtype)
                bw = meta["copy_bandwidth_GBps"] * 1e9
                row["fwd_roofline_ms"] = fwd_bytes / bw * 1e3
                row["fwdbwd_roofline_ms"] = fwdbwd_bytes / bw * 1e3
                row["fwd_roofline_pct"] = 100 * row["fwd_roofline_ms"] / row["fwd_ms"]
                row["fwdbwd_roofline_pct"] = 100 * row["fwdbwd_roofline_ms"] / row["fwdbwd_ms"]
            rows.append(row)
            print(table.line(row), flush=True)

    noisy = [
        f"  {r['shape']} {r['dtype']} {r['layout']} {r['backend']} {k.replace('fwdbwd', 'fwd+bwd')}: "
        f"{100 * spread(_stats(r, k)):.0f}%"
        for r in rows if "error" not in r for k in ("fwd", "fwdbwd") if spread(_stats(r, k)) > SPREAD_WARN
    ]  # fmt: skip
    if noisy:
        print(f"\nwarning: the interquartile range exceeds {100 * SPREAD_WARN:.0f}% of the median in {len(noisy)} "
              "measurements; the machine was probably busy and these times are not trustworthy (rerun on a quiet "
              "machine, with a longer --time, or with fewer --threads):\n" + "\n".join(noisy),
              file=sys.stderr, flush=True)  # fmt: skip
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
