"""A ContMix-style block on `sgdc_kernels.compat.na2d_av`, NATTEN's removed 2-D neighborhood op.

ContMix (the context-mixing dynamic convolution of OverLoCK, CVPR 2025) gives every pixel its own
kernels, computed from how its feature relates to a coarse summary of a context map: each pixel's
query is compared with P*P pooled context tokens, a linear layer turns those P*P affinities into
the taps of a small and of a large kernel, a softmax normalizes each kernel, and two `na2d_av`
calls aggregate half of the channels with each. NATTEN places windows that would leave the image
inside it (clamped windows), and so does `na2d_av` here.

    python examples/contmix_block.py                     # CPU or GPU, backend "auto"
    python examples/contmix_block.py --backend torch --size 32

It checks both `na2d_av` calls of the block against `sgdc_kernels.testing.gather_reference` (the
window sum written from its definition, in float64) and times the block's forward+backward with
the chosen backend and with `unfold` (the F.unfold + replicate-pad formulation).
"""

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from sgdc_kernels import available_backends
from sgdc_kernels.compat import na2d_av
from sgdc_kernels.registry import BACKEND_NAMES, resolve_backend
from sgdc_kernels.testing import gather_reference


class ContMixBlock(nn.Module):
    """Dynamic kernels from query x context affinities, a small and a large window, residual output.

    Args:
        dim: channels of ``x``; ``2 * num_heads`` must divide it (half the channels go through each
            kernel, split into ``num_heads`` heads).
        ctx_dim: channels of the context map.
        num_heads: heads per kernel; every head has its own weights at every pixel.
        small_kernel, large_kernel: odd window sizes. The feature map must be at least
            ``large_kernel`` pixels on each side (OverLoCK upsamples smaller maps first).
        pool: the context is pooled to ``pool x pool`` tokens.
    """

    def __init__(self, dim, ctx_dim, num_heads=4, small_kernel=5, large_kernel=13, pool=7, backend="auto"):
        super().__init__()
        if dim % (2 * num_heads):
            raise ValueError(f"dim: {dim} is not a multiple of 2 * num_heads = {2 * num_heads}")
        self.num_heads, self.kernels, self.backend = num_heads, (small_kernel, large_kernel), backend
        qk_dim = dim // 2
        self.scale = (qk_dim // num_heads) ** -0.5
        self.query = nn.Conv2d(dim, qk_dim, 1, bias=False)
        self.key = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Conv2d(ctx_dim, qk_dim, 1, bias=False))
        # P*P affinities of a pixel -> the taps of both kernels (shared by the heads)
        self.to_taps = nn.Linear(pool * pool, small_kernel**2 + large_kernel**2)
        self.value = nn.Conv2d(dim, dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)

    def mix_inputs(self, x, ctx):
        """The arguments of the two na2d_av calls: [(attn, value, kernel_size), ...] in NATTEN's
        layout, attn (B, heads, H, W, K*K) (softmaxed) and value (B, heads, H, W, head_dim)."""
        B, C, H, W = x.shape
        G = self.num_heads
        q = (self.query(x) * self.scale).reshape(B, G, -1, H * W)
        k = self.key(ctx).flatten(2).reshape(B, G, q.shape[2], -1)
        affinity = torch.einsum("bgcn,bgcl->bgnl", q, k)  # (B, G, H*W, P*P)
        taps = self.to_taps(affinity).reshape(B, G, H, W, -1)
        logits = taps.split([K * K for K in self.kernels], dim=-1)
        # (B, 2*G*c, H, W) -> two (B, G, H, W, c): the first half of the channels, then the second
        values = self.value(x).reshape(B, 2, G, C // (2 * G), H, W).permute(1, 0, 2, 4, 5, 3)
        return [(w.softmax(dim=-1), v, K) for w, v, K in zip(logits, values, self.kernels)]

    def forward(self, x, ctx):
        B, C, H, W = x.shape
        mixed = [na2d_av(attn, v, K, backend=self.backend) for attn, v, K in self.mix_inputs(x, ctx)]
        y = torch.cat(mixed, dim=1)  # (B, 2*G, H, W, c)
        return x + self.out(y.permute(0, 1, 4, 2, 3).reshape(B, C, H, W))


def check_against_the_definition(block, x, ctx) -> float:
    """Largest difference between each na2d_av call and the float64 gather of its definition."""
    worst = 0.0
    with torch.no_grad():
        for attn, v, K in block.mix_inputs(x, ctx):
            B, G, H, W, c = v.shape
            got = na2d_av(attn, v, K, backend=block.backend)
            # NATTEN layout -> window_conv's: heads' channels side by side, taps as channels
            xs = v.permute(0, 1, 4, 2, 3).reshape(B, G * c, H, W)
            weights = attn.permute(0, 1, 4, 2, 3).reshape(B, G * K * K, H, W)
            want = gather_reference(xs, weights, None, K, G, dict(border="clamp", normalize=None))
            want = want.reshape(B, G, c, H, W).permute(0, 1, 3, 4, 2)
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
            worst = max(worst, (got.double() - want).abs().max().item())
    return worst


def time_forward_backward(block, x, ctx, repeats: int) -> float:
    """Median milliseconds of forward+backward (after one untimed call)."""
    times = []
    for i in range(repeats + 1):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        block(x, ctx).square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def machine(device: str) -> str:
    """What the timings ran on, in words."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"the CPU, {torch.get_num_threads()} threads ({platform.machine()}, torch {torch.__version__})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES), help="default: auto")
    parser.add_argument("--size", type=int, default=24, help="height and width of the feature map (default 24)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward calls (default 5)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.backend != "auto" and args.backend not in available_backends(device):
        parser.error(f"--backend: {args.backend!r} does not run on {device} here; available: "
                     + ", ".join(available_backends(device)))  # fmt: skip
    large = 13
    if args.size < large:
        parser.error(f"--size: the large kernel ({large}) needs a feature map of at least {large} pixels")
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive number, got {args.repeats}")

    torch.manual_seed(0)
    dim, ctx_dim, heads = 64, 32, 4
    block = ContMixBlock(dim, ctx_dim, num_heads=heads, large_kernel=large, backend=args.backend).to(device)
    x = torch.randn(2, dim, args.size, args.size, device=device)
    ctx = F.interpolate(torch.randn(2, ctx_dim, 8, 8, device=device), size=x.shape[2:], mode="bilinear")
    out = block(x, ctx)
    print(f"ContMixBlock(dim={dim}, ctx_dim={ctx_dim}, heads={heads}, kernels={block.kernels}) on {device}: "
          f"x {tuple(x.shape)} -> out {tuple(out.shape)}")  # fmt: skip
    error = check_against_the_definition(block, x, ctx)
    print(f"both na2d_av calls match the float64 definition (largest difference {error:.1e})")
    print(f"timing on {machine(device)}, float32, one run:")
    for backend in dict.fromkeys([args.backend, "unfold"]):
        block.backend = backend
        ms = time_forward_backward(block, x, ctx, args.repeats)
        name = resolve_backend(backend, device, x.dtype)
        label = backend if name == backend else f"{backend} ({name})"
        print(f"forward+backward of the block, backend {label}: {ms:.2f} ms (median of {args.repeats})")
    if device == "cpu":
        print(
            "note: on a CPU, backend 'torch' makes one pass over memory per tap (13*13 for the large "
            "kernel, gathered rows and columns for its clamped windows), so it may be no faster than "
            "unfold here; the fused kernels run on NVIDIA GPUs. A single timing on a shared machine "
            "is noisy: python bench/run.py --shapes overlock measures with medians and spread."
        )


if __name__ == "__main__":
    main()
