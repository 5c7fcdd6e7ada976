"""A small forward+backward of the `cuda` backend for compute-sanitizer (memcheck, racecheck).

Covers both layouts, gate and no gate, a specialised K (3) and the generic one (9), borders,
a channel count that is not a multiple of the shared-memory chunk, and a partial tile.

    compute-sanitizer --tool memcheck python bench/sanitize_case.py
"""

import sys

import torch

from sgdc_kernels import sgdc_conv


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
    ]
    for B, C, H, W, G, K, cl, gated, dtype in cases:
        fmt = torch.channels_last if cl else torch.contiguous_format
        make = lambda c: torch.randn(B, c, H, W, device="cuda", dtype=dtype).contiguous(  # noqa: E731
            memory_format=fmt
        ).requires_grad_()
        x, k = make(C), make(G * K * K)
        g = make(C) if gated else None
        out = sgdc_conv(x, k, g, kernel_size=K, num_heads=G, backend="cuda")
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"ok B={B} C={C} H={H} W={W} G={G} K={K} channels_last={cl} gate={gated} {dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
