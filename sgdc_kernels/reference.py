"""Pure PyTorch implementations of sgdc_conv (definition: docs/op.md).

Two formulations live here, and nowhere else:

* :func:`unfold_forward` is the paper's formulation (``F.unfold`` + softmax + einsum). It is
  differentiable by autograd and serves as the correctness oracle of every other backend. It
  materializes a tensor ``K*K`` times larger than ``x``.
* :func:`shift_forward` / :func:`shift_backward` never build that tensor: they pad ``x`` once and
  accumulate the ``K*K`` shifted views weighted by the softmax, with a hand-written backward whose
  memory stays proportional to the inputs. This is the portable ``torch`` backend.

All functions take already validated, dense (contiguous or channels_last) tensors; the public entry
point :func:`sgdc_kernels.sgdc_conv` does the validation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import memory_format_of

Tensor = torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the 16-bit types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def unfold_forward(x: Tensor, kernel: Tensor, gate: Tensor | None, kernel_size: int, num_heads: int) -> Tensor:
    """The paper's formulation: ``F.unfold`` with zero padding, softmax over the taps, window sum."""
    B, C, H, W = x.shape
    K, G = kernel_size, num_heads
    if x.numel() == 0:  # F.unfold rejects empty spatial dims; keep the graph to every input
        out = x + 0 * kernel[:, :1]
        return out * torch.sigmoid(gate) if gate is not None else out
    cols = F.unfold(x, K, padding=K // 2).view(B, G, C // G, K * K, H * W)
    probs = kernel.reshape(B, G, K * K, H * W).softmax(dim=2)
    out = torch.einsum("bgctn,bgtn->bgcn", cols, probs).reshape(B, C, H, W)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return out.contiguous(memory_format=memory_format_of(x))


def _taps(kernel_size: int):
    for u in range(kernel_size):
        for v in range(kernel_size):
            yield u * kernel_size + v, u, v


def _softmax_and_padded_input(x: Tensor, kernel: Tensor, kernel_size: int, num_heads: int):
    B, C, H, W = x.shape
    K, G, r = kernel_size, num_heads, kernel_size // 2
    acc = accumulation_dtype(x.dtype)
    # (B, G, 1, K*K, H, W): the singleton broadcasts over the head's channels.
    probs = kernel.reshape(B, G, K * K, H, W).to(acc).softmax(dim=2).unsqueeze(2)
    xpad = F.pad(x, (r, r, r, r)).reshape(B, G, C // G, H + 2 * r, W + 2 * r)
    return probs, xpad


def shift_forward(x: Tensor, kernel: Tensor, gate: Tensor | None, kernel_size: int, num_heads: int) -> Tensor:
    """Shift-and-accumulate forward: ``sum_t P[t] * shift_t(x)``, then the gate. Differentiable."""
    B, C, H, W = x.shape
    probs, xpad = _softmax_and_padded_input(x, kernel, kernel_size, num_heads)
    y = torch.zeros(B, num_heads, C // num_heads, H, W, dtype=probs.dtype, device=x.device)
    for t, u, v in _taps(kernel_size):
        y.addcmul_(probs[:, :, :, t], xpad[..., u : u + H, v : v + W])
    y = y.reshape(B, C, H, W)
    if gate is not None:
        y = y * torch.sigmoid(gate.to(y.dtype))
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def shift_backward(
    grad_out: Tensor,
    x: Tensor,
    kernel: Tensor,
    gate: Tensor | None,
    kernel_size: int,
    num_heads: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`shift_forward` by the formulas of docs/op.md, one tap at a time.

    Peak extra memory is a few tensors of the size of ``x`` (fp32) plus one of the size of
    ``kernel``; the ``K*K``-fold unfold is never built.
    """
    B, C, H, W = x.shape
    K, G, r = kernel_size, num_heads, kernel_size // 2
    probs, xpad = _softmax_and_padded_input(x, kernel, K, G)
    acc = probs.dtype
    shape5 = (B, G, C // G, H, W)
    g_y = grad_out.reshape(shape5).to(acc)
    if gate is not None:
        s = torch.sigmoid(gate.reshape(shape5).to(acc))
        g_y = g_y * s
        y = torch.zeros(shape5, dtype=acc, device=x.device)
    dprobs = torch.empty(B, G, K * K, H, W, dtype=acc, device=x.device)
    dxpad = torch.zeros(B, G, C // G, H + 2 * r, W + 2 * r, dtype=acc, device=x.device)
    for t, u, v in _taps(K):
        x_t = xpad[..., u : u + H, v : v + W]
        p_t = probs[:, :, :, t]
        if gate is not None:
            y.addcmul_(p_t, x_t)
        # dP[t] = sum over the head's channels of g_y * shift_t(x)
        torch.sum(g_y * x_t, dim=2, out=dprobs[:, :, t])
        # dx: scatter P[t] * g_y back to the shifted window (a gather on the padded grid).
        dxpad[..., u : u + H, v : v + W].addcmul_(p_t, g_y)
    probs = probs.squeeze(2)
    dkernel = probs * (dprobs - (probs * dprobs).sum(dim=2, keepdim=True))
    dx = dxpad[..., r : r + H, r : r + W].reshape(B, C, H, W)
    fmt = memory_format_of(x)
    dx = dx.to(x.dtype).contiguous(memory_format=fmt)
    dkernel = dkernel.reshape(kernel.shape).to(kernel.dtype).contiguous(memory_format=fmt)
    dgate = None
    if gate is not None:
        dgate = (grad_out.reshape(shape5).to(acc) * y * s * (1 - s)).reshape(B, C, H, W)
        dgate = dgate.to(gate.dtype).contiguous(memory_format=fmt)
    return dx, dkernel, dgate
