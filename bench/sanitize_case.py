"""A small forward+backward of the `cuda` backend for compute-sanitizer (memcheck, racecheck).

Covers every kernel variant (backend="cuda@<variant>"), both layouts, gate and no gate, a
specialised K (3, 7) and the generic one (9), borders, a channel count that is not a multiple of
the shared-memory chunk, partial tiles, and a launch over 48 KB of shared memory (channels_last
bf16); then window_conv's other configurations (dilated and clamped windows, raw weights, K up
to 17). Each variant runs the configurations it computes (Backend.runs): v1 and v3 sgdc_conv's
only, v2 every one.

    compute-sanitizer --tool memcheck python bench/sanitize_case.py
"""

import sys

import torch

from sgdc_kernels import window_conv
from sgdc_kernels.registry import get_backend


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cases = [  # (B, C, H, W, heads, K, channels_last, gate, dtype[, dilation, border, normalize])
        (1, 12, 9, 37, 2, 3, False, True, torch.float32),
        (1, 12, 9, 37, 2, 3, True, False, torch.bfloat16),
        (1, 6, 5, 11, 3, 9, True, True, torch.float16),
        (1, 6, 5, 11, 3, 9, False, False, torch.float32),
        (1, 40, 11, 35, 2, 7, True, True, torch.bfloat16),
        # window_conv's other configurations
        (1, 12, 9, 37, 2, 3, False, True, torch.float32, 2, "clamp", None),
        (1, 12, 18, 23, 2, 17, True, False, torch.bfloat16, 1, "clamp", None),
        (1, 6, 11, 13, 3, 5, False, False, torch.float16, 2, "zero", "softmax"),
        (1, 40, 15, 35, 2, 7, True, True, torch.bfloat16, 1, "clamp", "softmax"),
    ]
    backend = get_backend("cuda")
    for variant in backend.variants:
        for case in cases:
            dilation, border, normalize = (*case[9:], 1, "zero", "softmax")[:3]
            if backend.runs(variant, dilation, border == "clamp", normalize == "softmax"):
                run(f"cuda@{variant}", *case)
    return 0


def run(backend, B, C, H, W, G, K, cl, gated, dtype, dilation=1, border="zero", normalize="softmax"):
    fmt = torch.channels_last if cl else torch.contiguous_format

    def make(channels):
        return torch.randn(B, channels, H, W, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()

    x, k = make(C), make(G * K * K)
    g = make(C) if gated else None
    mode = dict(dilation=dilation, border=border, normalize=normalize)
    out = window_conv(x, k, g, kernel_size=K, num_heads=G, backend=backend, **mode)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print(f"ok {backend} B={B} C={C} H={H} W={W} G={G} K={K} channels_last={cl} gate={gated} {dtype} {mode}")


if __name__ == "__main__":
    sys.exit(main())
