"""Pictures of SGD-Net's training and predictions: the training curves that ``sgdc-train`` draws to
``<out>/curves.png`` after every epoch, and the contours that ``sgdc-predict`` draws on its
overlays.

The curves need matplotlib, an optional dependency (in the ``train`` extra): without it,
``sgdc-train`` prints one warning line and trains without curves. The figure is drawn with
matplotlib's object-oriented API (``matplotlib.figure.Figure``), without pyplot, so it neither
chooses nor changes the caller's matplotlib backend. The overlays need only torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

MATPLOTLIB_HINT = 'pip install matplotlib, or the train extra: pip install -e ".[train]"'

# Overlay colours (RGB): the predicted contour and the ground-truth contour.
PRED_COLOUR = (255, 230, 0)  # yellow
TRUE_COLOUR = (0, 170, 255)  # blue


def matplotlib_missing() -> str | None:
    """Why matplotlib cannot be imported here, or None where it can."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    return None


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Draw the per-epoch records of sgdc-train (``metrics.json``'s "epochs") to the PNG ``path``:
    training and validation loss, validation IoU, Dice and HD95 against the epoch; the best Dice
    (the epoch of best.pt) is marked. Written under a temporary name, then renamed over ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 2.6), dpi=80, layout="constrained")
    axes = fig.subplots(1, 4)
    style = dict(marker="o", markersize=3, linewidth=1.5)
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train", **style)
    axes[0].plot(epochs, [r["val_loss"] for r in history], label="validation", **style)
    axes[0].legend(fontsize=8)
    axes[0].set_title("loss")
    for ax, key, title in zip(
        axes[1:], ("iou", "dice", "hd95"), ("validation IoU", "validation Dice", "validation HD95 (px)")
    ):
        ax.plot(epochs, [r[key] for r in history], color="C2" if key != "hd95" else "C3", **style)
        ax.set_title(title)
    best = max(range(len(history)), key=lambda i: history[i]["dice"]) if history else None
    if best is not None:
        axes[2].plot([epochs[best]], [history[best]["dice"]], "*", color="k", markersize=9, label="best.pt")
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


class Curves:
    """Draws the curves to ``path`` after every epoch (``draw``); where matplotlib is missing, or
    drawing fails, prints one warning line on stderr, once, and draws nothing more: the curves never
    stop a run."""

    def __init__(self, path: str | os.PathLike, prog: str = "sgdc-train"):
        self.path, self.prog, self.enabled = Path(path), prog, True
        missing = matplotlib_missing()
        if missing:
            self._off(f"no {self.path.name}: {missing}; {MATPLOTLIB_HINT}")

    def _off(self, why: str) -> None:
        print(f"{self.prog}: warning: {' '.join(why.split())}", file=sys.stderr, flush=True)
        self.enabled = False

    def draw(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        try:
            plot_curves(history, self.path)
        except Exception as exc:  # a plotting failure must not stop training
            self._off(f"drawing {self.path} failed ({type(exc).__name__}: {exc}); no more curves in this run")


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------


def contour(mask: Tensor, radius: int = 0) -> Tensor:
    """The contour of a boolean (H, W) mask: its pixels with a background pixel among their 8
    neighbours (outside the image counts as mask, so the image border is no contour), widened by
    ``radius`` pixels on either side (lines 2 * radius + 1 pixels wide)."""
    x = mask[None, None].float()
    eroded = -F.max_pool2d(-F.pad(x, (1, 1, 1, 1), value=1.0), 3, stride=1)
    edge = (x - eroded) > 0.5
    if radius > 0:
        edge = F.max_pool2d(edge.float(), 2 * radius + 1, stride=1, padding=radius) > 0.5
    return edge[0, 0]


def overlay(image: Tensor, pred: Tensor, true: Tensor | None = None) -> Tensor:
    """The 8-bit RGB image (H, W, 3) with the contour of the boolean (H, W) mask ``pred`` in
    PRED_COLOUR and, drawn underneath, that of ``true`` in TRUE_COLOUR. Lines are 1 pixel wide in
    images up to 511 pixels, and 2 pixels wider per further 512 pixels of the larger side."""
    radius = max(image.shape[:2]) // 512
    out = image.clone()
    if true is not None:
        out[contour(true, radius)] = torch.tensor(TRUE_COLOUR, dtype=torch.uint8)
    out[contour(pred, radius)] = torch.tensor(PRED_COLOUR, dtype=torch.uint8)
    return out
