"""The checkpoints of ``sgdc-train``: what they hold, and how they are written, read and restored.

``last.pt`` (and ``epoch_NNN.pt`` with ``--save-every``) hold the whole training state: model,
optimizer, scheduler, grad scaler, epochs done, best Dice, metric history, every rank's RNG states
(torch, Python, NumPy and CUDA), the model flags (``model_config``), all flags (``args``) and the
version of sgdc-kernels that wrote it (``version``). Restoring one before the first batch replays
the following epochs exactly. ``best.pt`` holds the weights of the best epoch only, for inference
(``sgdc-predict``), with that epoch's metrics, the model flags, all flags and the version. Every
file is written under a temporary name and then renamed over the old one, so an interrupted write
leaves the previous file whole.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .._version import __version__

# The flags that define the model: a checkpoint continues only under the same values.
MODEL_ARGS = ("backbone", "dim", "depth", "guide_ch", "num_heads", "kernel_size", "drop_path", "ls_init")


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


def load_checkpoint(path: str | Path):
    """The object saved in ``path``, on the CPU. ``weights_only=False``: a checkpoint holds the
    Python and NumPy RNG states, so load only files you trust."""
    return torch.load(path, map_location="cpu", weights_only=False)


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    epoch: int,
    best_dice: float,
    history: list[dict],
    rng: list[dict],
    args: argparse.Namespace,
) -> dict:
    """The contents of ``last.pt`` after ``epoch`` epochs; ``rng`` holds every rank's rng_state(),
    in rank order."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_dice": best_dice,
        "history": history,
        "rng": rng,
        "model_config": {k: getattr(args, k) for k in MODEL_ARGS},
        "args": dict(vars(args)),
        "version": __version__,
    }


def save_checkpoints(out_dir: Path, state: dict, metrics: dict, is_best: bool, save_every: int) -> None:
    """Write ``state`` (a training_state()) to ``last.pt``; the weights, with ``metrics``, the flags
    and the version (no optimizer, scheduler or RNG state), to ``best.pt`` if ``is_best``; and
    ``state`` to ``epoch_NNN.pt`` every ``save_every`` epochs (0: never)."""
    epoch = state["epoch"]
    save_atomic(state, out_dir / "last.pt")
    if is_best:
        best = {k: state[k] for k in ("model", "model_config", "args", "version")}
        best.update(epoch=epoch, metrics=metrics)
        save_atomic(best, out_dir / "best.pt")  # weights only: for inference, not for resuming
    if save_every and epoch % save_every == 0:
        save_atomic(state, out_dir / f"epoch_{epoch:03d}.pt")


def restore_training_state(
    ckpt: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    rank: int,
    world: int,
    seed: int,
) -> tuple[int, float, list[dict]]:
    """Load a training_state() into the model, optimizer, scheduler and grad scaler, and this rank's
    RNG states into the generators; returns (epochs done, best Dice, history). Under another world
    size than the checkpoint's, each rank seeds a fresh torch stream from ``seed``, the epochs done
    and its rank instead."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    epoch = ckpt["epoch"]
    states = ckpt["rng"]
    if len(states) == world:
        set_rng_state(states[rank])
    else:  # another world size: fresh per-rank streams, still reproducible
        torch.manual_seed(seed + 1000 * epoch + rank)
    return epoch, ckpt["best_dice"], ckpt["history"]
