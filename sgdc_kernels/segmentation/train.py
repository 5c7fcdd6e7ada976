"""Train SGD-Net on skin-lesion segmentation: ``python -m sgdc_kernels.train --help``.

Single process:   python -m sgdc_kernels.train --data synthetic --epochs 20 --out runs/syn
Several GPUs:     torchrun --nproc_per_node 4 -m sgdc_kernels.train --data /data/ISIC2018 --out runs/isic
CPU, 2 processes: torchrun --nproc_per_node 2 -m sgdc_kernels.train ...   (gloo)

After each epoch, validation IoU, Dice and HD95 (per-image means, see sgdc_kernels.metrics) are
appended to ``<out>/metrics.json`` and ``<out>/last.pt`` is written (model, optimizer, scheduler,
grad scaler, epoch, RNG states, metrics history); ``--resume auto`` continues from it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .losses import SegEdgeLoss
from .metrics import MetricTracker

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_ARGS = ("backbone", "dim", "depth", "guide_ch", "num_heads", "kernel_size", "drop_path", "ls_init")


# ---------------------------------------------------------------------------------------------
# One training step, shared by the CLI, the equivalence test and bench/train_step.py
# ---------------------------------------------------------------------------------------------


def autocast(device: torch.device, amp: Optional[str]):
    dtype = AMP_DTYPES[amp or "none"]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(device: torch.device, amp: Optional[str]) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler] = None,
    amp: Optional[str] = None,
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


def build_model(args: argparse.Namespace):
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
        backend=args.backend,
    )


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sgdc_kernels.train",
        description="Train SGD-Net (SGE + SGDC decoder) for binary lesion segmentation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic", help="'synthetic', or a folder in ISIC / PH2 layout")
    d.add_argument("--image-size", type=int, default=256)
    d.add_argument("--num-train", type=int, default=512, help="synthetic training images")
    d.add_argument("--num-val", type=int, default=64, help="synthetic validation images")
    d.add_argument("--val-fraction", type=float, default=0.2, help="folder without train/ val/: share for val")
    d.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="resnet50", help="timm model name")
    m.add_argument("--pretrained", default=None, help="backbone weights: a local checkpoint file, or 'cache' for timm's cache (never downloads)")
    m.add_argument("--dim", type=int, default=256)
    m.add_argument("--depth", type=int, default=4, help="SGDC blocks (at stride 4)")
    m.add_argument("--guide-ch", type=int, default=16)
    m.add_argument("--num-heads", type=int, default=4)
    m.add_argument("--kernel-size", type=int, default=7)
    m.add_argument("--drop-path", type=float, default=0.0)
    m.add_argument("--ls-init", type=float, default=1e-6, help="SGDC layer-scale init")
    m.add_argument("--backend", default="auto", help="sgdc_conv backend: auto, unfold, torch, triton, cuda")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=20)
    o.add_argument("--batch-size", type=int, default=8, help="per process")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--warmup-epochs", type=float, default=1.0)
    o.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm; 0 disables")
    o.add_argument("--bce-weight", type=float, default=1.0)
    o.add_argument("--dice-weight", type=float, default=1.0)
    o.add_argument("--edge-weight", type=float, default=0.5)
    o.add_argument("--edge-radius", type=int, default=2, help="boundary target half-width, pixels")
    o.add_argument("--edge-pos-weight", default="auto", help="edge BCE pos_weight: a number or 'auto'")
    o.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none")
    o.add_argument("--channels-last", action="store_true")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/sgdnet")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", default=None, help="a checkpoint path, or 'auto' for <out>/last.pt if present")
    r.add_argument("--save-every", type=int, default=0, help="also keep epoch_NNN.pt every N epochs")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads per process; 0 keeps the default")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.edge_pos_weight != "auto":
        args.edge_pos_weight = float(args.edge_pos_weight)
    return args


class Dist:
    """Rank, world size and device of this process; init_process_group under torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(device)
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
        train_ds, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=args.seed,
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
    """Run the CLI; returns the per-epoch records (also in <out>/metrics.json)."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ddp = Dist(args.device)
    try:
        return _train(args, ddp)
    finally:
        ddp.close()


def _train(args, ddp: Dist) -> list[dict]:
    device = ddp.device
    out_dir = Path(args.out)
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, sampler, val_loader = make_loaders(args, ddp)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("no training batches: lower --batch-size or add training images")
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = cosine_schedule(
        optimizer, args.epochs * steps_per_epoch, max(1, round(args.warmup_epochs * steps_per_epoch))
    )
    scaler = make_scaler(device, args.amp)
    loss_fn = SegEdgeLoss(
        args.bce_weight, args.dice_weight, args.edge_weight, args.edge_radius, args.edge_pos_weight
    )
    model_config = {k: getattr(args, k) for k in MODEL_ARGS}
    history: list[dict] = []
    start_epoch, best_dice = 0, -1.0
    torch.manual_seed(args.seed + ddp.rank)  # augmentation / drop path differ per rank
    random.seed(args.seed + ddp.rank)
    np.random.seed(args.seed + ddp.rank)

    resume = args.resume
    if resume == "auto":
        resume = str(out_dir / "last.pt") if (out_dir / "last.pt").exists() else None
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=False)
        if ckpt["model_config"] != model_config:
            raise ValueError(
                f"--resume: {resume} was trained with {ckpt['model_config']}, these flags give {model_config}"
            )
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
        )

    config = dict(vars(args), world_size=ddp.world, device=str(device), steps_per_epoch=steps_per_epoch)
    if ddp.main:
        print(
            f"SGD-Net {args.backbone} dim={args.dim} depth={args.depth} backend={args.backend} on "
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
                raise FloatingPointError(f"loss is {loss} at epoch {epoch + 1}; lower --lr or use --amp bf16")
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
                save_atomic({"model": ckpt["model"], "model_config": model_config, "epoch": epoch + 1}, out_dir / "best.pt")
            if args.save_every and (epoch + 1) % args.save_every == 0:
                save_atomic(ckpt, out_dir / f"epoch_{epoch + 1:03d}.pt")
        ddp.barrier()
    return history


if __name__ == "__main__":
    main(sys.argv[1:])
