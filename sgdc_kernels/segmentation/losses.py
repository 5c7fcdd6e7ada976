"""Training losses for SGD-Net: segmentation BCE + Dice (MONAI's DiceLoss), and a boundary BCE for
the edge head.

All losses run in float32 or wider whatever the logits' dtype (autocast-safe).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

Tensor = torch.Tensor


def _wide(t: Tensor) -> Tensor:
    """float32 for half-precision tensors, otherwise unchanged (float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def boundary_target(mask: Tensor, radius: int = 2) -> Tensor:
    """Morphological gradient of a binary (B, 1, H, W) mask: dilation minus erosion with a
    (2*radius+1)-square structuring element, i.e. a band about 2*radius pixels wide centred on the
    contour. Outside the image counts as neither foreground nor background (max-pool padding), so a
    mask that touches the image border gets no boundary along it. radius 0 gives all zeros."""
    mask = _wide(mask)
    if radius <= 0:
        return torch.zeros_like(mask)
    k = 2 * radius + 1
    dilated = F.max_pool2d(mask, k, stride=1, padding=radius)
    eroded = -F.max_pool2d(-mask, k, stride=1, padding=radius)
    return dilated - eroded


_DICE = DiceLoss(sigmoid=True)  # per image and channel, then the mean; smooth_nr = smooth_dr = 1e-5


def soft_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """MONAI's ``DiceLoss(sigmoid=True)`` in float32 or wider: 1 - (2|P.T| + 1e-5) / (|P| + |T| + 1e-5),
    P = sigmoid(logits), per image and channel, then averaged. An image with an empty target and an
    all-background prediction scores a loss near 0."""
    return _DICE(_wide(logits), _wide(target))


class SegEdgeLoss(nn.Module):
    """total = bce_weight * BCE(seg) + dice_weight * Dice(seg) + edge_weight * BCE(edge, boundary).

    ``edge_pos_weight`` weighs boundary pixels in the edge BCE: a number, or "auto" for the batch's
    background/boundary pixel ratio (clamped to [1, max_pos_weight]); boundaries cover a few percent
    of the image, so unweighted BCE would learn to predict no edge.
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        edge_weight: float = 1.0,
        edge_radius: int = 2,
        edge_pos_weight: float | str = "auto",
        max_pos_weight: float = 50.0,
    ):
        super().__init__()
        if isinstance(edge_pos_weight, str) and edge_pos_weight != "auto":
            raise ValueError(f"edge_pos_weight: expected a number or 'auto', got {edge_pos_weight!r}")
        self.bce_weight, self.dice_weight, self.edge_weight = bce_weight, dice_weight, edge_weight
        self.edge_radius = edge_radius
        self.edge_pos_weight = edge_pos_weight
        self.max_pos_weight = max_pos_weight

    def pos_weight(self, edge_target: Tensor) -> Tensor:
        if self.edge_pos_weight != "auto":
            return edge_target.new_tensor(float(self.edge_pos_weight))
        pos = edge_target.sum()
        neg = edge_target.numel() - pos
        return (neg / pos.clamp_min(1.0)).clamp(1.0, self.max_pos_weight)

    def forward(self, seg_logits: Tensor, edge_logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
        seg_logits = _wide(seg_logits)
        mask = mask.to(seg_logits.dtype)
        bce = F.binary_cross_entropy_with_logits(seg_logits, mask)
        dice = soft_dice_loss(seg_logits, mask)
        edge_target = boundary_target(mask, self.edge_radius)
        edge = F.binary_cross_entropy_with_logits(
            edge_logits.to(mask.dtype), edge_target, pos_weight=self.pos_weight(edge_target)
        )
        total = self.bce_weight * bce + self.dice_weight * dice + self.edge_weight * edge
        return {"loss": total, "bce": bce, "dice": dice, "edge": edge}
