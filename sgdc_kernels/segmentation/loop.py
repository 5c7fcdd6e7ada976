"""The training of SGD-Net behind ``sgdc-train``: one training step (also used by the tests and
``bench/train_step.py``), autocast and the grad scaler, the builders of the model, optimizer and
learning-rate schedule, the data loaders, evaluation (its forward pass, ``forward_eval``, is
``sgdc-predict``'s too), the DDP helper ``Dist`` and the epoch loop (``_train``), which writes
``metrics.json``, the checkpoints and the curves (``curves.png``) after every epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoints import restore_training_state, rng_state, save_checkpoints, training_state, write_json_atomic
from .losses import SegEdgeLoss
from .metrics import MetricTracker
from .plots import Curves

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(Exception):
    """A mistake in the command line, reported as one line naming the flag (exit status 2): found
    by the command line's checks, or once the run has started (the data a flag names, the model it
    builds, a loss that diverges)."""


# ---------------------------------------------------------------------------------------------
# One training step and its builders, shared by the epoch loop, the tests and bench/train_step.py
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
# The run: processes, data, evaluation and the epoch loop
# ---------------------------------------------------------------------------------------------


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


def forward_eval(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str | None, channels_last: bool):
    """The model's output on a batch of normalized images, as validation computes it: the images
    moved to ``device`` (channels_last if asked), the forward under autocast(``amp``). Call it in
    eval mode and under torch.no_grad()."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        return model(images)


@torch.no_grad()
def evaluate(model, loader, loss_fn, device, args, ddp: Dist) -> dict[str, float]:
    model.eval()
    tracker = MetricTracker()
    loss_sum, n = 0.0, 0
    for images, masks in loader:
        masks = masks.to(device, non_blocking=True)
        out = forward_eval(model, images, device, args.amp, args.channels_last)
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


def _train(args, ddp: Dist, backend: str, ckpt: dict | None, resume: str | None) -> list[dict]:
    """Train from scratch, or continue ``ckpt`` (read from ``resume``), to ``args.epochs``; returns
    the per-epoch records. A flag that turns out unusable raises UsageError."""
    device = ddp.device
    out_dir = Path(args.out)
    try:
        train_loader, sampler, val_loader = make_loaders(args, ddp)
    except (FileNotFoundError, ValueError) as exc:
        message = " ".join(str(exc).split())
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
        message = " ".join(str(exc).split())
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
    history: list[dict] = []
    start_epoch, best_dice = 0, -1.0
    torch.manual_seed(args.seed + ddp.rank)  # augmentation / drop path differ per rank
    random.seed(args.seed + ddp.rank)
    np.random.seed(args.seed + ddp.rank)

    if ckpt is not None:
        start_epoch, best_dice, history = restore_training_state(
            ckpt, model, optimizer, scheduler, scaler, ddp.rank, ddp.world, args.seed
        )
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
    curves = Curves(out_dir / "curves.png") if ddp.main else None
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
            curves.draw(history)
            state = training_state(model, optimizer, scheduler, scaler, epoch + 1, best_dice, history, rng, args)
            save_checkpoints(out_dir, state, record, val["dice"] >= best_dice, args.save_every)
        ddp.barrier()
    return history
