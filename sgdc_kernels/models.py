"""SGD-Net: a segmentation network built around the SGE and SGDC modules (SPEC section 3).

The paper's full network is not public; this is our design around the two released modules:

    image -> timm backbone (features_only) -> stages at strides 4, 8, 16, 32
          -> SGE(stage 32, stage 4) -> edge logits + structure guidance (stride 4)
          -> FPN top-down decoder: 1x1 lateral per stage, upsample-and-add from stride 32 to 4,
             SGDC blocks guided by SGE's guidance (all at stride 4 by default)
          -> segmentation head on the stride-4 features; edge head = SGE's edge map;
             both bilinearly upsampled to the input size.

``SGDNet(...)(images)`` returns ``SGDNetOutput(seg, edge)``, logits of shapes
(B, num_classes, H, W) and (B, 1, H, W).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import get_backend
from .modules import SGDC, SGE, ConvBNReLU

Tensor = torch.Tensor

STRIDES = (4, 8, 16, 32)


class SGDNetOutput(NamedTuple):
    seg: Tensor  # (B, num_classes, H, W) segmentation logits
    edge: Tensor  # (B, 1, H, W) boundary logits


def _import_timm():
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"SGDNet needs timm for its backbone ({exc}); install the training extra: "
            "pip install 'sgdc-kernels[train]'"
        ) from exc
    return timm


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained: {path!r} does not hold a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(backbone: nn.Module, path: str) -> list[str]:
    """Load a local checkpoint of the timm model into a features_only ``backbone``.

    Keys the features model lacks (a classifier head) are ignored and returned; a backbone key
    missing from the file raises, so a checkpoint of another architecture is never half-loaded.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained: no checkpoint file at {path!r} (weights are never downloaded)")
    state = _read_state_dict(path)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(
            f"pretrained: {path!r} lacks {len(missing)} backbone keys (first: {missing[:3]}); "
            "is it a checkpoint of this --backbone?"
        )
    ignored = sorted(k for k in state if k not in own)
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    return ignored


def create_backbone(name: str, pretrained: Union[bool, str, None], in_chans: int = 3) -> nn.Module:
    """A timm features_only model with outputs at strides 4, 8, 16 and 32.

    ``pretrained``: False/None for random init; a path to a local checkpoint; or True for timm's
    cached weights, loaded with the Hugging Face hub forced offline (nothing is downloaded).
    """
    timm = _import_timm()
    probe = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans)
    reductions = list(probe.feature_info.reduction())
    missing = [s for s in STRIDES if s not in reductions]
    if missing:
        raise ValueError(
            f"backbone: {name!r} has feature strides {reductions}; SGDNet needs {list(STRIDES)}"
        )
    # The last stage of each stride (some models repeat a stride).
    out_indices = tuple(max(i for i, r in enumerate(reductions) if r == s) for s in STRIDES)
    if pretrained is True:
        import huggingface_hub.constants as hf_constants

        offline = hf_constants.HF_HUB_OFFLINE
        hf_constants.HF_HUB_OFFLINE = True
        try:
            return timm.create_model(
                name, features_only=True, pretrained=True, out_indices=out_indices, in_chans=in_chans
            )
        except Exception as exc:
            raise RuntimeError(
                f"pretrained=True: timm's cache has no weights for {name!r} ({exc}); SGDNet never "
                "downloads: pass a local checkpoint path instead"
            ) from exc
        finally:
            hf_constants.HF_HUB_OFFLINE = offline
    model = timm.create_model(name, features_only=True, pretrained=False, out_indices=out_indices, in_chans=in_chans)
    if pretrained:
        load_backbone_weights(model, os.fspath(pretrained))
    return model


class SGDNet(nn.Module):
    """SGD-Net: timm backbone + SGE + FPN decoder with SGDC blocks + segmentation and edge heads.

    Args:
        num_classes: segmentation channels (1 for binary lesion masks).
        backbone: a timm model name with features at strides 4, 8, 16, 32 (resnet50, resnet18, ...).
        pretrained: False, a local checkpoint path of the timm model, or True for timm's cache
            (never downloads).
        dim: decoder width (the SGDC blocks' dim).
        depth: SGDC blocks; an int puts them all at stride 4, where the guidance lives; a
            sequence of 4 gives the blocks per level at strides 32, 16, 8, 4.
        guide_ch, num_heads, kernel_size, mlp_ratio: SGDC/SGE settings.
        drop_path: maximum stochastic-depth rate, increased linearly over the blocks.
        ls_init: SGDC layer-scale init (1e-6 as released).
        sge_mid, sge_bottleneck: SGE widths (default: dim).
        backend: sgdc_conv backend passed to every SGDC block.
    """

    def __init__(
        self,
        num_classes: int = 1,
        backbone: str = "resnet50",
        pretrained: Union[bool, str, None] = False,
        dim: int = 256,
        depth: Union[int, Sequence[int]] = 4,
        guide_ch: int = 16,
        num_heads: int = 4,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        ls_init: float = 1e-6,
        sge_mid: Optional[int] = None,
        sge_bottleneck: Optional[int] = None,
        backend: str = "auto",
        in_chans: int = 3,
    ):
        super().__init__()
        self._check_backend(backend)
        depths = (0, 0, 0, int(depth)) if isinstance(depth, int) else tuple(int(d) for d in depth)
        if len(depths) != 4 or min(depths) < 0:
            raise ValueError(f"depth: expected an int >= 0 or 4 per-level counts >= 0, got {depth!r}")
        self.depths = depths  # strides 32, 16, 8, 4
        self.backbone = create_backbone(backbone, pretrained, in_chans)
        channels = list(self.backbone.feature_info.channels())  # strides 4, 8, 16, 32
        self.sge = SGE(
            s4_in=channels[3],
            s1_in=channels[0],
            mid=sge_mid or dim,
            guide_ch=guide_ch,
            bottleneck=sge_bottleneck or dim,
        )
        # Top-down order: stride 32 first.
        self.laterals = nn.ModuleList(ConvBNReLU(c, dim, 1) for c in reversed(channels))
        rates = torch.linspace(0, drop_path, max(sum(depths), 1)).tolist()
        blocks, i = [], 0
        for n in depths:
            level = []
            for _ in range(n):
                level.append(
                    SGDC(dim, guide_ch, num_heads, kernel_size, mlp_ratio, rates[i], ls_init, backend=backend)
                )
                i += 1
            blocks.append(nn.ModuleList(level))
        self.blocks = nn.ModuleList(blocks)
        self.seg_head = nn.Sequential(ConvBNReLU(dim, dim // 2, 3), nn.Conv2d(dim // 2, num_classes, 1))

    @staticmethod
    def _check_backend(backend: str) -> None:
        # Fails at construction, with the registry's reason, on an unknown or unavailable backend.
        if backend != "auto":
            get_backend(backend)

    def sgdc_blocks(self) -> list[SGDC]:
        return [b for level in self.blocks for b in level]

    def set_backend(self, backend: str) -> None:
        """Switch every SGDC block to sgdc_conv backend ``backend``."""
        self._check_backend(backend)
        for block in self.sgdc_blocks():
            block.backend = backend

    def forward(self, images: Tensor) -> SGDNetOutput:
        feats = self.backbone(images)  # strides 4, 8, 16, 32
        edge, guidance = self.sge(feats[3], feats[0])
        x = None
        for lateral, feat, level in zip(self.laterals, reversed(feats), self.blocks):
            y = lateral(feat)
            if x is not None:
                y = y + F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False)
            for block in level:
                y = block(y, guidance)
            x = y
        size = images.shape[-2:]
        seg = F.interpolate(self.seg_head(x), size=size, mode="bilinear", align_corners=False)
        edge = F.interpolate(edge, size=size, mode="bilinear", align_corners=False)
        return SGDNetOutput(seg, edge)
