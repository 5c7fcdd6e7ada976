"""Binary segmentation metrics, per image and averaged over images as the ISIC literature reports
them (the mean of per-image scores, not one score of the pooled pixels).

Prediction = logits > 0 (probability > 0.5); target = mask > 0.5.

- IoU = |P and T| / |P or T|;  Dice = 2 |P and T| / (|P| + |T|).
- HD95, in pixels: MONAI's compute_hausdorff_distance(percentile=95, directed=False) on 2-D masks:
  contours are the mask pixels removed by a binary erosion (4-connected cross, outside the image
  counts as background), the 95th percentile (linear interpolation) of the Euclidean distances from
  each predicted contour pixel to the nearest true contour pixel and the same the other way round,
  and the larger of the two.

Empty masks (where MONAI gives NaN or inf):
- both empty: IoU = Dice = 1 and HD95 = 0 (a correct "no lesion" answer);
- exactly one empty: IoU = Dice = 0 and HD95 = the image diagonal sqrt(H^2 + W^2), the largest
  distance the image allows, so a missed or hallucinated lesion counts as the worst case instead of
  vanishing from the mean.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Tensor = torch.Tensor

METRIC_NAMES = ("iou", "dice", "hd95")


def _binary_erosion(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return binary_erosion(mask)  # cross structuring element, border_value 0: as MONAI


def contour(mask: np.ndarray) -> np.ndarray:
    """The pixels of a boolean 2-D mask that a 4-connected erosion removes."""
    return mask & ~_binary_erosion(mask)


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two boolean 2-D masks, in pixels
    (empty masks: see the module docstring)."""
    from scipy.ndimage import distance_transform_edt

    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"hd95: expected two 2-D masks of one shape, got {pred.shape} and {target.shape}")
    has_p, has_t = bool(pred.any()), bool(target.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return math.hypot(*pred.shape)
    cp, ct = contour(pred), contour(target)
    d_pt = distance_transform_edt(~ct)[cp]  # each predicted contour pixel -> nearest true one
    d_tp = distance_transform_edt(~cp)[ct]
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def per_image_metrics(seg_logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """IoU, Dice and HD95 of each image of a (B, 1, H, W) batch of logits against its mask;
    returns float64 CPU tensors of shape (B,)."""
    if seg_logits.shape[1] != 1 or mask.shape[1] != 1:
        raise ValueError(
            f"per_image_metrics: expected single-channel (B, 1, H, W) logits and masks, got "
            f"{tuple(seg_logits.shape)} and {tuple(mask.shape)}"
        )
    pred = (seg_logits.detach() > 0).flatten(1).cpu()
    target = (mask.detach() > 0.5).flatten(1).cpu()
    inter = (pred & target).sum(1).double()
    n_pred, n_target = pred.sum(1).double(), target.sum(1).double()
    union = n_pred + n_target - inter
    both_empty = union == 0
    iou = torch.where(both_empty, torch.ones_like(inter), inter / union.clamp_min(1))
    dice = torch.where(both_empty, torch.ones_like(inter), 2 * inter / (n_pred + n_target).clamp_min(1))
    shape = seg_logits.shape[-2:]
    p2 = pred.view(-1, *shape).numpy()
    t2 = target.view(-1, *shape).numpy()
    hd = torch.tensor([hd95(p, t) for p, t in zip(p2, t2)], dtype=torch.float64)
    return {"iou": iou, "dice": dice, "hd95": hd}


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
