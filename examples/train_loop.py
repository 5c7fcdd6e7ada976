"""A minimal training loop with an SGDC block: fits the block to a fixed random target.

python examples/train_loop.py              # CPU or GPU, backend "auto"
python examples/train_loop.py --backend torch --steps 50
"""

import argparse

import torch
import torch.nn.functional as F

from sgdc_kernels import SGDC, available_backends


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="auto", help=f"auto or one of {available_backends()}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    block = SGDC(dim=32, guide_ch=8, num_heads=4, kernel_size=7, ls_init=1.0, backend=args.backend).to(device)
    model = torch.compile(block, fullgraph=True) if args.compile else block
    opt = torch.optim.AdamW(block.parameters(), lr=3e-3)
    x = torch.randn(4, 32, 32, 32, device=device)
    guidance = torch.randn(4, 8, 16, 16, device=device)
    target = torch.randn(4, 32, 32, 32, device=device)
    amp = torch.bfloat16 if device == "cuda" else None
    for step in range(args.steps):
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = F.mse_loss(model(x, guidance).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
