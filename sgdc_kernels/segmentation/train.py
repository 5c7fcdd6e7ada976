"""The command line that trains SGD-Net on skin-lesion segmentation, ``sgdc-train`` (the same as
``python -m sgdc_kernels.segmentation.train``): its flags, the checks of their values, ``main`` and
the console-script entry point. The training itself is in ``loop.py``, the checkpoints in
``checkpoints.py``.

Single process:   sgdc-train --data synthetic --epochs 20 --out runs/syn
Several GPUs:     torchrun --nproc_per_node 4 -m sgdc_kernels.segmentation.train --data /data/ISIC2018 --out runs/isic
CPU, 2 processes: torchrun --nproc_per_node 2 -m sgdc_kernels.segmentation.train ...   (gloo)

After each epoch, validation IoU, Dice and HD95 (per-image means, see
sgdc_kernels.segmentation.metrics) are appended to ``<out>/metrics.json``, drawn with the losses to
``<out>/curves.png`` (where matplotlib is installed) and ``<out>/last.pt`` is written (model,
optimizer, scheduler, grad scaler, epoch, RNG states, metrics history); re-running the command
continues from it (``--resume auto``, the default). ``<out>/best.pt`` holds the weights of the best
epoch only, for inference (``sgdc-predict``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .. import BackendUnavailableError
from ..registry import BACKEND_NAMES, resolve_backend
from .checkpoints import MODEL_ARGS, load_checkpoint
from .loop import AMP_DTYPES, Dist, UsageError, _train

PROG = "sgdc-train"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, ``sgdc-train: error: <message>``, without the (long) usage text."""
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _bounded(kind, low, high=None, low_open=False, what=None):
    """An argparse type: ``kind`` (int or float) within [low, high] (or (low, high] if low_open)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}") from None
        if (value <= low if low_open else value < low) or (high is not None and value > high):
            bound = f"> {low}" if low_open else f">= {low}"
            bound += f" and <= {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__} {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _pos_weight(text: str):
    if text == "auto":
        return text
    return _bounded(float, 0.0, low_open=True, what="'auto' or a number")(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train SGD-Net (SGE + SGDC decoder) for binary lesion segmentation "
        "(also: python -m sgdc_kernels.segmentation.train).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data", default="synthetic", help="'synthetic' (built-in, seeded), or a folder in ISIC / PH2 layout"
    )
    d.add_argument("--image-size", type=_bounded(int, 32), default=256, help="images are resized to this square size")
    d.add_argument("--num-train", type=_bounded(int, 1), default=512, help="synthetic training images")
    d.add_argument("--num-val", type=_bounded(int, 1), default=64, help="synthetic validation images")
    d.add_argument(
        "--val-fraction", type=_bounded(float, 0.0, 1.0, low_open=True), default=0.2,
        help="folder without train/ and val/ subfolders: the share of its images used for validation",
    )  # fmt: skip
    d.add_argument("--workers", type=_bounded(int, 0), default=2, help="DataLoader workers per process")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="resnet50", help="timm model name with features at strides 4, 8, 16, 32")
    m.add_argument(
        "--pretrained", default=None,
        help="backbone weights: a local checkpoint file, or 'cache' for timm's cache (never downloads)",
    )  # fmt: skip
    m.add_argument("--dim", type=_bounded(int, 4), default=256, help="decoder width (channels of the SGDC blocks)")
    m.add_argument("--depth", type=_bounded(int, 0), default=4, help="SGDC blocks (at stride 4)")
    m.add_argument("--guide-ch", type=_bounded(int, 1), default=16, help="channels of SGE's structure guidance")
    m.add_argument("--num-heads", type=_bounded(int, 1), default=4, help="SGDC heads; must divide --dim")
    m.add_argument("--kernel-size", type=_bounded(int, 1), default=7, help="SGDC window size (odd)")
    m.add_argument(
        "--drop-path", type=_bounded(float, 0.0, 1.0), default=0.0, help="maximum stochastic-depth rate"
    )  # fmt: skip
    m.add_argument("--ls-init", type=float, default=1e-6, help="SGDC layer-scale init")
    m.add_argument(
        "--backend", default="auto", choices=("auto", *BACKEND_NAMES),
        help="sgdc_conv backend; 'auto' picks the fastest available for --device (the one used is logged)",
    )  # fmt: skip
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=_bounded(int, 1), default=20, help="training epochs")
    o.add_argument("--batch-size", type=_bounded(int, 1), default=8, help="images per step, per process")
    o.add_argument("--lr", type=_bounded(float, 0.0, low_open=True), default=1e-3, help="AdamW peak learning rate")
    o.add_argument(
        "--weight-decay", type=_bounded(float, 0.0), default=1e-4, help="AdamW weight decay (not on norms, biases)"
    )
    o.add_argument(
        "--warmup-epochs", type=_bounded(float, 0.0), default=1.0, help="linear warm-up, then cosine decay to 0"
    )
    o.add_argument("--clip-grad", type=_bounded(float, 0.0), default=1.0, help="max gradient norm; 0 disables")
    o.add_argument("--bce-weight", type=_bounded(float, 0.0), default=1.0, help="weight of the mask BCE loss")
    o.add_argument("--dice-weight", type=_bounded(float, 0.0), default=1.0, help="weight of the mask Dice loss")
    o.add_argument("--edge-weight", type=_bounded(float, 0.0), default=0.5, help="weight of the boundary BCE loss")
    o.add_argument("--edge-radius", type=_bounded(int, 0), default=2, help="boundary target half-width, pixels")
    o.add_argument(
        "--edge-pos-weight", type=_pos_weight, default="auto", help="edge BCE pos_weight: a number or 'auto'"
    )
    o.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype (fp16 adds a grad scaler)")
    o.add_argument("--channels-last", action="store_true", help="channels_last model and images")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/sgdnet", help="folder for metrics.json, curves.png, last.pt, best.pt")
    r.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the synthetic data")
    r.add_argument(
        "--resume", default="auto",
        help="'auto': continue <out>/last.pt if present; a checkpoint path (last.pt or epoch_NNN.pt); "
        "'none': start afresh, overwriting <out>",
    )  # fmt: skip
    r.add_argument(
        "--save-every", type=_bounded(int, 0), default=0, help="also keep epoch_NNN.pt every N epochs; 0: never"
    )
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="'auto': cuda if available")
    r.add_argument(
        "--threads", type=_bounded(int, 0), default=0, help="torch CPU threads per process; 0 keeps the default"
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def check_args(args: argparse.Namespace) -> None:
    """The checks that need no model and no data: raise UsageError naming the flag."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)")
    if args.dim % args.num_heads:
        raise UsageError(f"--num-heads {args.num_heads}: must divide --dim {args.dim}")
    if args.kernel_size % 2 == 0:
        raise UsageError(f"--kernel-size {args.kernel_size}: expected an odd size (the window is centred)")
    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such folder (expected 'synthetic' or a folder of images and masks)")
    if args.pretrained not in (None, "cache") and not Path(args.pretrained).is_file():
        raise UsageError(f"--pretrained {args.pretrained}: no such file (weights are never downloaded)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    import timm

    if not timm.is_model(args.backbone):
        raise UsageError(f"--backbone {args.backbone}: timm has no such model (see timm.list_models())")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def backend_used(args: argparse.Namespace, device: torch.device) -> str:
    """The sgdc_conv backend that --backend means on this device (resolves 'auto')."""
    dtype = AMP_DTYPES[args.amp] or torch.float32
    try:
        return resolve_backend(args.backend, device.type, dtype)
    except (ValueError, TypeError, BackendUnavailableError) as exc:
        raise UsageError(f"--backend {args.backend}: {_one_line(exc)}") from None


def load_resume(args: argparse.Namespace) -> tuple[dict | None, str | None]:
    """The checkpoint that --resume names, checked against the flags: (checkpoint, path), or
    (None, None) to start afresh."""
    resume = args.resume
    if resume == "none":
        return None, None
    if resume == "auto":
        last = Path(args.out) / "last.pt"
        if not last.exists():
            return None, None
        resume = str(last)
    if not Path(resume).is_file():
        raise UsageError(f"--resume {resume}: no such file (give a last.pt or epoch_NNN.pt, 'auto' or 'none')")
    try:
        ckpt = load_checkpoint(resume)
    except Exception as exc:
        raise UsageError(f"--resume {resume}: not a readable checkpoint ({_one_line(exc)})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise UsageError(f"--resume {resume}: not a checkpoint written by {PROG}")
    if "optimizer" not in ckpt:
        raise UsageError(
            f"--resume {resume}: holds the best epoch's weights only (for inference, not for resuming); "
            f"resume from last.pt or an epoch_NNN.pt beside it"
        )
    model_config = {k: getattr(args, k) for k in MODEL_ARGS}
    if ckpt["model_config"] != model_config:
        raise UsageError(
            f"--resume {resume}: was trained with {ckpt['model_config']}, these flags give {model_config} "
            "(choose another --out, or --resume none to start afresh)"
        )
    epochs = ckpt["args"]["epochs"]
    if epochs != args.epochs:
        raise UsageError(
            f"--epochs {args.epochs}: {resume} belongs to a run of {epochs} epochs, which its learning-rate "
            f"schedule spans; pass --epochs {epochs} to continue it, or --resume none to start afresh"
        )
    return ckpt, resume


def main(argv=None) -> list[dict]:
    """Run the CLI; returns the per-epoch records (also in <out>/metrics.json). A mistake in the
    arguments exits with status 2 and one line naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        device = resolve_device(args.device)
        backend = backend_used(args, device)
        ckpt, resume = load_resume(args)
        if ckpt is not None and ckpt["epoch"] >= args.epochs:
            if int(os.environ.get("RANK", "0")) == 0:
                print(
                    f"nothing to do: {resume} has finished all {args.epochs} epochs "
                    f"(metrics in {Path(resume).parent / 'metrics.json'}; --resume none starts afresh)",
                    flush=True,
                )
            return ckpt["history"]
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        ddp = Dist(device)
        try:
            return _train(args, ddp, backend, ckpt, resume)
        finally:
            ddp.close()
    except UsageError as exc:
        parser.error(str(exc))


def cli() -> None:
    """Console-script entry point (``sgdc-train``)."""
    main()


if __name__ == "__main__":
    cli()
