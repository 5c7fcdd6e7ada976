"""The command line that exports a trained SGD-Net for deployment, ``sgdc-export`` (the same as
``python -m sgdc_kernels.segmentation.export``):

    sgdc-export --checkpoint runs/cpu/best.pt --format onnx --out sgdnet.onnx
    sgdc-export --checkpoint runs/cpu/best.pt --format pt2 --out sgdnet.pt2

``--format onnx`` writes an ONNX model of standard operators (opset 18; ``torch.onnx.export`` with
``dynamo=True``), which ONNX Runtime runs without PyTorch: the SGDC blocks become the `torch`
backend's shift-and-accumulate formulation. ``--format pt2`` writes an AOTInductor package
(``torch.export`` and ``torch._inductor.aoti_compile_and_package``): the network compiled to C++
(and CUDA with ``--device cuda``) that keeps this package's compiled operators (backend `cpu` on a
CPU, `cuda` on a GPU) as calls; it runs with ``torch._inductor.aoti_load_package`` after ``import
sgdc_kernels``, or from C++ with the operator library loaded (examples/aoti_cpp/).

The model takes a batch of normalized RGB images, (B, 3, H, W) float32, and returns the
segmentation and edge logits, each (B, 1, H, W). Batch, height and width are dynamic by default
(height and width multiples of 32, the backbone's stride; ``--static`` fixes them to the example
input's). The example input is ``--batch-size`` images of ``--image-size`` squared (default: the
checkpoint's training size).

Before it reports success, the command runs the exported model on random batches (the example's
shape, and with dynamic axes another batch and image size) against PyTorch, prints the largest
difference, and fails (exit status 1) where it exceeds ``--tolerance``. A mistake in the flags, a
missing checkpoint or one of another model, an output path that cannot be written, or an input
size the model cannot take stops with one line naming the flag (exit status 2) before exporting.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..registry import BACKEND_NAMES
from .loop import UsageError
from .predict import load_model, read_checkpoint
from .train import _bounded, _one_line, _Parser, backend_used, resolve_device

PROG = "sgdc-export"
FORMATS = ("onnx", "pt2")
STRIDE = 32  # the backbone's output stride: the exported model takes multiples of it
OPSET = 18
COMPILED = ("cpu", "cuda")  # the backends whose operators are C++, which a pt2 package can call


class Logits(nn.Module):
    """SGD-Net returning (segmentation logits, edge logits): exporters take tensors, not the
    output record."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(images)
        return out.seg, out.edge


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Export a trained SGD-Net to ONNX or to an AOTInductor package, and check the exported model "
        "against PyTorch (also: python -m sgdc_kernels.segmentation.export).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="sgdc-train's best.pt or last.pt")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx: ONNX Runtime; pt2: AOTInductor package")
    p.add_argument("--out", required=True, help="the file to write (e.g. sgdnet.onnx, sgdnet.pt2)")
    p.add_argument(
        "--image-size", type=_bounded(int, STRIDE), default=None,
        help=f"side of the example input, a multiple of {STRIDE} (default: the checkpoint's training size)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=_bounded(int, 2), default=2, help="images in the example input (2 or more)")
    p.add_argument("--static", action="store_true", help="fix batch, height and width to the example input's")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the pt2 package runs")
    p.add_argument(
        "--backend", default="auto", choices=("auto", *BACKEND_NAMES),
        help="pt2: the operators the package calls ('auto': the compiled kernels of --device); onnx: unused",
    )  # fmt: skip
    p.add_argument(
        "--tolerance", type=_bounded(float, 0.0, low_open=True), default=1e-3,
        help="largest difference from PyTorch accepted by the check",
    )  # fmt: skip
    p.set_defaults(amp="none")  # the exported model computes in float32
    return p


def check_out(out: str) -> Path:
    """--out names a file that can be written: not a folder, in a folder that exists and takes a
    new file (checked with a probe, removed at once)."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name (e.g. sgdnet.{FORMATS[0]})")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: its folder {folder} does not exist")
    probe = folder / f".{PROG}-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or _one_line(exc)})") from None
    return path


def _backend(args: argparse.Namespace, device: torch.device) -> str:
    """The sgdc_conv backend the model is built with: for pt2 one with compiled operators."""
    backend = backend_used(args, device)
    if args.format == "pt2" and backend not in COMPILED:
        why = ""
        if args.backend == "auto":
            from .. import registry

            name = device.type if device.type in COMPILED else "cuda"
            reason = registry.unavailable_reason(name) if name in registry.BACKEND_NAMES else None
            why = f" ({reason})" if reason else ""
        raise UsageError(
            f"--backend {args.backend}: --format pt2 calls the compiled operators of backend "
            f"{' or '.join(map(repr, COMPILED))}, but {backend!r} runs here{why}; --format onnx needs none"
        )
    return backend


def prepare(args: argparse.Namespace) -> dict:
    """Every check, in the order of their cost; what the export needs."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU here (use --device cpu)")
    if args.format == "onnx" and args.device == "cuda":
        raise UsageError("--device cuda: an ONNX model is device-neutral; export it with --device cpu")
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if args.format == "onnx" and missing:
        raise UsageError(f"--format onnx: needs {', '.join(missing)} (pip install {' '.join(missing)})")
    ckpt = read_checkpoint(args.checkpoint)
    if args.image_size is None:
        recorded = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        args.image_size = recorded.get("image_size", 256)
    if args.image_size % STRIDE:
        raise UsageError(
            f"--image-size {args.image_size}: the model takes sides that are multiples of {STRIDE} "
            f"(e.g. {max(STRIDE, args.image_size // STRIDE * STRIDE)})"
        )
    out = check_out(args.out)
    device = resolve_device(args.device)
    backend = _backend(args, device)
    model_args = argparse.Namespace(checkpoint=args.checkpoint, channels_last=False)
    model = Logits(load_model(model_args, ckpt, backend, device)).eval()
    return dict(model=model, out=out, device=device, backend=backend)


def _dynamic_shapes(args: argparse.Namespace):
    if args.static:
        return None
    batch = torch.export.Dim("batch", min=1, max=1024)
    h, w = torch.export.Dim("h", min=1, max=256), torch.export.Dim("w", min=1, max=256)
    return ({0: batch, 2: STRIDE * h, 3: STRIDE * w},)


@contextlib.contextmanager
def _quiet():
    """The exporters' progress prints, kept for an error message."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def export_onnx(model: nn.Module, example: torch.Tensor, args: argparse.Namespace, out: Path):
    """Write the ONNX model; returns a function that runs it with ONNX Runtime."""
    import onnxruntime as ort

    with _quiet():
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=_dynamic_shapes(args), opset_version=OPSET,
            input_names=["images"], output_names=["seg", "edge"],
        )  # fmt: skip
        program.save(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor):
        return [torch.from_numpy(a) for a in session.run(None, {"images": images.numpy()})]

    return run


def export_pt2(model: nn.Module, example: torch.Tensor, args: argparse.Namespace, out: Path):
    """Write the AOTInductor package; returns a function that runs it (loaded back from the file)."""
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(args))
    with _quiet():
        torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    compiled = torch._inductor.aoti_load_package(str(out))
    return lambda images: list(compiled(images))


def check(run, model: nn.Module, example: torch.Tensor, args: argparse.Namespace) -> float:
    """The largest difference between the exported model and PyTorch, over the example's shape
    and, with dynamic axes, another batch and size."""
    B, _, S, _ = example.shape
    shapes = [(B, S, S)] if args.static else [(B, S, S), (B + 1, S + STRIDE, S)]
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for b, h, w in shapes:
        images = torch.randn(b, 3, h, w, generator=gen).to(example.device)
        with torch.no_grad():
            want = model(images)
        got = run(images)
        for g, r in zip(got, want):
            if g.shape != r.shape:
                raise RuntimeError(
                    f"input {(b, 3, h, w)}: the exported model gave {tuple(g.shape)}, not {tuple(r.shape)}"
                )
            worst = max(worst, (g.to(r.device).float() - r.float()).abs().max().item())
        print(f"  input {(b, 3, h, w)}: largest difference from PyTorch so far {worst:.2e}", flush=True)
    return worst


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0; 1 where the check fails). A mistake in the arguments
    exits with status 2 and one line naming the flag, before anything is exported."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prepared = prepare(args)
    except UsageError as exc:
        parser.error(str(exc))
    model, out, device = prepared["model"], prepared["out"], prepared["device"]
    example = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    axes = "static shapes" if args.static else f"dynamic batch, height and width (multiples of {STRIDE})"
    print(
        f"{PROG}: exporting {args.checkpoint} to {args.format} ({out}), example input {tuple(example.shape)}, {axes}"
        + (f", operators of backend {prepared['backend']!r} on {device}" if args.format == "pt2" else ""),
        flush=True,
    )
    start = time.perf_counter()
    exporter = export_onnx if args.format == "onnx" else export_pt2
    run = exporter(model, example, args, out)
    print(f"  written in {time.perf_counter() - start:.1f} s ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)
    worst = check(run, model, example, args)
    if worst > args.tolerance:
        print(f"{PROG}: error: the exported model differs from PyTorch by {worst:.2e} > --tolerance {args.tolerance}")
        return 1
    print(f"{PROG}: {out} matches PyTorch (largest difference {worst:.2e} <= {args.tolerance})", flush=True)
    return 0


def cli() -> None:
    """Console-script entry point (``sgdc-export``)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
