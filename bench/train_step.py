"""Time a full SGD-Net training step (forward, backward, AdamW step) per sgdc_conv backend.

    python bench/train_step.py                      # GPU if present: 512x512, batch 8, resnet50, dim 256, depth 4
    python bench/train_step.py --device cpu         # small CPU configuration (128x128, batch 2), about a minute
    python bench/train_step.py --out bench/results/train_step_h100.json --backends unfold,torch,triton,cuda

For each backend: the median step time after warm-up (CUDA events on GPU), images/s, the peak of
torch.cuda.max_memory_allocated during the timed steps (GPU only), and both relative to `unfold`,
the paper's formulation. A backend that runs out of memory is reported as "oom", not fatal.

From Python: ``run(device="cpu") -> list[dict]`` (one row per backend).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

CONFIGS = {
    # The paper's shape: stride-4 features of a 512x512 batch of 8 are B=8, C=256, 128x128.
    "cuda": dict(image_size=512, batch_size=8, backbone="resnet50", dim=256, depth=4, warmup=5, iters=20),
    "cpu": dict(image_size=128, batch_size=2, backbone="resnet18", dim=64, depth=2, warmup=2, iters=10),
}


def _batch(batch_size: int, image_size: int, device: torch.device):
    from sgdc_kernels.segmentation.data import SyntheticLesions

    ds = SyntheticLesions(batch_size, image_size, seed=0)
    images, masks = (torch.stack(t).to(device) for t in zip(*[ds[i] for i in range(batch_size)]))
    return images, masks


@functools.cache
def _bench_timing():
    """bench/timing.py, the benchmark's timer (CUDA events on GPU, perf_counter on CPU, median
    after warm-up) and peak-RSS helpers, loaded by its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sgdc_bench_timing", Path(__file__).with_name("timing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _return_large_blocks_to_the_os() -> None:
    """glibc keeps freed large blocks for reuse once its mmap threshold adapts, which would hide a
    later backend's peak behind an earlier one's: fix the threshold (mallopt M_MMAP_THRESHOLD)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    except (OSError, AttributeError):
        pass


def _bench_backend(
    backend: str, cfg: dict, device: torch.device, amp: str, channels_last: bool, images, masks, phase: str = "time"
) -> dict:
    """phase "time": median step time (and, on a GPU, peak memory); phase "cpu_memory": the growth
    of the peak resident set over one step, after a warm-up step."""
    from sgdc_kernels.segmentation.loop import build_optimizer, make_scaler, train_step
    from sgdc_kernels.segmentation.losses import SegEdgeLoss
    from sgdc_kernels.segmentation.models import SGDNet

    row = dict(backend=backend, device=str(device), amp=amp, channels_last=channels_last,
               **{k: cfg[k] for k in ("image_size", "batch_size", "backbone", "dim", "depth")})  # fmt: skip
    torch.manual_seed(0)
    model = optimizer = None
    try:
        model = SGDNet(backbone=cfg["backbone"], dim=cfg["dim"], depth=cfg["depth"], backend=backend).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        model.train()
        optimizer = build_optimizer(model, 1e-4, 1e-4)
        scaler, loss_fn = make_scaler(device, amp), SegEdgeLoss()
        step = lambda: train_step(model, images, masks, loss_fn, optimizer, scaler, amp)  # noqa: E731
        bench = _bench_timing()
        step()  # the first step allocates the optimizer state
        if phase == "cpu_memory":
            base = bench.reset_peak_rss()
            step()
            row.update(status="ok", peak_mem_gb=(bench.read_proc_status("VmHWM") - base) / 1e9)
            return row
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        ms = bench.median_ms(step, device.type, cfg["warmup"], cfg["iters"], float("inf"))
        row.update(status="ok", ms_per_step=ms, images_per_s=cfg["batch_size"] * 1e3 / ms, iters=cfg["iters"])
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except torch.OutOfMemoryError as exc:
        row.update(status="oom", error=str(exc).splitlines()[0])
    except Exception as exc:  # report, keep benchmarking the other backends
        row.update(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        model = optimizer = None  # free them before the next backend
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run(
    device: str | None = None,
    backends: Sequence[str] | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    backbone: str | None = None,
    dim: int | None = None,
    depth: int | None = None,
    amp: str = "none",
    channels_last: bool = False,
    warmup: int | None = None,
    iters: int | None = None,
) -> list[dict]:
    """One row per backend: ms_per_step (median), images_per_s, peak_mem_gb, speedup and
    memory_ratio against unfold (unfold's time or peak over this backend's), status ok/oom/error.

    peak_mem_gb: on a GPU, torch.cuda.max_memory_allocated over the timed steps (model, optimizer
    state and activations); on the CPU, the growth of the peak resident set over one step
    (activations and temporaries; the model and optimizer state were allocated before)."""
    from sgdc_kernels import available_backends

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cfg = dict(CONFIGS["cuda" if dev.type == "cuda" else "cpu"])
    overrides = dict(image_size=image_size, batch_size=batch_size, backbone=backbone, dim=dim, depth=depth,
                     warmup=warmup, iters=iters)  # fmt: skip
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if backends is None:
        # Triton on a CPU would run in its (very slow) interpreter: only when asked for.
        backends = [b for b in available_backends(dev.type) if dev.type == "cuda" or b != "triton"]
    backends = ["unfold"] + [b for b in backends if b != "unfold"]
    images, masks = _batch(cfg["batch_size"], cfg["image_size"], dev)
    rows = [_bench_backend(b, cfg, dev, amp, channels_last, images, masks) for b in backends]
    if dev.type == "cpu":  # memory after all the timings: the allocator setting below slows steps
        _return_large_blocks_to_the_os()
        for row in rows:
            if row["status"] == "ok":
                mem = _bench_backend(row["backend"], cfg, dev, amp, channels_last, images, masks, "cpu_memory")
                if "peak_mem_gb" in mem:
                    row["peak_mem_gb"] = mem["peak_mem_gb"]
    base = rows[0]
    for row in rows:
        if row["status"] == "ok" and base["status"] == "ok":
            row["speedup_vs_unfold"] = base["ms_per_step"] / row["ms_per_step"]
            if row.get("peak_mem_gb") and base.get("peak_mem_gb"):  # a tiny CPU case may grow by 0
                row["memory_ratio_vs_unfold"] = base["peak_mem_gb"] / row["peak_mem_gb"]
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        return fmt.format(row[key]) if key in row else "-"

    head = f"{'backend':<8} {'status':<6} {'ms/step':>9} {'img/s':>8} {'peak GB':>8} {'speedup':>8} {'mem ratio':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['backend']:<8} {r['status']:<6} {cell(r, 'ms_per_step', '{:9.1f}'):>9} "
            f"{cell(r, 'images_per_s', '{:8.2f}'):>8} {cell(r, 'peak_mem_gb', '{:8.2f}'):>8} "
            f"{cell(r, 'speedup_vs_unfold', '{:7.2f}x'):>8} {cell(r, 'memory_ratio_vs_unfold', '{:8.2f}x'):>9}"
        )
    return "\n".join(lines)


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--backends", default=None, help="comma-separated (default: all available; unfold always runs)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    a = p.parse_args(argv)
    try:
        import sgdc_kernels.segmentation  # noqa: F401  (SGD-Net needs the 'train' extra)
    except ImportError as exc:
        p.error(str(exc))
    backends = a.backends.split(",") if a.backends else None
    rows = run(a.device, backends, a.image_size, a.batch_size, a.backbone, a.dim, a.depth, a.amp,
               a.channels_last, a.warmup, a.iters)  # fmt: skip
    first = rows[0]
    print(
        f"SGD-Net training step, {first['backbone']} dim={first['dim']} depth={first['depth']}, "
        f"{first['batch_size']}x3x{first['image_size']}x{first['image_size']}, amp={a.amp}, on {first['device']}"
    )
    print(format_table(rows))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['backend']}: {r['status']}: {r.get('error', '')}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"environment": environment(first["device"]), "rows": rows}, indent=2) + "\n")
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
