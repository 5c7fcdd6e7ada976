"""Binary segmentation metrics, per image and averaged over images as the ISIC literature reports
them (the mean of per-image scores, not one score of the pooled pixels).

Prediction = logits > 0 (probability > 0.5); target = mask > 0.5. The scores are MONAI's:

- IoU = |P and T| / |P or T|: ``monai.metrics.compute_iou``;
- Dice = 2 |P and T| / (|P| + |T|): ``monai.metrics.compute_dice``;
- HD95, in pixels: ``monai.metrics.compute_hausdorff_distance(percentile=95, directed=False)``:
  contours are the mask pixels removed by a binary erosion (4-connected cross, outside the image
  counts as background), the 95th percentile (linear interpolation) of the Euclidean distances from
  each predicted contour pixel to the nearest true contour pixel and the same the other way round,
  and the larger of the two.

This module adds only the policy for empty masks, where MONAI gives NaN:
- both empty: IoU = Dice = 1 and HD95 = 0 (a correct "no lesion" answer);
- exactly one empty: IoU = Dice = 0 and HD95 = the image diagonal sqrt(H^2 + W^2), the largest
  distance the image allows, so a missed or hallucinated lesion counts as the worst case instead of
  vanishing from the mean.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

Tensor = torch.Tensor

METRIC_NAMES = ("iou", "dice", "hd95")


def _hd95_where_both_nonempty(pred: Tensor, target: Tensor) -> Tensor:
    """MONAI's symmetric HD95 of boolean (N, 1, H, W) masks, none of them empty; float64 (N,)."""
    if pred.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated always_return_as_numpy argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = compute_hausdorff_distance(pred, target, include_background=True, percentile=95, directed=False)
    return hd[:, 0].double()


def _scores(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """IoU, Dice and HD95 of boolean (B, 1, H, W) masks with the empty-mask policy; float64 (B,)."""
    # ignore_empty=False is MONAI's form of the policy for IoU and Dice: an empty target scores 1
    # against an empty prediction and 0 against any other.
    iou = compute_iou(pred, target, include_background=True, ignore_empty=False)[:, 0].double()
    dice = compute_dice(pred, target, include_background=True, ignore_empty=False)[:, 0].double()
    has_p, has_t = pred.flatten(1).any(1), target.flatten(1).any(1)
    both = has_p & has_t
    hd = torch.where(has_p | has_t, math.hypot(*pred.shape[-2:]), 0.0).double()
    hd[both] = _hd95_where_both_nonempty(pred[both], target[both])
    return {"iou": iou, "dice": dice, "hd95": hd}


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two boolean 2-D masks, in pixels
    (empty masks: see the module docstring)."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"hd95: expected two 2-D masks of one shape, got {pred.shape} and {target.shape}")
    as_batch = (torch.from_numpy(m)[None, None] for m in (pred, target))
    return float(_scores(*as_batch)["hd95"][0])


def per_image_metrics(seg_logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """IoU, Dice and HD95 of each image of a (B, 1, H, W) batch of logits against its mask;
    returns float64 CPU tensors of shape (B,)."""
    if seg_logits.dim() != 4 or mask.shape != seg_logits.shape or seg_logits.shape[1] != 1:
        raise ValueError(
            f"per_image_metrics: expected single-channel (B, 1, H, W) logits and masks, got "
            f"{tuple(seg_logits.shape)} and {tuple(mask.shape)}"
        )
    return _scores((seg_logits.detach() > 0).cpu(), (mask.detach() > 0.5).cpu())


class MetricTracker:
    """Sums of per-image metrics over an evaluation, reducible across DDP ranks."""

    def __init__(self):
        self.sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float64)
        self.count = 0

    def update(self, seg_logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
        values = per_image_metrics(seg_logits, mask)
        self.sums += torch.stack([values[n].sum() for n in METRIC_NAMES])
        self.count += int(seg_logits.shape[0])
        return values

    def all_reduce(self, device: torch.device) -> None:
        """Sum over the ranks of the default process group (no-op without one)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        buf = torch.cat([self.sums, torch.tensor([float(self.count)], dtype=torch.float64)]).to(device)
        dist.all_reduce(buf)
        buf = buf.cpu()
        self.sums, self.count = buf[:-1].clone(), int(round(buf[-1].item()))

    def compute(self) -> dict[str, float]:
        """Per-image means; NaN before any update."""
        if self.count == 0:
            return {n: float("nan") for n in METRIC_NAMES}
        return {n: float(s) / self.count for n, s in zip(METRIC_NAMES, self.sums)}
