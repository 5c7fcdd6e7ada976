"""A small forward+backward of the `cuda` backend for compute-sanitizer (memcheck, racecheck).

Covers every kernel variant (SGDC_CUDA_VARIANT), both layouts, gate and no gate, a specialised
K (3, 7) and the generic one (9), borders, a channel count that is not a multiple of the
shared-memory chunk, partial tiles, and a launch over 48 KB of shared memory (channels_last bf16);
then window_conv's other configurations (dilated and clamped windows, raw weights, K up to 17),
which every variant runs with v2's group-space kernels, once.

    compute-sanitizer --tool memcheck python bench/sanitize_case.py
"""

import os
import sys

import torch

from sgdc_kernels import window_conv


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cases = [  # (B, C, H, W, heads, K, channels_last, gate, dtype)
        (1, 12, 9, 37, 2, 3, False, True, torch.float32),
        (1, 12, 9, 37, 2, 3, True, False, torch.bfloat16),
        (1, 6, 5, 11, 3, 9, True, True, torch.float16),
        (1, 6, 5, 11, 3, 9, False, False, torch.float32),
        (1, 40, 11, 35, 2, 7, True, True, torch.bfloat16),
    ]
    from sgdc_kernels._C import VARIANTS

    for variant in VARIANTS.split(","):
        os.environ["SGDC_CUDA_VARIANT"] = variant
        for case in cases:
            run(variant, *case)
    os.environ.pop("SGDC_CUDA_VARIANT")
    configurations = [  # (B, C, H, W, heads, K, channels_last, gate, dtype, dilation, border, normalize)
        (1, 12, 9, 37, 2, 3, False, True, torch.float32, 2, "clamp", None),
        (1, 12, 18, 23, 2, 17, True, False, torch.bfloat16, 1, "clamp", None),
        (1, 6, 11, 13, 3, 5, False, False, torch.float16, 2, "zero", "softmax"),
        (1, 40, 15, 35, 2, 7, True, True, torch.bfloat16, 1, "clamp", "softmax"),
    ]
    for case in configurations:
        run("default", *case)
    return 0


def run(variant, B, C, H, W, G, K, cl, gated, dtype, dilation=1, border="zero", normalize="softmax"):
    fmt = torch.channels_last if cl else torch.contiguous_format

    def make(channels):
        return torch.randn(B, channels, H, W, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()

    x, k = make(C), make(G * K * K)
    g = make(C) if gated else None
    mode = dict(dilation=dilation, border=border, normalize=normalize)
    out = window_conv(x, k, g, kernel_size=K, num_heads=G, backend="cuda", **mode)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print(f"ok {variant} B={B} C={C} H={H} W={W} G={G} K={K} channels_last={cl} gate={gated} {dtype} {mode}")


if __name__ == "__main__":
    sys.exit(main())
