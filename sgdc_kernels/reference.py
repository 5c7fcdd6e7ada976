"""Pure PyTorch implementations of the window sum behind sgdc_conv (definition: docs/op.md).

Two formulations live here, and nowhere else:

* :func:`unfold_forward` is the paper's formulation (``F.unfold`` + softmax + einsum), generalized
  to dilation, NATTEN's clamped windows and unnormalized weights. It is differentiable by autograd
  and serves as the correctness oracle of every other backend. It materializes a tensor ``K*K``
  times larger than ``x``.
* :func:`shift_forward` / :func:`shift_backward` never build that tensor: they accumulate the
  ``K*K`` shifted (or, with clamped windows, gathered) views of ``x`` weighted per pixel, with a
  hand-written backward whose memory stays proportional to the inputs. This is the portable
  ``torch`` backend.

Every function takes the configuration as ``kernel_size, num_heads, dilation, clamp, softmax``
(``sgdc_conv`` is ``dilation=1, clamp=False, softmax=True``) and already validated, dense
(contiguous or channels_last) tensors; the public entry points in :mod:`sgdc_kernels.ops` validate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .custom_ops import memory_format_of

Tensor = torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the 16-bit types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def window_starts(n: int, kernel_size: int, dilation: int = 1, clamp: bool = False, device=None) -> Tensor:
    """Image index of the first tap of each pixel's window along an axis of length ``n`` (a 1-D
    int64 tensor).

    Centred windows (``clamp=False``) start at ``i - (K//2)*dilation`` and may leave the image.
    Clamped windows (NATTEN's rule) stay inside: the pixels ``i = m + dilation*g`` with the same
    residue ``m`` form an undilated axis of length ``L = ceil((n - m) / dilation)`` on which the
    window starts at ``min(max(g - K//2, 0), L - K)``; this needs ``n >= K * dilation``. Tensor
    arithmetic on ``arange(n)``, so that ``torch.export`` keeps ``n`` symbolic.
    """
    r = kernel_size // 2
    i = torch.arange(n, device=device)
    if not clamp:
        return i - r * dilation
    m, g = i % dilation, i // dilation
    length = (n - m + dilation - 1) // dilation
    return m + dilation * torch.minimum((g - r).clamp(min=0), length - kernel_size)


def _tap_weights(weights: Tensor, B: int, G: int, KK: int, softmax: bool, dtype: torch.dtype) -> Tensor:
    """(B, G, K*K, H, W) per-pixel weights: the softmax of the logits, or the weights as given."""
    w = weights.reshape(B, G, KK, *weights.shape[2:]).to(dtype)
    return w.softmax(dim=2) if softmax else w


def unfold_windows(x: Tensor, kernel_size: int, dilation: int = 1, clamp: bool = False) -> Tensor:
    """Every pixel's window of ``x`` through ``F.unfold``: (B, C*K*K, H, W), channel c*K*K + t
    holding tap t of channel c (zeros outside the image for centred windows).

    With clamped windows, ``x`` is unfolded without padding (every window inside the image) and
    each pixel takes the window at its start: for ``dilation=1`` that is the unfolded tensor
    replicate-padded by ``K//2`` (the fallback OverLoCK-style code uses), for larger dilations the
    windows at NATTEN's starts.
    """
    B, C, H, W = x.shape
    K, d = kernel_size, dilation
    if not clamp:
        return F.unfold(x, K, dilation=d, padding=(K // 2) * d).view(B, C * K * K, H, W)
    cols = F.unfold(x, K, dilation=d).view(B, C * K * K, H - (K - 1) * d, W - (K - 1) * d)
    if d == 1:
        return F.pad(cols, (K // 2,) * 4, mode="replicate")
    rows = window_starts(H, K, d, True, x.device)
    columns = window_starts(W, K, d, True, x.device)
    return cols.index_select(2, rows).index_select(3, columns)


def unfold_dots(grad_out: Tensor, x: Tensor, kernel_size: int, dilation: int = 1, clamp: bool = False) -> Tensor:
    """The unfold formulation of the window sum's weight pass for one head: per pixel p and tap t,
    ``sum_c grad_out[c, p] * x[c, tap_t(p)]`` (docs/op.md, dP), shaped (B, K*K, H, W). With
    ``grad_out`` NATTEN's query and ``x`` its key this is ``na2d_qk``; differentiable by autograd
    (the ``unfold`` backend's formulation of it)."""
    B, C, H, W = x.shape
    if x.numel() == 0:
        return x.new_zeros(B, kernel_size**2, H, W) + 0 * (grad_out.sum() + x.sum())
    cols = unfold_windows(x, kernel_size, dilation, clamp).view(B, C, kernel_size**2, H, W)
    return torch.einsum("bcthw,bchw->bthw", cols, grad_out)


def unfold_forward(
    x: Tensor,
    weights: Tensor,
    gate: Tensor | None,
    kernel_size: int,
    num_heads: int,
    dilation: int = 1,
    clamp: bool = False,
    softmax: bool = True,
) -> Tensor:
    """The paper's formulation: ``F.unfold`` (zero padding; clamped windows: :func:`unfold_windows`),
    weights over the taps, window sum."""
    B, C, H, W = x.shape
    K, G = kernel_size, num_heads
    if x.numel() == 0:  # F.unfold rejects empty spatial dims; keep the graph to every input
        out = x + 0 * weights[:, :1]
        return out * torch.sigmoid(gate) if gate is not None else out
    cols = unfold_windows(x, K, dilation, clamp).reshape(B, G, C // G, K * K, H * W)
    w = _tap_weights(weights, B, G, K * K, softmax, x.dtype).reshape(B, G, K * K, H * W)
    out = torch.einsum("bgctn,bgtn->bgcn", cols, w).reshape(B, C, H, W)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return out.contiguous(memory_format=memory_format_of(x))


class _Taps:
    """The K*K taps of a configuration as views of ``x`` (and the matching scatter for dx).

    Centred windows pad ``x`` with ``(K//2)*dilation`` zeros once and take strided slices; clamped
    windows gather rows and columns at each tap's index (they never leave the image).
    """

    def __init__(self, shape5, kernel_size: int, dilation: int, clamp: bool, device) -> None:
        *_, H, W = shape5
        self.K, self.d, self.clamp, self.H, self.W = kernel_size, dilation, clamp, H, W
        self.pad = 0 if clamp else (kernel_size // 2) * dilation
        if clamp:
            self.rows = window_starts(H, kernel_size, dilation, True, device)
            self.cols = window_starts(W, kernel_size, dilation, True, device)

    def __iter__(self):
        for u in range(self.K):
            for v in range(self.K):
                yield u * self.K + v, u * self.d, v * self.d

    def padded(self, t: Tensor) -> Tensor:
        return F.pad(t, (self.pad,) * 4) if self.pad else t

    def view(self, tp: Tensor, du: int, dv: int) -> Tensor:
        """Tap (du, dv) of every pixel, from ``tp = padded(t)``."""
        if not self.clamp:
            return tp[..., du : du + self.H, dv : dv + self.W]
        return tp[..., self.rows + du, :][..., self.cols + dv]

    def scatter_add(self, acc: Tensor, du: int, dv: int, values: Tensor) -> None:
        """``acc`` (padded like ``padded``) += ``values`` moved back to the tap's positions."""
        if not self.clamp:
            acc[..., du : du + self.H, dv : dv + self.W].add_(values)
            return
        by_col = torch.zeros_like(acc).index_add_(-1, self.cols + dv, values)
        acc.index_add_(-2, self.rows + du, by_col)


def _prepare(x: Tensor, weights: Tensor, kernel_size: int, num_heads: int, dilation: int, clamp: bool, softmax: bool):
    B, C, H, W = x.shape
    G = num_heads
    acc = accumulation_dtype(x.dtype)
    # (B, G, 1, K*K, H, W): the singleton broadcasts over the head's channels.
    w = _tap_weights(weights, B, G, kernel_size**2, softmax, acc).unsqueeze(2)
    taps = _Taps((B, G, C // G, H, W), kernel_size, dilation, clamp, x.device)
    return w, taps, taps.padded(x.reshape(B, G, C // G, H, W))


def shift_forward(
    x: Tensor,
    weights: Tensor,
    gate: Tensor | None,
    kernel_size: int,
    num_heads: int,
    dilation: int = 1,
    clamp: bool = False,
    softmax: bool = True,
) -> Tensor:
    """Shift-and-accumulate forward: ``sum_t w[t] * tap_t(x)``, then the gate. Differentiable."""
    B, C, H, W = x.shape
    w, taps, xp = _prepare(x, weights, kernel_size, num_heads, dilation, clamp, softmax)
    y = torch.zeros(B, num_heads, C // num_heads, H, W, dtype=w.dtype, device=x.device)
    for t, du, dv in taps:
        y.addcmul_(w[:, :, :, t], taps.view(xp, du, dv))
    y = y.reshape(B, C, H, W)
    if gate is not None:
        y = y * torch.sigmoid(gate.to(y.dtype))
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def shift_backward(
    grad_out: Tensor,
    x: Tensor,
    weights: Tensor,
    gate: Tensor | None,
    kernel_size: int,
    num_heads: int,
    dilation: int = 1,
    clamp: bool = False,
    softmax: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`shift_forward` by the formulas of docs/op.md, one tap at a time.

    Peak extra memory is a few tensors of the size of ``x`` (fp32) plus one of the size of
    ``weights``; the ``K*K``-fold unfold is never built.
    """
    B, C, H, W = x.shape
    K, G = kernel_size, num_heads
    w, taps, xp = _prepare(x, weights, K, G, dilation, clamp, softmax)
    acc = w.dtype
    shape5 = (B, G, C // G, H, W)
    g_y = grad_out.reshape(shape5).to(acc)
    if gate is not None:
        s = torch.sigmoid(gate.reshape(shape5).to(acc))
        g_y = g_y * s
        y = torch.zeros(shape5, dtype=acc, device=x.device)
    dw = torch.empty(B, G, K * K, H, W, dtype=acc, device=x.device)
    dxp = taps.padded(torch.zeros(shape5, dtype=acc, device=x.device))
    for t, du, dv in taps:
        x_t = taps.view(xp, du, dv)
        w_t = w[:, :, :, t]
        if gate is not None:
            y.addcmul_(w_t, x_t)
        # dw[t] = sum over the head's channels of g_y * tap_t(x)
        torch.sum(g_y * x_t, dim=2, out=dw[:, :, t])
        # dx: move W[t] * g_y back to the positions tap t read.
        taps.scatter_add(dxp, du, dv, w_t * g_y)
    w = w.squeeze(2)
    if softmax:  # through the softmax: dlogits = P * (dP - sum_t P dP)
        dw = w * (dw - (w * dw).sum(dim=2, keepdim=True))
    p = taps.pad
    dx = dxp[..., p : p + H, p : p + W].reshape(B, C, H, W)
    fmt = memory_format_of(x)
    dx = dx.to(x.dtype).contiguous(memory_format=fmt)
    dweights = dw.reshape(weights.shape).to(weights.dtype).contiguous(memory_format=fmt)
    dgate = None
    if gate is not None:
        dgate = (grad_out.reshape(shape5).to(acc) * y * s * (1 - s)).reshape(B, C, H, W)
        dgate = dgate.to(gate.dtype).contiguous(memory_format=fmt)
    return dx, dweights, dgate
