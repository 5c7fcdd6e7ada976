"""Train SGD-Net on skin-lesion segmentation: ``sgdc-train --help`` (the same as
``python -m sgdc_kernels.segmentation.train --help``).

Single process:   sgdc-train --data synthetic --epochs 20 --out runs/syn
Several GPUs:     torchrun --nproc_per_node 4 -m sgdc_kernels.segmentation.train --data /data/ISIC2018 --out runs/isic
CPU, 2 processes: torchrun --nproc_per_node 2 -m sgdc_kernels.segmentation.train ...   (gloo)

After each epoch, validation IoU, Dice and HD95 (per-image means, see
sgdc_kernels.segmentation.metrics) are appended to ``<out>/metrics.json`` and ``<out>/last.pt`` is
written (model, optimizer, scheduler, grad scaler, epoch, RNG states, metrics history); re-running
the command continues from it (``--resume auto``, the default). ``<out>/best.pt`` holds the weights
of the best epoch only, for inference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .. import BackendUnavailableError
from ..registry import BACKEND_NAMES, resolve_backend
from .losses import SegEdgeLoss
from .metrics import MetricTracker

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_ARGS = ("backbone", "dim", "depth", "guide_ch", "num_heads", "kernel_size", "drop_path", "ls_init")
PROG = "sgdc-train"


# ---------------------------------------------------------------------------------------------
# One training step, shared by the CLI, the equivalence test and bench/train_step.py
# ---------------------------------------------------------------------------------------------


def autocast(device: torch.device, amp: str | None):
    dtype = AMP_DTYPES[amp or "none"]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(device: torch.device, amp: str | None) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    amp: str | None = None,
    clip_grad: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Forward, loss, backward and optimizer step; returns the detached losses."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, amp):
        out = model(images)
    losses = loss_fn(out.seg, out.edge, masks)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(losses["loss"]).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        losses["loss"].backward()
        if clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
    return {k: v.detach() for k, v in losses.items()}


def build_model(args: argparse.Namespace, backend: str):
    from .models import SGDNet

    return SGDNet(
        num_classes=1,
        backbone=args.backbone,
        pretrained=True if args.pretrained == "cache" else (args.pretrained or False),
        dim=args.dim,
        depth=args.depth,
        guide_ch=args.guide_ch,
        num_heads=args.num_heads,
        kernel_size=args.kernel_size,
        drop_path=args.drop_path,
        ls_init=args.ls_init,
        backend=backend,
    )


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate factor (step + 1) / warmup_steps for the first warmup_steps steps
    (linear warm-up reaching the base rate at the last of them), then a cosine from the base rate
    to 0 at total_steps."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup_steps = max(1, warmup_steps)
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=0.0)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A mistake in the command line, reported as one line naming the flag (exit status 2)."""


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
    r.add_argument("--out", default="runs/sgdnet", help="folder for metrics.json, last.pt, best.pt")
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
        ckpt = torch.load(resume, map_location="cpu", weights_only=False)
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


class Dist:
    """Rank, world size and device of this process; init_process_group under torchrun."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def make_loaders(args, ddp: Dist):
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from .data import build_datasets

    train_ds, val_ds = build_datasets(
        args.data, args.image_size, args.seed, args.num_train, args.num_val, args.val_fraction
    )
    sampler = DistributedSampler(
        train_ds,
        num_replicas=ddp.world,
        rank=ddp.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=len(train_ds) >= ddp.world * args.batch_size,
    )
    pin = ddp.device.type == "cuda"
    common = dict(num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0)
    per_rank = len(sampler)
    train = DataLoader(
        train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=per_rank >= args.batch_size, **common
    )
    # Validation: each rank takes every world-th image, no padding, so the means are exact.
    val = DataLoader(Subset(val_ds, range(ddp.rank, len(val_ds), ddp.world)), batch_size=args.batch_size, **common)
    return train, sampler, val


@torch.no_grad()
def evaluate(model, loader, loss_fn, device, args, ddp: Dist) -> dict[str, float]:
    model.eval()
    tracker = MetricTracker()
    loss_sum, n = 0.0, 0
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            out = model(images)
        loss_sum += loss_fn(out.seg, out.edge, masks)["loss"].item() * images.shape[0]
        n += images.shape[0]
        tracker.update(out.seg.float(), masks)
    tracker.all_reduce(device)
    result = tracker.compute()
    if ddp.enabled:
        t = torch.tensor([loss_sum, float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        loss_sum, n = t.tolist()
    result["val_loss"] = loss_sum / max(n, 1)
    return result


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


def _train(args, ddp: Dist, backend: str, ckpt: dict | None, resume: str | None) -> list[dict]:
    device = ddp.device
    out_dir = Path(args.out)
    try:
        train_loader, sampler, val_loader = make_loaders(args, ddp)
    except (FileNotFoundError, ValueError) as exc:
        message = _one_line(exc)
        raise UsageError(message if message.startswith("--data") else f"--data {args.data}: {message}") from None
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UsageError(
            f"--batch-size {args.batch_size}: larger than the {len(sampler)} training images of each of "
            f"{ddp.world} processes; lower it or add training images"
        )
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    try:
        model = build_model(args, backend).to(device)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        # SGDNet names its argument first: "backbone: ..." or "pretrained...: ..."
        message = _one_line(exc)
        flag = next((f for f in ("backbone", "pretrained") if message.startswith(f)), None)
        if flag is None:
            raise
        raise UsageError(f"--{flag} {getattr(args, flag)}: {message.split(': ', 1)[-1]}") from None
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = warmup_cosine_schedule(
        optimizer, args.epochs * steps_per_epoch, max(1, round(args.warmup_epochs * steps_per_epoch))
    )
    scaler = make_scaler(device, args.amp)
    loss_fn = SegEdgeLoss(args.bce_weight, args.dice_weight, args.edge_weight, args.edge_radius, args.edge_pos_weight)
    model_config = {k: getattr(args, k) for k in MODEL_ARGS}
    history: list[dict] = []
    start_epoch, best_dice = 0, -1.0
    torch.manual_seed(args.seed + ddp.rank)  # augmentation / drop path differ per rank
    random.seed(args.seed + ddp.rank)
    np.random.seed(args.seed + ddp.rank)

    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_dice, history = ckpt["epoch"], ckpt["best_dice"], ckpt["history"]
        states = ckpt["rng"]
        if len(states) == ddp.world:
            set_rng_state(states[ddp.rank])
        else:  # another world size: fresh per-rank streams, still reproducible
            torch.manual_seed(args.seed + 1000 * start_epoch + ddp.rank)
        if ddp.main:
            print(f"resumed from {resume} at epoch {start_epoch}", flush=True)

    ddp_model = model
    if ddp.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=sum(model.depths) == 0,
        )  # fmt: skip

    config = dict(
        vars(args), backend=backend, backend_requested=args.backend, world_size=ddp.world, device=str(device),
        steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    if ddp.main:
        print(
            f"SGD-Net {args.backbone} dim={args.dim} depth={args.depth} backend={backend} on "
            f"{ddp.world} x {device}, {steps_per_epoch} steps/epoch, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters",
            flush=True,
        )
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        ddp_model.train()
        t0 = time.perf_counter()
        loss_sum, n_images = 0.0, 0
        bar = None
        batches = train_loader
        if ddp.main and not args.no_progress:
            from tqdm import tqdm

            bar = batches = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True)
        for images, masks in batches:
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            losses = train_step(ddp_model, images, masks, loss_fn, optimizer, scaler, args.amp, args.clip_grad)
            scheduler.step()
            loss = losses["loss"].item()
            if not math.isfinite(loss):
                raise UsageError(
                    f"--lr {args.lr}: the loss is {loss} at epoch {epoch + 1}; lower --lr or use --amp bf16"
                )
            loss_sum += loss * images.shape[0]
            n_images += images.shape[0]
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        train_loss = ddp.mean(loss_sum / max(n_images, 1))
        val = evaluate(model, val_loader, loss_fn, device, args, ddp)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val["val_loss"],
            "iou": val["iou"],
            "dice": val["dice"],
            "hd95": val["hd95"],
            "lr": scheduler.get_last_lr()[0],
            "train_time_s": train_time,
            "train_images_per_s": n_images * ddp.world / train_time,
        }
        history.append(record)
        best_dice = max(best_dice, val["dice"])
        rng = ddp.gather(rng_state())
        if ddp.main:
            print(
                f"epoch {epoch + 1}: train loss {train_loss:.4f}, val loss {val['val_loss']:.4f}, "
                f"IoU {val['iou']:.4f}, Dice {val['dice']:.4f}, HD95 {val['hd95']:.2f} px",
                flush=True,
            )
            write_json_atomic({"config": config, "epochs": history}, out_dir / "metrics.json")
            ckpt = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "best_dice": best_dice,
                "history": history,
                "rng": rng,
                "model_config": model_config,
                "args": vars(args),
            }
            save_atomic(ckpt, out_dir / "last.pt")
            if val["dice"] >= best_dice:
                best = {"model": ckpt["model"], "model_config": model_config, "epoch": epoch + 1, "metrics": record}
                save_atomic(best, out_dir / "best.pt")  # weights only: for inference, not for resuming
            if args.save_every and (epoch + 1) % args.save_every == 0:
                save_atomic(ckpt, out_dir / f"epoch_{epoch + 1:03d}.pt")
        ddp.barrier()
    return history


if __name__ == "__main__":
    cli()
