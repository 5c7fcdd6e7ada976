#!/usr/bin/env python
"""Benchmark every available sgdc_conv backend against the paper's unfold path.

    python bench/run.py                      # all backends, default shapes for this machine
    python bench/run.py --device cuda --dtypes float32,bfloat16 --out bench/out/h100.json
    python bench/run.py --backends torch,unfold --shapes 2x64x64x64x4x7 --no-memory --threads 1
    python bench/run.py --backends unfold,cuda@all      # every kernel variant of the cuda backend
    python bench/run.py --shapes overlock               # NATTEN's na2d_av at OverLoCK's shapes
    python bench/run.py --shapes dinat                  # na2d_qk + softmax + na2d_av at DiNAT-Mini's
    python bench/run.py --plot bench/out/results.png    # and a figure of the results (needs matplotlib)
    python bench/run.py --interleave --time 3 --layouts nchw,channels_last --dtypes float32,bfloat16  # CPU

For each case (shape, dtype, backend) it reports the median time of the forward and of
forward+backward with their spread, the speedup over `unfold`, the peak memory beyond the inputs
during forward+backward and the percentage of the memory roofline (docs/performance.md) with the
copy bandwidth measured in the same run (1 GiB on a GPU, 512 MB on the CPU, at the run's thread
count). It also times the strongest peer a user has without this package: torch.compile of the
shift-and-accumulate formulation (row `torch.compile(shift)`). Without --backends it times every backend that runs on
the device and prints, one line each, those it leaves out and why.

A shape is BxCxHxWxGxK (an sgdc_conv call) or the name of an na2d_av call of OverLoCK's
dynamic (ContMix) blocks, e.g. overlock-t-s3-k13 (model overlock_t, stage 3, kernel 13; at a
512x512 input, batch 8; `overlock` names all of them): those rows time sgdc_kernels.compat.na2d_av,
NATTEN's layout and clamped windows, through each backend, beside `unfold` (the F.unfold +
replicate-pad formulation) and, on a GPU, its torch.compile (row `torch.compile(unfold)`). Or the
name of a stage of DiNAT-Mini at a 224x224 input, batch 8, e.g. dinat-mini-s1 (`dinat` names all
four): those rows time a DiNAT layer's neighborhood attention, na2d_qk with its relative
positional bias, softmax and na2d_av, likewise beside `unfold` (F.unfold with NATTEN's windows)
and, on a GPU, its torch.compile.

A backend may be followed by a kernel variant, `name@variant`, or by `@all` for one row per
variant; the row calls the operator with backend="name@variant". A variant that runs only sgdc_conv's
configuration is not timed on na2d_av's (clamped windows, raw weights): its row says `skipped`
and why, in the table and in the JSON.

Times: CUDA events on a GPU, perf_counter on the CPU. Each measurement warms up for --warmup-time
seconds, then repeats for --time seconds (at least --min-iters times); with --interleave (CPU), the
rows of a case are timed together instead, one call of each per round in a rotating order, so that
a busy spell of a shared machine slows every row alike and the ratios between rows hold; the table shows the median
and the interquartile range as a percentage of it, the JSON also the quartiles, min and max, and a
warning names every row whose spread is large (a busy machine: rerun, or pin --threads).
Memory: on a GPU, torch.cuda.max_memory_allocated; on the CPU, the peak resident set of a fresh
subprocess per case. The cases are in bench/cases.py, the measurements in bench/timing.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# OpenMP threads that spin between parallel regions (the default) turn any other busy process
# into huge, random delays for backends made of many small ops (`torch` runs a few per tap, K*K
# taps): measured on a shared 2-core machine, its forward took 23 to 660 ms from run to run with
# spinning threads, 20 to 27 ms with sleeping ones. Set before torch loads the OpenMP runtime; the
# CPU memory subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bench/ is a folder of scripts, not a package: its modules import each other by their plain
# names. Run as a script, this file's folder comes first on sys.path; loaded by its path (as
# tests/test_bench.py does), it puts the folder there itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import cases  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402

import sgdc_kernels  # noqa: E402
from sgdc_kernels import available_backends, registry  # noqa: E402

GPU_SHAPES = ["8x256x128x128x4x7", "8x256x64x64x4x7", "8x64x128x128x4x13"]
CPU_SHAPES = ["2x64x64x64x4x7", "1x32x96x96x4x5"]
SPREAD_WARN = 0.10  # interquartile range over median above which a row is flagged


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


class Table:
    """Rows printed once, as they are measured, in columns sized up front (the label columns from
    the cases to come, the numbers to a fixed width)."""

    def __init__(self, rows_to_come, backends):
        self.columns = [  # (header, width, row -> text)
            (
                "shape BxCxHxWxGxK" if all(c[0].op == "sgdc_conv" for c in rows_to_come) else "shape",
                max(len(c[0].label) for c in rows_to_come),
                lambda r: r["shape"],
            ),
            ("dtype", max(len(c[1]) for c in rows_to_come), lambda r: r["dtype"]),
            ("layout", max(len(c[2]) for c in rows_to_come), lambda r: r["layout"]),
            ("backend", max(len(b) for b in backends), lambda r: r["backend"]),
        ]
        for key, title in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            self.columns += [
                (f"{title} ms", 10, lambda r, k=key: _num(r.get(f"{k}_ms"), ".3f")),
                (
                    "iqr %",
                    5,
                    lambda r, k=key: _num(100 * timing.spread(_stats(r, k)) if f"{k}_ms" in r else None, ".0f"),
                ),
                ("x unfold", 8, lambda r, k=key: _num(r.get(f"{k}_speedup"), ".1f")),
            ]
        self.columns.append(("peak extra MB", 13, lambda r: _num(r.get("peak_extra_mb"), ".1f")))
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
        for outcome in ("skipped", "error"):
            if outcome in row:
                return "  ".join(labels + [f"{outcome}: {row[outcome]}"])
        cells = [get(row).rjust(w) for (_, _, get), w in zip(self.columns[4:], self.widths[4:])]
        return "  ".join(labels + cells).rstrip()


def _num(v, fmt) -> str:
    return "-" if v is None else format(v, fmt)


def _stats(row: dict, key: str) -> dict:
    return {"median": row[f"{key}_ms"], "q1": row[f"{key}_q1_ms"], "q3": row[f"{key}_q3_ms"]}


def warn_noisy(rows: list[dict]) -> None:
    """One warning on stderr naming every timed measurement whose spread exceeds SPREAD_WARN."""
    noisy = [
        f"  {r['shape']} {r['dtype']} {r['layout']} {r['backend']} {k.replace('fwdbwd', 'fwd+bwd')}: "
        f"{100 * timing.spread(_stats(r, k)):.0f}%"
        for r in rows if "fwd_ms" in r for k in ("fwd", "fwdbwd") if timing.spread(_stats(r, k)) > SPREAD_WARN
    ]  # fmt: skip
    if noisy:
        print(f"\nwarning: the interquartile range exceeds {100 * SPREAD_WARN:.0f}% of the median in {len(noisy)} "
              "measurements; the machine was probably busy and these times are not trustworthy (rerun on a quiet "
              "machine, with a longer --time, or with fewer --threads):\n" + "\n".join(noisy),
              file=sys.stderr, flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    peer, unfold_peer = cases.PEER, cases.UNFOLD_PEER
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--backends", help="comma-separated backends, each optionally name@variant or name@all "
                        f"(default: all available, plus the compiled peer); '{peer}' names the compiled "
                        f"shift-and-accumulate peer (sgdc_conv shapes only), '{unfold_peer}' the compiled unfold "
                        "formulation")  # fmt: skip
    parser.add_argument(
        "--dtypes",
        help="comma-separated: float32,float16,bfloat16,float64 (default GPU: float32,bfloat16; CPU: float32)",
    )
    parser.add_argument("--shapes", help="comma-separated BxCxHxWxGxK of sgdc_conv, or names of OverLoCK's na2d_av "
                        f"calls: {', '.join(cases.OVERLOCK_SHAPES)}, or 'overlock' for all of them, or of DiNAT-Mini's "
                        f"attention (na2d_qk + softmax + na2d_av): {', '.join(cases.DINAT_SHAPES)}, or 'dinat' for "
                        "all four stages (default depends on the device)")  # fmt: skip
    parser.add_argument(
        "--layouts",
        default="nchw",
        help="comma-separated: nchw,channels_last (default nchw); OverLoCK's and DiNAT's shapes use NATTEN's layout",
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
    parser.add_argument("--interleave", action="store_true",
                        help="CPU: time the rows of a case together, one call of each per round in a rotating "
                        "order (ratios that hold on a busy machine)")  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-peer", action="store_true",
                        help=f"skip the compiled peer of the default backends ({peer} for sgdc_conv shapes, "
                        f"{unfold_peer} for OverLoCK's and DiNAT's)")  # fmt: skip
    parser.add_argument(
        "--out", default="bench/out/results.json", help="JSON output path (default bench/out/results.json)"
    )
    parser.add_argument("--plot", metavar="PATH",
                        help="also draw the results to this image (.png, .svg, .pdf): time per backend, speedup over "
                        "unfold, %% of roofline where measured (bench/plot.py; needs matplotlib)")  # fmt: skip
    parser.add_argument("--train-step", action="store_true",
                        help="then time a full SGD-Net training step per backend (bench/train_step.py, needs "
                        "the 'train' extra); its JSON goes beside --out as *_train_step.json")  # fmt: skip
    return parser


def why_not_on(name: str, device: str) -> str | None:
    """Why backend ``name`` is not timed on ``device`` (the registry's reason where it does not
    load); None where it is."""
    reason = sgdc_kernels.unavailable_reason(name)
    if reason:
        return reason
    if name not in available_backends(device):
        return f"it does not run on {device} tensors"
    if name == "triton" and device != "cuda":
        return "on the CPU it runs only in Triton's interpreter, too slow to time"
    return None


def default_backends(device: str) -> tuple[list[str], dict[str, str]]:
    """The backends timed without --backends, and {name: why} for those left out."""
    reasons = {name: why_not_on(name, device) for name in registry.BACKEND_NAMES}
    return [n for n, why in reasons.items() if why is None], {n: why for n, why in reasons.items() if why}


def check_backends(text: str, device: str) -> list[str]:
    """The --backends list, variants expanded; raises ValueError with one line on a bad entry."""
    specs = []
    for spec in text.split(","):
        if spec in cases.PEERS:
            specs.append(spec)
            continue
        name = spec.partition("@")[0]
        try:
            registry.parse_backend(name)  # an unknown name first, before asking whether it is available
            why = why_not_on(name, device)
            if why:
                raise ValueError(f"{name!r} is not available on {device}: {why}")
            specs += registry.expand_variants(spec)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("backend: ")) from None
    return specs


def parse_args(argv) -> argparse.Namespace:
    """The arguments, checked, with what they imply: device (cpu or cuda), limits (a timing.Timing),
    cases, dtype_names, layout_names, backend_list and left_out ({name: why}, without --backends)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot:
        import plot

        missing = plot.matplotlib_missing()
        if missing:  # one line, before anything is measured
            print(f"{parser.prog}: error: --plot {args.plot}: {missing}", file=sys.stderr)
            sys.exit(2)
    for name in ("warmup_time", "time", "min_iters", "threads"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name in ("min_iters", "threads"))):
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.interleave and args.device == "cuda":
        parser.error("--interleave: CPU only (a GPU times each row with CUDA events)")
    gpu = args.device == "cuda"
    args.limits = timing.Timing(
        args.warmup_time if args.warmup_time is not None else (0.2 if gpu else 0.5),
        args.time if args.time is not None else (0.5 if gpu else 1.5),
        args.min_iters or (20 if gpu else 5),
    )
    try:
        args.cases = cases.parse_shapes(args.shapes or ",".join(GPU_SHAPES if gpu else CPU_SHAPES))
    except ValueError as exc:
        parser.error(f"--shapes: {exc}")
    args.dtype_names = args.dtypes.split(",") if args.dtypes else (["float32", "bfloat16"] if gpu else ["float32"])
    for name in args.dtype_names:
        if name not in cases.DTYPES:
            parser.error(f"--dtypes: unknown dtype {name!r}; expected some of {', '.join(cases.DTYPES)}")
    args.layout_names = args.layouts.split(",")
    for name in args.layout_names:
        if name not in cases.LAYOUTS:
            parser.error(f"--layouts: unknown layout {name!r}; expected some of {', '.join(cases.LAYOUTS)}")
    args.left_out = {}
    if args.backends:
        try:
            args.backend_list = check_backends(args.backends, args.device)
        except ValueError as exc:
            parser.error(f"--backends: {exc}")
    else:
        args.backend_list, args.left_out = default_backends(args.device)
        if not args.no_peer:
            args.backend_list += list(dict.fromkeys(c.default_peer for c in args.cases))
    if "unfold" in args.backend_list:  # the baseline first
        args.backend_list = ["unfold"] + [b for b in args.backend_list if b != "unfold"]
    return args


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def machine_meta(args) -> dict:
    """What the JSON's "meta" records: versions, the machine, threads, timing, the command."""
    gpu = args.device == "cuda"
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    meta = {
        "sgdc_kernels": sgdc_kernels.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if gpu else cpu,
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "timing": {"warmup_s": args.limits.warmup_s, "time_s": args.limits.time_s, "min_iters": args.limits.min_iters},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "left_out": args.left_out,
    }
    meta["copy_bandwidth_GBps"] = timing.copy_bandwidth(args.device) / 1e9
    return meta


def print_preamble(meta: dict, args) -> None:
    """The machine line, the backends left out (one line each) and what each na2d_av case calls."""
    header = f"# {meta['device']}, torch {meta['torch']}, sgdc-kernels {meta['sgdc_kernels']}, "
    header += f"{meta['threads']} threads (OMP_WAIT_POLICY={meta['OMP_WAIT_POLICY']})"
    if "copy_bandwidth_GBps" in meta:
        header += f", copy bandwidth {meta['copy_bandwidth_GBps']:.1f} GB/s"
    print(header, flush=True)
    for name, why in args.left_out.items():
        print(f"# left out: {name} ({why})")
    for case in args.cases:
        if hasattr(case, "describe"):
            print(f"# {case.describe()}")


def prepare_row(backend: str, case, dtype_name: str, layout: str, args) -> tuple[dict, tuple | None]:
    """A row's labels and, where it is timed, (fn, inputs, grad_out); else the row says why not
    (``skipped``, or the ``error`` that building its inputs raised)."""
    dtype = cases.DTYPES[dtype_name]
    row = {"shape": case.label, "op": case.op, "dtype": dtype_name, "layout": layout, "backend": backend}
    if "@" in backend:
        row["variant"] = backend.partition("@")[2]
    try:
        skipped = cases.skip_reason(backend, case, args.device, dtype)
        if skipped:
            row["skipped"] = skipped
            return row, None
        inputs, grad_out = case.inputs(dtype, args.device, layout)
        return row, (cases.make_fn(backend, case), inputs, grad_out)
    except (RuntimeError, TypeError, ValueError) as exc:
        row["error"] = str(exc).splitlines()[0][:120]
        return row, None


def _failed(row: dict, exc: Exception, gpu: bool) -> None:
    row["error"] = str(exc).splitlines()[0][:120]  # OOM, unsupported dtype, ...
    if gpu:
        torch.cuda.empty_cache()


def add_memory(row: dict, case, args) -> None:
    """On the CPU, the peak memory of the row's forward+backward (a subprocess)."""
    if args.device != "cuda" and not args.no_memory and "fwd_ms" in row:
        row["peak_extra_mb"] = timing.cpu_peak_memory(row["backend"], case.label, row["dtype"], row["layout"])


def run_row(backend: str, case, dtype_name: str, layout: str, args) -> dict:
    """One row: the times (or why the row is skipped, or the error it raised) and, on the CPU,
    the peak memory."""
    row, work = prepare_row(backend, case, dtype_name, layout, args)
    if work is not None:
        try:
            row.update(timing.time_case(*work, args.device, args.limits, not args.no_memory))
            add_memory(row, case, args)
        except (RuntimeError, TypeError, ValueError) as exc:
            _failed(row, exc, args.device == "cuda")
    return row


def run_interleaved(backends: list[str], case, dtype_name: str, layout: str, args) -> list[dict]:
    """The rows of one case, timed together (--interleave): their forward and forward+backward
    calls in rotating rounds. A row whose first call raises is left out of the rounds with its
    error."""
    rows, steps = [], {}
    for backend in backends:
        row, work = prepare_row(backend, case, dtype_name, layout, args)
        rows.append(row)
        if work is None:
            continue
        try:
            for key, step in timing.steps_of(*work).items():
                step()  # the first call (compiling) here, so that a failure leaves the rounds alone
                steps[(len(rows) - 1, key)] = step
        except (RuntimeError, TypeError, ValueError) as exc:
            _failed(row, exc, False)
            steps = {k: v for k, v in steps.items() if k[0] != len(rows) - 1}
    for (i, key), stats in timing.interleaved(steps, args.limits).items():
        timing.add_stats(rows[i], key, stats)
    for row in rows:
        add_memory(row, case, args)
    return rows


def add_ratios(row: dict, base: dict | None, case, meta: dict) -> None:
    """The speedups over the unfold row ``base`` and the roofline percentages."""
    if "fwd_ms" not in row:
        return
    if base is not None:
        row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"]
        row["fwdbwd_speedup"] = base["fwdbwd_ms"] / row["fwdbwd_ms"]
    if "copy_bandwidth_GBps" in meta:
        fwd_bytes, fwdbwd_bytes = case.roofline_bytes(cases.DTYPES[row["dtype"]])
        bw = meta["copy_bandwidth_GBps"] * 1e9
        row["fwd_roofline_ms"] = fwd_bytes / bw * 1e3
        row["fwdbwd_roofline_ms"] = fwdbwd_bytes / bw * 1e3
        row["fwd_roofline_pct"] = 100 * row["fwd_roofline_ms"] / row["fwd_ms"]
        row["fwdbwd_roofline_pct"] = 100 * row["fwdbwd_roofline_ms"] / row["fwdbwd_ms"]


def run_all(args, meta: dict) -> list[dict]:
    """Every row, each printed as soon as it is measured."""
    todo = [(c, d, layout) for c in args.cases for d in args.dtype_names for layout in c.layouts(args.layout_names)]
    table = Table(todo, args.backend_list)
    print(table.header(), flush=True)
    rows = []
    for case, dtype_name, layout in todo:
        # a compiled peer chosen by default runs for the cases it is the peer of; named ones for all
        case_backends = [
            b for b in args.backend_list if args.backends or b not in cases.PEERS or b == case.default_peer
        ]
        if any(b in cases.PEERS for b in case_backends):
            torch._dynamo.reset()  # fresh compile caches: one compile per case, never the recompile limit
        base = None
        if args.interleave:
            case_rows = run_interleaved(case_backends, case, dtype_name, layout, args)
        else:
            case_rows = (run_row(backend, case, dtype_name, layout, args) for backend in case_backends)
        for row in case_rows:
            if row["backend"] == "unfold" and "fwd_ms" in row:
                base = row
            add_ratios(row, base, case, meta)
            rows.append(row)
            print(table.line(row), flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = machine_meta(args)
    print_preamble(meta, args)
    rows = run_all(args, meta)
    warn_noisy(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"\nwrote {args.out}")
    if args.plot:
        import plot

        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot.plot_results(rows, meta, args.plot)
        print(f"wrote {args.plot}")
    if args.train_step:
        out = os.path.splitext(args.out)[0] + "_train_step.json"
        script = os.path.join(_HERE, "train_step.py")
        print(f"\n# SGD-Net training step ({script})", flush=True)
        return subprocess.run([sys.executable, script, "--device", args.device, "--out", out]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
