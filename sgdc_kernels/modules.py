"""The SGDC and SGE modules, state-dict compatible with the authors' release.

Parameter names and shapes match the released modules, so their checkpoints load with
``load_state_dict(strict=True)`` and give the same outputs. Two flaws of the release are not
copied: SGE's Sobel magnitude sqrt(gx^2 + gy^2) has a NaN gradient where it is zero (here it has
gradient 0), and its dense (ch x ch x 3 x 3) Sobel convolution, whose every [out, in] slice is the
same kernel, is computed as one single-channel convolution of the channel sum (same result).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import sgdc_conv
from .registry import check_name

Tensor = torch.Tensor

SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor (eps 1e-6, affine)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples with probability p, rescale the others by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class SGDC(nn.Module):
    """Structurally-guided dynamic convolution block, ``forward(x, g)``.

    ``x`` (B, dim, H, W) features, ``g`` (B, guide_ch, h, w) structure guidance at any resolution.
    ``backend`` selects the sgdc_conv implementation (see ``sgdc_kernels.available_backends()``);
    a name that is not a backend raises ValueError here, whether it runs on this machine is checked
    on the first forward (the module may move to another device first).
    """

    def __init__(
        self,
        dim: int,
        guide_ch: int = 16,
        num_heads: int = 4,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        ls_init: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected a positive odd int, got {kernel_size}")
        self.dim, self.num_heads, self.kernel_size = dim, num_heads, kernel_size
        self.drop_path_rate = drop_path
        self.backend = check_name(backend)
        taps = num_heads * kernel_size * kernel_size
        hidden = int(dim * mlp_ratio)
        self.proj_guidance = nn.Conv2d(guide_ch, dim, 1)
        self.attn = nn.Conv2d(dim, 2 * dim + taps, 1)
        self.norm1 = LayerNorm2d(dim)
        self.norm2 = LayerNorm2d(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.ls1 = nn.Parameter(torch.full((dim,), float(ls_init)))
        self.ls2 = nn.Parameter(torch.full((dim,), float(ls_init)))

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        g = F.interpolate(g, size=x.shape[-2:], mode="bilinear", align_corners=False)
        g = self.proj_guidance(g)
        taps = self.num_heads * self.kernel_size**2
        a1, a2, k = torch.split(self.attn(x + g), [self.dim, self.dim, taps], dim=1)
        x1 = self.dwconv(x * torch.sigmoid(a1))
        x2 = sgdc_conv(
            self.norm1(x), k, a2, kernel_size=self.kernel_size, num_heads=self.num_heads, backend=self.backend
        )
        p = self.drop_path_rate
        x = x + drop_path(self.ls1.view(1, -1, 1, 1) * (x1 + x2), p, self.training)
        return x + drop_path(self.ls2.view(1, -1, 1, 1) * self.mlp(self.norm2(x)), p, self.training)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, backend={self.backend!r}"


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + ReLU, with submodules ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class BottleneckRefiner(nn.Module):
    """relu(x + refine(x)), refine = 1x1 c->c/r, BN, ReLU, 3x3 c/r->c/r, BN, ReLU, 1x1 c/r->c, BN."""

    def __init__(self, channels: int, reduction_ratio: int = 4) -> None:
        super().__init__()
        mid = channels // reduction_ratio
        self.refine = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.refine(x))


def _sobel_conv(channels: int, taps) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    conv.weight.requires_grad_(False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(taps).expand(channels, channels, 3, 3))
    return conv


def safe_magnitude(gx: Tensor, gy: Tensor) -> Tensor:
    """sqrt(gx^2 + gy^2) with gradient 0 (not NaN) where both are zero."""
    sq = gx * gx + gy * gy
    nonzero = sq > 0
    return torch.where(nonzero, torch.sqrt(torch.where(nonzero, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _check_sobel_weights(module: SGE, incompatible_keys: object) -> None:
    # The channel-sum identity holds only while every [out, in] slice is the same kernel.
    for name in ("sobel_x", "sobel_y"):
        w = getattr(module, name).weight
        if not torch.equal(w, w[:1, :1].expand_as(w)):
            raise ValueError(
                f"{name}.weight: expected the same 3x3 kernel in every [out, in] slice (fixed Sobel "
                "weights), got differing slices"
            )


class SGE(nn.Module):
    """Structure-guidance extractor, ``forward(x4, x1) -> (edge_logits, guidance)`` at x1's size.

    ``x4`` are deep (stride 32) features, ``x1`` shallow (stride 4) ones. SGE calls no
    sgdc_conv, so unlike SGDC it takes no ``backend``.
    """

    def __init__(
        self,
        s4_in: int = 2048,
        s1_in: int = 256,
        mid: int = 256,
        guide_ch: int = 16,
        bottleneck: int = 256,
        reduction_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.s4_proj = ConvBNReLU(s4_in, bottleneck)
        self.s1_proj = ConvBNReLU(s1_in, bottleneck)
        # Kept as (bottleneck, bottleneck, 3, 3) weights for checkpoint compatibility; every
        # [out, in] slice is the same Sobel kernel, so the response is computed on the channel sum.
        self.sobel_x = _sobel_conv(bottleneck, SOBEL_X)
        self.sobel_y = _sobel_conv(bottleneck, SOBEL_Y)
        self.refine4 = BottleneckRefiner(bottleneck, reduction_ratio)
        self.refine1 = BottleneckRefiner(bottleneck, reduction_ratio)
        self.fuse = ConvBNReLU(2 * bottleneck, mid, 3)
        self.out_edge_map = nn.Conv2d(mid, 1, 1, bias=False)
        self.out_guidance = nn.Conv2d(mid, guide_ch, 1, bias=False)
        self.register_load_state_dict_post_hook(_check_sobel_weights)

    def sobel_gate(self, s: Tensor) -> Tensor:
        """sigmoid(|Sobel(s)|): one channel, equal to every channel of the dense convolution."""
        total = s.sum(dim=1, keepdim=True)
        gx = F.conv2d(total, self.sobel_x.weight[:1, :1], padding=1)
        gy = F.conv2d(total, self.sobel_y.weight[:1, :1], padding=1)
        return torch.sigmoid(safe_magnitude(gx, gy))

    def apply_sobel(self, s: Tensor, refiner: nn.Module) -> Tensor:
        return refiner(self.sobel_gate(s) * s)

    def forward(self, x4: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        s4 = self.apply_sobel(self.s4_proj(x4), self.refine4)
        s1 = self.apply_sobel(self.s1_proj(x1), self.refine1)
        s4 = F.interpolate(s4, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        f = self.fuse(torch.cat([s4, s1], dim=1))
        return self.out_edge_map(f), self.out_guidance(f)
