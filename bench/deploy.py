"""CPU inference time of SGD-Net per image through each way of deploying it: PyTorch eager on each
CPU backend, ONNX Runtime (CPU provider) on the ONNX model, and the AOTInductor package, each
exported as ``sgdc-export`` exports them (sgdc_kernels.segmentation.export). Prints a markdown
table: median milliseconds per image with the interquartile range (as a % of the median), and the
speedup over PyTorch eager with the `torch` backend.

    python bench/deploy.py                                   # the README's table
    python bench/deploy.py --checkpoint runs/cpu/best.pt --image-size 64 --batch 8

Without ``--checkpoint`` the network is the README's CPU training configuration (resnet10t, dim 32,
depth 2, guidance 8 channels, 7x7 windows, 4 heads) with random weights: the time does not depend on
the weights. The contenders are timed interleaved, in rounds of one sample each in a rotating order
(a sample: the median of a few calls of at least 50 ms in all), for ``--time`` seconds, so that the
load of a shared machine falls on all of them alike. ONNX Runtime runs with as many threads as torch
(``--threads``, default torch's).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sgdc_kernels import available_backends
from sgdc_kernels.segmentation import export
from sgdc_kernels.segmentation.models import SGDNet


def build_model(checkpoint: str | None, backend: str) -> torch.nn.Module:
    """SGD-Net returning (seg, edge), on ``backend``, in eval mode."""
    if checkpoint:
        ckpt = export.read_checkpoint(checkpoint)
        net = export.load_model(argparse.Namespace(checkpoint=checkpoint, channels_last=False), ckpt, backend, "cpu")
    else:
        torch.manual_seed(0)
        net = SGDNet(backbone="resnet10t", dim=32, depth=2, guide_ch=8, num_heads=4, kernel_size=7, backend=backend)
    return export.Logits(net).eval()


def contenders(args) -> dict:
    """name -> a function of the images that runs the model one way."""
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    example = torch.randn(max(2, args.batch), 3, args.image_size, args.image_size)
    flags = argparse.Namespace(static=False)
    out: dict = {}
    for backend in ("torch", "cpu"):
        if backend in available_backends("cpu"):
            model = build_model(args.checkpoint, backend)
            out[f"PyTorch eager, backend {backend!r}"] = model
    tmp = Path(tempfile.mkdtemp(prefix="sgdc-deploy-"))
    try:
        import onnxruntime as ort

        model = build_model(args.checkpoint, "torch")
        export.export_onnx(model, example, flags, tmp / "sgdnet.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(tmp / "sgdnet.onnx"), options, providers=["CPUExecutionProvider"])
        out["ONNX Runtime (CPU provider)"] = lambda x: session.run(None, {"images": x.numpy()})
    except ImportError as exc:
        print(f"# left out: ONNX Runtime ({exc})", file=sys.stderr)
    if "cpu" in available_backends("cpu"):
        model = build_model(args.checkpoint, "cpu")
        export.export_pt2(model, example, flags, tmp / "sgdnet.pt2")
        package = torch._inductor.aoti_load_package(str(tmp / "sgdnet.pt2"))
        out["AOTInductor package (backend 'cpu')"] = package
    else:
        print("# left out: AOTInductor (the compiled CPU operators, backend 'cpu', are not built)", file=sys.stderr)
    return {name: functools.partial(f, images) for name, f in out.items()}


def sample(fn, min_s: float = 0.05) -> float:
    """Seconds per call: the median of calls made until min_s has passed (at least 3)."""
    times = []
    end = time.perf_counter() + min_s
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="an sgdc-train checkpoint (default: the README's CPU network, random weights)")
    p.add_argument("--image-size", type=int, default=256, help="image side, a multiple of 32")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--time", type=float, default=30.0, help="seconds of timing in all")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.image_size % export.STRIDE or args.image_size < export.STRIDE:
        p.error(f"--image-size: expected a multiple of {export.STRIDE}, got {args.image_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        runs = contenders(args)
        for fn in runs.values():  # warm-up: first-call work out of the timings
            fn()
            fn()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        end, r = time.perf_counter() + args.time, 0
        while r < 5 or time.perf_counter() < end:
            for name in names[r % len(names) :] + names[: r % len(names)]:
                samples[name].append(sample(runs[name]) * 1e3 / args.batch)
            r += 1
    print(
        f"SGD-Net, {args.image_size}x{args.image_size} images, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"{r} interleaved rounds; torch {torch.__version__}"
    )
    print("\n| path | ms per image (median) | IQR | vs PyTorch eager `torch` |\n| --- | ---: | ---: | ---: |")
    base = statistics.median(samples[names[0]])
    for name in names:
        q1, med, q3 = statistics.quantiles(samples[name], n=4, method="inclusive")
        print(f"| {name} | {med:.2f} | {100 * (q3 - q1) / med:.0f}% | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
