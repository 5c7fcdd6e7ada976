"""How bench/run.py and bench/train_step.py measure: times with their spread, copy bandwidth, peak memory.

Times: CUDA events on a GPU, perf_counter on the CPU. :func:`measure` warms up for a while, then
repeats a call for a while (with an iteration floor) and :func:`summarize` reports the median,
quartiles, min and max; :func:`interleaved` times several calls in rotating rounds instead, so that
a busy spell of a shared machine slows them alike and their ratios hold. :func:`time_case` times
the forward and the forward+backward of a row and, on a GPU, its peak memory beyond the inputs
(torch.cuda.max_memory_allocated).

CPU peak memory is the peak resident set (VmHWM, reset through /proc/self/clear_refs) of a fresh
process per case, so that no earlier case's freed blocks hide it: :func:`cpu_peak_memory` runs
this file as a script, which times nothing and prints the growth of the peak over one
forward+backward as JSON:

    python bench/timing.py BACKEND SHAPE DTYPE LAYOUT [--threads N]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch


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
    """Bytes/s of a large device-to-device copy (read + write): 1 GiB on a GPU, 512 MB on the CPU
    (well beyond the last-level cache), at torch's thread count."""
    n = 1 << (28 if device == "cuda" else 27)  # float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    limits = Timing(0.2, 0.5, 10) if device == "cuda" else Timing(0.1, 0.3, 5)
    ms = measure(lambda: dst.copy_(src), device, limits)["median"]
    return 2 * n * 4 / (ms * 1e-3)


def interleaved(steps: dict, timing: Timing) -> dict:
    """{key: :func:`summarize` of its times in ms} for CPU calls ``steps`` ({key: call}), timed in
    rounds: every call once per round, in an order that rotates from round to round, until
    timing.time_s per call has passed (at least timing.min_iters rounds), after timing.warmup_s
    per call of warm-up (at least one call each)."""
    keys = list(steps)
    for key in keys:
        steps[key]()  # the first call: loading, compiling
    end = time.perf_counter() + timing.warmup_s * len(keys)
    while time.perf_counter() < end:
        for key in keys:
            steps[key]()
    times = {key: [] for key in keys}
    end, r = time.perf_counter() + timing.time_s * len(keys), 0
    while r < timing.max_iters and (r < timing.min_iters or time.perf_counter() < end):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            steps[key]()
            times[key].append((time.perf_counter() - t0) * 1e3)
        r += 1
    return {key: summarize(t) for key, t in times.items()}


def steps_of(fn, inputs, grad_out) -> dict:
    """{"fwd": the forward without autograd, "fwdbwd": forward and backward} of ``fn(*inputs)``."""

    def forward():
        with torch.no_grad():
            fn(*inputs)

    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward_backward():
        torch.autograd.grad(fn(*leaves), leaves, grad_out)

    return {"fwd": forward, "fwdbwd": forward_backward}


def add_stats(row: dict, key: str, stats: dict) -> None:
    """``stats`` (of :func:`summarize`) into ``row``: ``<key>_ms`` the median, ``<key>_q1_ms``, ...,
    ``<key>_n``."""
    stats = dict(stats)
    row[f"{key}_ms"] = stats.pop("median")
    row.update({f"{key}_{k}" + ("" if k == "n" else "_ms"): v for k, v in stats.items()})


def time_case(fn, inputs, grad_out, device: str, timing: Timing, gpu_memory: bool) -> dict:
    """The forward (without autograd) and the forward+backward of ``fn(*inputs)``: each one's
    median as ``<key>_ms`` and its other statistics as ``<key>_q1_ms``, ... ``<key>_n`` (key fwd
    or fwdbwd); with ``gpu_memory`` on a GPU, also ``peak_extra_mb``."""

    steps = steps_of(fn, inputs, grad_out)
    row = {}
    for key, step in steps.items():
        add_stats(row, key, measure(step, device, timing))
    if device == "cuda" and gpu_memory:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        steps["fwdbwd"]()
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


def cpu_peak_memory(backend: str, shape: str, dtype_name: str, layout: str) -> float | None:
    """MB by which one forward+backward of ``backend`` on the case named ``shape`` (a --shapes entry)
    grows the peak resident set, measured in a fresh process; None, with a line on stderr, when
    that process fails."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # large blocks go back to the OS on free
    cmd = [sys.executable, os.path.abspath(__file__), backend, shape, dtype_name, layout]
    cmd += ["--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"  memory measurement of {backend} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def _memory_child(argv: list[str]) -> int:
    """The process :func:`cpu_peak_memory` starts: prints {"peak_extra_mb": ...} as JSON."""
    import argparse

    import cases  # run as a script, this file's folder comes first on sys.path

    parser = argparse.ArgumentParser(description="the peak-memory child of bench/run.py")
    parser.add_argument("backend")
    parser.add_argument("shape")
    parser.add_argument("dtype", choices=list(cases.DTYPES))
    parser.add_argument("layout")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    case, dtype = cases.parse_shapes(args.shape)[0], cases.DTYPES[args.dtype]

    def forward_backward_once(case):
        inputs, grad_out = case.inputs(dtype, "cpu", args.layout)
        leaves = [t.requires_grad_() for t in inputs]
        fn = cases.make_fn(args.backend, case)
        return lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)

    step = forward_backward_once(case)
    # warm-up on a tiny case: loads the backend (and compiles) without touching the big arrays
    forward_backward_once(case.tiny())()
    base = reset_peak_rss()
    step()
    print(json.dumps({"peak_extra_mb": (read_proc_status("VmHWM") - base) / 2**20}))
    return 0


if __name__ == "__main__":
    sys.exit(_memory_child(sys.argv[1:]))
