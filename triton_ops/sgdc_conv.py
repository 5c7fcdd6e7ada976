"""Triton kernels for window_conv and its SGDC configuration sgdc_conv (definition and gradients:
docs/op.md): forward, backward, and their torch.library ops, in two kernel families selected at
each call by SGDC_TRITON_VARIANT.

Notation: B batch, C channels, G heads, Cg = C/G channels per head, K odd window, KK = K*K taps,
R = K//2, HW = H*W pixels, D dilation. ``p`` is a flattened pixel index i*W + j; with sgdc_conv's
configuration tap t = u*K + v reads x at pixel (i + u - R, j + v - R), that is at flat offset
``(u - R)*W + (v - R)`` when it is in the image.

Configurations. Every kernel takes the operator's ``dilation``, ``clamp`` and ``softmax`` as the
constexpr arguments D, CLAMP and SOFTMAX (defaults: sgdc_conv's 1, False, True): taps D pixels
apart; windows centred with zeros outside the image, or clamped inside it (NATTEN's rule: along
an axis, the pixels m + D*g of residue m form an undilated axis of length L = ceil((n - m)/D) on
which g's window starts at min(max(g - R, 0), L - K)); weights as logits with the softmax inside,
or used as given (then no log-sum-exp is computed or stored, and dkernel is dP). With the
defaults, the v1 kernels and the band forward compile to the same SASS as before these switches
existed, the band backward kernels to loops of the same length or shorter (bench/NOTES_triton.md).
Every variant runs every configuration with its own kernels; none is routed elsewhere.

Variants (:data:`VARIANTS`, the first is the default; :func:`kernel_family` maps a variant and a
dtype to the kernels it runs):
  - "v2dot16": the band kernels for 16-bit inputs, the taps kernels for float32;
  - "v2dot": the band kernels for every dtype (float32 products in tf32x3);
  - "v1": the taps kernels for every dtype.

Memory layout: each tensor is dense, NCHW or channels_last, so the offset of pixel p is ``p * sp``
with one pixel stride ``sp`` (W's stride, or H's when W == 1). Every kernel takes the (batch,
channel, pixel) strides of the x-like tensors (x, gate, out, grad_out, dx, dgate, g_y) and of the
kernel-like ones (kernel, dkernel, dP), so one code path serves both memory formats.

Taps kernels (v1). A 1-D grid of (pixel tile, b*G + h) pairs, pixel tiles fastest; a tile is
BLOCK_P flat pixels of one batch item and head. Each pixel's window starts at an offset from it
(-R*D when centred; per pixel, computed once per tile, when clamped), tap (u, v) D*(u, v) further.
A program computes the softmax statistics of its pixels once (the log-sum-exp over the KK
logits), keeps them in registers, and loops over the head's channels in blocks of BLOCK_C, adding
one shifted (BLOCK_C, BLOCK_P) load per tap; the probability of a tap is recomputed as
exp(logit - lse) where it is needed, so no K*K-fold tensor ever exists. Backward, deterministic
(no atomics), in two kernels:
  1. ``_sgdc_bwd_taps_kernel``, over output pixels: g_y = dout * sigmoid(gate); for every tap,
     dP[t] = sum_c g_y * x_t (accumulated over channel blocks in an fp32 buffer of kernel's shape,
     owned by the program); y = sum_t P[t] * x_t gives dgate = dout * y * s * (1 - s); then
     dkernel = P * (dP - sum_t P * dP). It also writes the per-pixel log-sum-exp (B*G*HW floats)
     and, when there is a gate, g_y (x's size) for kernel 2.
  2. ``_sgdc_bwd_dx_kernel``, a gather over input pixels q:
     dx[c, q] = sum_t P[t, q - off_t] * g_y[c, q - off_t], with P rebuilt from kernel and the lse.
     Clamped windows: near a border more than K output pixels per axis read q (up to 2K - 1), so
     the gather scans the (2K - 1)^2 output pixels of q's residue class around it, masked to those
     whose window holds q, and skips the candidate rows that hold no window over any pixel of the
     tile (K + rows - 1 of the 2K - 1 remain for a tile of a few rows): about 2x the work of
     centred windows at K = 17.
Block sizes come from :func:`_blocks`, a heuristic on (Cg, HW); with SGDC_TRITON_AUTOTUNE=1 the
taps kernels are autotuned instead (once per shape key, cached by triton.autotune).

Band kernels (v2, see the comment above ``_segment_lse``): a program owns a segment of BW = 16
pixels of one image row and one (batch, head); per halo row, one tl.dot of the head's channels'
halo (channels x HALO) with a band matrix of the probabilities (HALO x BW), which the tensor
cores run. The backward is again two kernels, but dP stays in registers (no fp32 scratch): the
first writes dgate, dkernel, the lse and g_y (gated only), the second gathers dx with tl.dot.
With dilation a segment is BW consecutive pixels of one residue class of columns (columns D apart,
strided loads in NCHW); with clamped windows the halo start moves with the windows (a runtime
multiple of 8, which Triton does not prove aligned: no 16-byte vector loads in NCHW), and dx, which
gathers from up to BW + 2K - 2 output columns per segment, gets a halo of next_pow2(BW + 2K + 5)
columns (32 up to K = 5, 64 for K = 7 to 21).

Under TRITON_INTERPRET=1 (CPU tensors, for tests) the blocks are small and fixed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from sgdc_kernels.custom_ops import memory_format_of, register_ops

Tensor = torch.Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("SGDC_TRITON_AUTOTUNE") == "1" and not INTERPRET

# Fixed blocks under the interpreter: the interpreter pays per program and per loop step, so tiny
# test shapes fit one tile (tests shrink these to cover several pixel tiles and channel blocks).
INTERPRET_BLOCKS = {"BLOCK_P": 128, "BLOCK_C": 8}
# The band kernels' smallest legal blocks (tl.dot needs every dimension >= 16).
INTERPRET_DOT_BLOCKS = {"BW": 16, "BLOCK_C": 16}

# Kernel variants, named by the operators' ``variant`` argument (backend="triton@v1"); the first,
# the default, is the one predicted fastest (bench/NOTES_triton.md).
VARIANTS = ("v2dot16", "v2dot", "v1")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _softmax_lse(k_base, skc, skp, offs_p, mask_p, KK: tl.constexpr, BLOCK_P: tl.constexpr, SOFTMAX: tl.constexpr):
    """log(sum_t exp(logit_t)) per pixel, by an online max/sum over the KK taps (fp32); 0
    (unused) with raw weights."""
    if not SOFTMAX:
        return tl.zeros([BLOCK_P], tl.float32)
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_P], tl.float32)
    for t in range(KK):
        logit = tl.load(k_base + t * skc + offs_p * skp, mask=mask_p, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, logit)
        s = s * tl.exp(m - m_new) + tl.exp(logit - m_new)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _pixel_tile(H, W, G, BLOCK_P: tl.constexpr):
    """This program's (b*G + h, b, h) and its BLOCK_P flat pixels: offsets, in-image mask, row, col.
    The 1-D grid enumerates pixel tiles fastest, so programs running together share their halos."""
    tiles = tl.cdiv(H * W, BLOCK_P)
    pid_bh = tl.program_id(0) // tiles
    b = (pid_bh // G).to(tl.int64)
    offs = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < H * W
    return pid_bh, b, pid_bh % G, offs, mask, offs // W, offs % W


@triton.jit
def _shifted(offs, i, j, mask, du, dv, H, W):
    """Flat offsets of the pixels (i + du, j + dv), and where they are inside the image."""
    ii = i + du
    jj = j + dv
    ok = mask & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
    return offs + du * W + dv, ok


@triton.jit
def _clamped_start(g, L, K: tl.constexpr):
    """Window start of group index ``g`` on an undilated axis of length L >= K, NATTEN's rule."""
    return tl.minimum(tl.maximum(g - K // 2, 0), L - K)


@triton.jit
def _clamp_offset(i, n, K: tl.constexpr, D: tl.constexpr):
    """(image index of the first tap) - i for clamped windows along an axis of length n: i is
    group index i // D of residue class i % D, of length L = ceil((n - i % D) / D)."""
    m = i % D
    return m + D * _clamped_start(i // D, (n - m + D - 1) // D, K) - i


@triton.jit
def _prob(tap_ptr, pix, skp, mask, lse):
    """Softmax probability exp(logit - lse) of one tap at pixels ``pix`` (0 where masked)."""
    logit = tl.load(tap_ptr + pix * skp, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, tl.exp(logit - lse), 0.0)


@triton.jit
def _weight(tap_ptr, pix, skp, mask, lse, SOFTMAX: tl.constexpr):
    """The weight of one tap at pixels ``pix`` (0 where masked): :func:`_prob`, or the raw weight."""
    if SOFTMAX:
        return _prob(tap_ptr, pix, skp, mask, lse)
    return tl.load(tap_ptr + pix * skp, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_tile(ptr, offs_c, sxc, pix, sxp, mask_c, mask_pix):
    """The (channels, pixels) tile of an x-like tensor at channels offs_c and flat pixels pix, in
    the tensor's dtype, zero where masked (outside the image)."""
    return tl.load(
        ptr + offs_c[:, None] * sxc + pix[None, :] * sxp, mask=mask_c[:, None] & mask_pix[None, :], other=0.0
    )


@triton.jit
def _load_block(ptr, offs_c, sxc, pix, sxp, mask_c, mask_pix):
    """:func:`_load_tile` in fp32."""
    return _load_tile(ptr, offs_c, sxc, pix, sxp, mask_c, mask_pix).to(tl.float32)


@triton.jit
def _sgdc_fwd_kernel(
    x_ptr, k_ptr, g_ptr, out_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    _pid_bh, b, h, offs_p, mask_p, i, j = _pixel_tile(H, W, G, BLOCK_P)
    k_base = k_ptr + b * skb + h * KK * skc
    lse = _softmax_lse(k_base, skc, skp, offs_p, mask_p, KK, BLOCK_P, SOFTMAX)
    head = b * sxb + h * CG * sxc
    if CLAMP:
        di, dj = _clamp_offset(i, H, K, D), _clamp_offset(j, W, K, D)

    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for u in range(K):
            for v in tl.static_range(K):
                if CLAMP:
                    src, ok = _shifted(offs_p, i, j, mask_p, di + u * D, dj + v * D, H, W)
                else:
                    src, ok = _shifted(offs_p, i, j, mask_p, (u - R) * D, (v - R) * D, H, W)
                prob = _weight(k_base + (u * K + v) * skc, offs_p, skp, mask_p, lse, SOFTMAX)
                acc += prob[None, :] * _load_block(x_ptr + head, offs_c, sxc, src, sxp, mask_c, ok)
        here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
        mask = mask_c[:, None] & mask_p[None, :]
        if HAS_GATE:
            acc = acc * tl.sigmoid(_load_block(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
        tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sgdc_bwd_taps_kernel(
    dout_ptr, x_ptr, k_ptr, g_ptr, dk_ptr, dg_ptr, gy_ptr, dp_ptr, lse_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    pid_bh, b, h, offs_p, mask_p, i, j = _pixel_tile(H, W, G, BLOCK_P)
    k_off = b * skb + h * KK * skc  # shared by kernel, dkernel and the dP buffer
    lse = _softmax_lse(k_ptr + k_off, skc, skp, offs_p, mask_p, KK, BLOCK_P, SOFTMAX)
    if SOFTMAX:
        tl.store(lse_ptr + pid_bh.to(tl.int64) * H * W + offs_p, lse, mask=mask_p)
    head = b * sxb + h * CG * sxc
    if CLAMP:
        di, dj = _clamp_offset(i, H, K, D), _clamp_offset(j, W, K, D)

    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
        mask = mask_c[:, None] & mask_p[None, :]
        dout = _load_block(dout_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p)
        if HAS_GATE:
            sg = tl.sigmoid(_load_block(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
            g_y = dout * sg
            tl.store(gy_ptr + here, g_y.to(gy_ptr.dtype.element_ty), mask=mask)
        else:
            g_y = dout
        y = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for u in range(K):
            for v in tl.static_range(K):
                if CLAMP:
                    src, ok = _shifted(offs_p, i, j, mask_p, di + u * D, dj + v * D, H, W)
                else:
                    src, ok = _shifted(offs_p, i, j, mask_p, (u - R) * D, (v - R) * D, H, W)
                xs = _load_block(x_ptr + head, offs_c, sxc, src, sxp, mask_c, ok)
                # dP[t] of this channel block, added to the earlier blocks' sum (this program
                # owns these dP entries, so the read-modify-write is race-free and deterministic).
                dp_ptrs = dp_ptr + k_off + (u * K + v) * skc + offs_p * skp
                dp = tl.sum(g_y * xs, axis=0)
                dp += tl.load(dp_ptrs, mask=mask_p & (c0 > 0), other=0.0)
                tl.store(dp_ptrs, dp, mask=mask_p)
                if HAS_GATE:
                    y += _weight(k_ptr + k_off + (u * K + v) * skc, offs_p, skp, mask_p, lse, SOFTMAX)[None, :] * xs
        if HAS_GATE:
            dgate = dout * y * sg * (1.0 - sg)
            tl.store(dg_ptr + here, dgate.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # dP writes visible to every thread before they are read again

    if SOFTMAX:  # softmax backward: dkernel = P * (dP - sum_t P * dP)
        pdp = tl.zeros([BLOCK_P], tl.float32)
        for t in range(KK):
            dp = tl.load(dp_ptr + k_off + t * skc + offs_p * skp, mask=mask_p, other=0.0)
            pdp += _prob(k_ptr + k_off + t * skc, offs_p, skp, mask_p, lse) * dp
        for t in range(KK):
            dp = tl.load(dp_ptr + k_off + t * skc + offs_p * skp, mask=mask_p, other=0.0)
            dk = _prob(k_ptr + k_off + t * skc, offs_p, skp, mask_p, lse) * (dp - pdp)
            tl.store(dk_ptr + k_off + t * skc + offs_p * skp, dk.to(dk_ptr.dtype.element_ty), mask=mask_p)
    else:  # raw weights: dkernel = dP
        for t in range(KK):
            dp = tl.load(dp_ptr + k_off + t * skc + offs_p * skp, mask=mask_p, other=0.0)
            tl.store(dk_ptr + k_off + t * skc + offs_p * skp, dp.to(dk_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _dx_tap(acc, gy_head, offs_c, sxc, sxp, mask_c, tap_ptr, p, skp, ok, lse_base, SOFTMAX: tl.constexpr):
    """acc + w * g_y of the output pixels ``p`` (where ``ok``) whose tap at ``tap_ptr`` read x here."""
    if SOFTMAX:
        lse = tl.load(lse_base + p, mask=ok, other=0.0)
    else:
        lse = 0.0
    prob = _weight(tap_ptr, p, skp, ok, lse, SOFTMAX)
    return acc + prob[None, :] * _load_block(gy_head, offs_c, sxc, p, sxp, mask_c, ok)


@triton.jit
def _sgdc_bwd_dx_kernel(
    gy_ptr, k_ptr, lse_ptr, dx_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    """A gather over input pixels q. Centred windows: the output pixel p = q - off_t whose tap t
    read q, for each of the KK taps. Clamped windows: every p of q's residue class within K - 1
    group steps along each axis, (2K - 1)^2 candidates, kept where q lies in p's window (tap
    q - start(p)): near the borders more than K output pixels per axis read q. Rows of candidates
    that no pixel of the tile keeps are skipped."""
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    pid_bh, b, h, offs_q, mask_q, i, j = _pixel_tile(H, W, G, BLOCK_P)
    k_base = k_ptr + b * skb + h * KK * skc
    lse_base = lse_ptr + pid_bh.to(tl.int64) * H * W
    head = b * sxb + h * CG * sxc

    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        if CLAMP:
            for e in range(2 * K - 1):
                du = (e - (K - 1)) * D
                # tap row of the output rows i + du: i - (their first tap row), a multiple of D
                tu = -du - _clamp_offset(i + du, H, K, D)
                row_ok = mask_q & (i + du >= 0) & (i + du < H) & (tu >= 0) & (tu < K * D)
                # A tile spans few rows: most candidate rows hold no window over any of its pixels
                # (about K + rows - 1 of the 2K - 1 do), and the whole row of candidates is skipped.
                if tl.max(row_ok.to(tl.int32), axis=0) > 0:
                    for f in range(2 * K - 1):
                        dv = (f - (K - 1)) * D
                        tv = -dv - _clamp_offset(j + dv, W, K, D)
                        p, ok = _shifted(offs_q, i, j, row_ok & (tv >= 0) & (tv < K * D), du, dv, H, W)
                        tap_ptr = k_base + ((tu // D) * K + tv // D) * skc
                        acc = _dx_tap(acc, gy_ptr + head, offs_c, sxc, sxp, mask_c, tap_ptr, p, skp, ok, lse_base,
                                      SOFTMAX)  # fmt: skip
        else:
            for u in range(K):
                for v in tl.static_range(K):
                    # the output pixel p = q - off_t whose tap t read x at q
                    p, ok = _shifted(offs_q, i, j, mask_q, (R - u) * D, (R - v) * D, H, W)
                    tap_ptr = k_base + (u * K + v) * skc
                    acc = _dx_tap(acc, gy_ptr + head, offs_c, sxc, sxp, mask_c, tap_ptr, p, skp, ok, lse_base, SOFTMAX)
        here = head + offs_c[:, None] * sxc + offs_q[None, :] * sxp
        tl.store(dx_ptr + here, acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_q[None, :])


# ---------------------------------------------------------------------------------------------
# v2: band-matrix kernels (tl.dot), one image-row segment of BW pixels per program
# ---------------------------------------------------------------------------------------------
#
# For a segment of BW output pixels of row i and one halo row u (image row i + u - R), the K
# taps of row u read columns j0 + p - R .. j0 + p + R. The kernels load the HALO = next_pow2(BW +
# K - 1) columns from j0 - LEFT, LEFT = (HALO - BW) / 2 >= R (aligned, see _segment_geometry), so
#     out[:, p] += sum_q x_halo[:, q] * band_u[q, p],   band_u[q, p] = P[u*K + d, p],
# d = q - p - (LEFT - R), for 0 <= d < K and 0 elsewhere: one (channels x HALO) @ (HALO x BW)
# product per halo row. The backward uses the same band: dP[u*K + v, p] = (x_halo^T @ g)[q, p]
# at d = v, and the gather dx[:, p] = sum_u g_halo_u @ band'_u with band'_u[q, p] =
# P[u*K + 2R - d] at the output pixel (i + R - u, j0 - LEFT + q).
# Products accumulate in fp32. 16-bit operands: x and the gradients are exact in their dtype, the
# fp32 probabilities are rounded to it, which costs the forward and dx about as much as 16-bit
# storage of the result; the backward's y (it feeds dgate and S below, where dP - S cancels when
# the softmax is peaked) splits them into a 16-bit head and a 16-bit remainder (two products,
# SPLIT), about 16 significant bits (raw weights are exact in 16 bits: no split). fp32 operands
# use PRECISION ("tf32x3": three tf32 products, close to fp32; "ieee": fp32 FMAs).
#
# The other configurations, in the group-space view: with dilation D the columns m + D*g of one
# residue m form an undilated axis (g = 0 .. L - 1, L = ceil((W - m) / D)), and a segment is BW
# consecutive g of one residue (columns D apart; so are the halo's); halo rows are D rows apart.
# Clamped windows start at s(g) = min(max(g - R, 0), L - K) instead of g - R: the band entry of
# halo column hs + q and pixel g is tap (hs + q) - s(g), and since s steps by 0 or 1, the
# segment's windows still span at most BW + K - 1 columns; the halo starts at
# hs = min(g0 - LEFT, s(g0)) rounded down to a multiple of 8 (which fits, as HALO >= K + 15).
# dx gathers over the output pixels whose window covers its segment: along columns these span
# up to BW + 2K - 2 (more than K per input column near the borders), so clamped windows give dx a
# wider halo (HALO_DX, see _dx_halo); along rows a program loops over exactly the output rows
# [a, b] whose windows cover its row (a = 0 if q <= K - 1 else q - R, b = L - 1 if q >= L - K
# else q + R, in group space), tap row q - s(row).


@triton.jit
def _segment_lse(k_base, skc, skp, offs_p, mask_p, KK: tl.constexpr, BW: tl.constexpr, SOFTMAX: tl.constexpr):
    """log(sum_t exp(logit_t)) of the segment's BW pixels from one (taps x BW) tile: a few loads
    and two reductions per thread, instead of KK dependent steps of :func:`_softmax_lse` (0,
    unused, with raw weights)."""
    if not SOFTMAX:
        return tl.zeros([BW], tl.float32)
    taps = tl.arange(0, triton.next_power_of_2(KK))[:, None]
    logit = tl.load(k_base + taps * skc + offs_p[None, :] * skp, mask=(taps < KK) & mask_p[None, :], other=0.0)
    logit = tl.where(taps < KK, logit.to(tl.float32), float("-inf"))
    m = tl.max(logit, axis=0)
    return m + tl.log(tl.sum(tl.exp(logit - m[None, :]), axis=0))


@triton.jit
def _row_segment(H, W, G, BW: tl.constexpr, D: tl.constexpr):
    """This program's (b*G + h, b, h, row i, segment index within the row); segments fastest (by
    residue class of columns, then along it), then rows."""
    if D == 1:
        segs = tl.cdiv(W, BW)
    else:
        segs = tl.cdiv(tl.cdiv(W, D), BW) * D
    per_head = H * segs
    pid_bh = tl.program_id(0) // per_head
    rest = tl.program_id(0) % per_head
    return pid_bh, (pid_bh // G).to(tl.int64), pid_bh % G, rest // segs, rest % segs


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (fp32 accumulator). UPCAST (bf16 under the interpreter only, whose tl.dot
    multiplies bf16 operands as their raw 16-bit integers) multiplies the same values in fp32,
    where products of bf16 numbers are exact, as on the tensor cores."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _band_dot(a, band, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ band, with ``band`` (fp32) cast to a's dtype, plus its rounding remainder when
    SPLIT (16-bit a)."""
    head = band.to(a.dtype)
    acc = _mma(a, head, acc, PRECISION, UPCAST)
    if SPLIT:
        acc = _mma(a, (band - head.to(tl.float32)).to(a.dtype), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _segment_geometry(
    H, W, i, seg, K: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr,
    D: tl.constexpr, CLAMP: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    """Flat pixels and mask of the segment, the tap column of each band entry (HALO x BW), the
    halo columns and their in-image mask. The tap column of entry (q, p) is, forward, that of
    segment pixel p that reads halo column q; for dx (GATHER) with clamped windows, that of halo
    (output) pixel q that reads segment pixel p. Centred windows: the halo starts LEFT = (HALO -
    BW) / 2 >= R columns left of the segment, a multiple of 8, so that its rows load as aligned
    vectors in NCHW; the tap column is d = q - p - (LEFT - R), and dx reads tap 2R - d (the
    mirrored band). The other configurations: the comment above."""
    R: tl.constexpr = K // 2
    LEFT: tl.constexpr = (HALO - BW) // 2
    if D == 1 and not CLAMP:
        j0 = seg * BW
        cols = j0 + tl.arange(0, BW)
        mask_p = (cols < W) & (i < H)
        d = tl.arange(0, HALO)[:, None] - tl.arange(0, BW)[None, :] - (LEFT - R)
        hcols = j0 - LEFT + tl.arange(0, HALO)
        return i * W + cols, mask_p, d, hcols, (hcols >= 0) & (hcols < W)
    segs = tl.cdiv(tl.cdiv(W, D), BW)  # segments per residue class
    m = seg // segs
    g0 = (seg % segs) * BW
    L = (W - m + D - 1) // D
    g = g0 + tl.arange(0, BW)
    if not CLAMP:
        hg = g0 - LEFT + tl.arange(0, HALO)
        tap = tl.arange(0, HALO)[:, None] - tl.arange(0, BW)[None, :] - (LEFT - R)
    elif GATHER:
        hs = tl.where(g0 <= K - 1, 0, g0 - R)  # the first output column whose window covers g0
        hg = (hs // 8) * 8 + tl.arange(0, HALO)
        tap = g[None, :] - _clamped_start(hg, L, K)[:, None]
    else:
        hs = tl.minimum(g0 - LEFT, _clamped_start(g0, L, K))
        hg = (hs // 8) * 8 + tl.arange(0, HALO)
        tap = hg[:, None] - _clamped_start(g, L, K)[None, :]
    return i * W + m + D * g, (g < L) & (i < H), tap, m + D * hg, (hg >= 0) & (hg < L)


@triton.jit
def _first_row(i, H, K: tl.constexpr, D: tl.constexpr, CLAMP: tl.constexpr):
    """The image row of the first tap row of row i's windows (rows D apart)."""
    if CLAMP:
        return i + _clamp_offset(i, H, K, D)
    return i - (K // 2) * D


@triton.jit
def _forward_band(k_base, skc, skp, u, d, offs_p, mask_p, lse, K: tl.constexpr, SOFTMAX: tl.constexpr):
    """band_u (HALO x BW, fp32) of the segment's output pixels."""
    ok = (d >= 0) & (d < K) & mask_p[None, :]
    return _weight(k_base + (u * K + d) * skc, offs_p[None, :], skp, ok, lse[None, :], SOFTMAX)


@triton.jit
def _ungated_rows(x_head, sxc, sxp, offs_c, mask_c, k_base, skc, skp, row0, H, W, d, offs_p, mask_p, hcols, hcol_ok,
                  lse, K: tl.constexpr, BW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, D: tl.constexpr, SOFTMAX: tl.constexpr):  # fmt: skip
    """y = sum_t w[t] * x_t for the channels offs_c of the segment (BLOCK_C x BW, fp32); halo row u
    is image row row0 + u*D."""
    acc = tl.zeros([offs_c.shape[0], BW], tl.float32)
    for u in range(K):
        row = row0 + u * D
        xh = _load_tile(x_head, offs_c, sxc, row * W + hcols, sxp, mask_c, hcol_ok & (row >= 0) & (row < H))
        band = _forward_band(k_base, skc, skp, u, d, offs_p, mask_p, lse, K, SOFTMAX)
        acc = _band_dot(xh, band, acc, SPLIT, PRECISION, UPCAST)
    return acc


@triton.jit
def _sgdc_fwd_dot_kernel(
    x_ptr, k_ptr, g_ptr, out_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    _pid_bh, b, h, i, seg = _row_segment(H, W, G, BW, D)
    offs_p, mask_p, d, hcols, hcol_ok = _segment_geometry(H, W, i, seg, K, BW, HALO, D, CLAMP, False)
    k_base = k_ptr + b * skb + h * K * K * skc
    lse = _segment_lse(k_base, skc, skp, offs_p, mask_p, K * K, BW, SOFTMAX)
    head = b * sxb + h * CG * sxc
    row0 = _first_row(i, H, K, D, CLAMP)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        acc = _ungated_rows(x_ptr + head, sxc, sxp, offs_c, mask_c, k_base, skc, skp, row0, H, W, d, offs_p, mask_p,
                            hcols, hcol_ok, lse, K, BW, False, PRECISION, UPCAST, D, SOFTMAX)  # fmt: skip
        if HAS_GATE:
            acc = acc * tl.sigmoid(_load_block(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
        here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
        tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def _sgdc_bwd_dot_kernel(
    dout_ptr, x_ptr, k_ptr, g_ptr, dk_ptr, dg_ptr, gy_ptr, lse_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    """Over output segments: dgate, dkernel, the lse and (gated) g_y = dout * sigmoid(gate),
    rounded to x's dtype; dP stays in registers, one (HALO x BW) band per halo row."""
    pid_bh, b, h, i, seg = _row_segment(H, W, G, BW, D)
    offs_p, mask_p, d, hcols, hcol_ok = _segment_geometry(H, W, i, seg, K, BW, HALO, D, CLAMP, False)
    k_off = b * skb + h * K * K * skc  # shared by kernel and dkernel
    lse = _segment_lse(k_ptr + k_off, skc, skp, offs_p, mask_p, K * K, BW, SOFTMAX)
    if SOFTMAX:
        tl.store(lse_ptr + pid_bh.to(tl.int64) * H * W + offs_p, lse, mask=mask_p)
    head = b * sxb + h * CG * sxc
    row0 = _first_row(i, H, K, D, CLAMP)

    # Pass 1, per channel block: y (the ungated forward), g, dgate, and S = sum_c g * y, which is
    # sum_t P[t] * dP[t] of the softmax backward (P is zero off the band). Raw weights without a
    # gate need none of these.
    s_pdp = tl.zeros([BW], tl.float32)
    if HAS_GATE or SOFTMAX:
        for c0 in range(0, CG, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < CG
            y = _ungated_rows(x_ptr + head, sxc, sxp, offs_c, mask_c, k_ptr + k_off, skc, skp, row0, H, W, d, offs_p,
                              mask_p, hcols, hcol_ok, lse, K, BW, SPLIT, PRECISION, UPCAST, D, SOFTMAX)  # fmt: skip
            dout = _load_block(dout_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p)
            here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
            mask = mask_c[:, None] & mask_p[None, :]
            if HAS_GATE:
                sg = tl.sigmoid(_load_block(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
                g_y = (dout * sg).to(gy_ptr.dtype.element_ty)
                tl.store(gy_ptr + here, g_y, mask=mask)
                tl.store(dg_ptr + here, (dout * y * sg * (1.0 - sg)).to(dg_ptr.dtype.element_ty), mask=mask)
                s_pdp += tl.sum(g_y.to(tl.float32) * y, axis=0)
            else:
                s_pdp += tl.sum(dout * y, axis=0)
        tl.debug_barrier()  # g_y written by every thread before it is read back

    # Pass 2, per halo row u: dP band = x_halo^T @ g over the channels; dkernel = P * (dP - S)
    # (softmax) or dP (raw weights).
    for u in range(K):
        row = row0 + u * D
        row_ok = hcol_ok & (row >= 0) & (row < H)
        dp = tl.zeros([HALO, BW], tl.float32)
        for c0 in range(0, CG, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < CG
            xh = _load_tile(x_ptr + head, offs_c, sxc, row * W + hcols, sxp, mask_c, row_ok)
            g_y = _load_tile(gy_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p)
            dp = _mma(tl.trans(xh), g_y.to(xh.dtype), dp, PRECISION, UPCAST)
        in_band = (d >= 0) & (d < K) & mask_p[None, :]
        if SOFTMAX:
            band = _forward_band(k_ptr + k_off, skc, skp, u, d, offs_p, mask_p, lse, K, SOFTMAX)
            dk = band * (dp - s_pdp[None, :])
        else:
            dk = dp
        tl.store(
            dk_ptr + k_off + (u * K + d) * skc + offs_p[None, :] * skp, dk.to(dk_ptr.dtype.element_ty), mask=in_band
        )


@triton.jit
def _dx_band_row(acc, row, u, H, W, hcols, hcol_ok, tap, k_base, skc, skp, lse_base, gy_head, offs_c, sxc, sxp, mask_c,
                 K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, CLAMP: tl.constexpr,
                 SOFTMAX: tl.constexpr):  # fmt: skip
    """acc + g_halo @ band' for the output pixels of image row ``row`` (its tap row ``u``) at the
    halo columns: band'[q, p] is the weight of tap (u, v) of output pixel q, v = tap[q, p] with
    clamped windows, 2R - tap[q, p] with centred ones."""
    out_ok = hcol_ok & (row >= 0) & (row < H)
    opix = row * W + hcols
    if SOFTMAX:
        lse = tl.load(lse_base + opix, mask=out_ok, other=0.0)[:, None]
    else:
        lse = 0.0
    ok = (tap >= 0) & (tap < K) & out_ok[:, None]
    if CLAMP:
        band = _weight(k_base + (u * K + tap) * skc, opix[:, None], skp, ok, lse, SOFTMAX)
    else:  # tap is d, the forward's band column: the mirrored tap 2R - d read this pixel
        band = _weight(k_base + (u * K + 2 * (K // 2) - tap) * skc, opix[:, None], skp, ok, lse, SOFTMAX)
    gh = _load_tile(gy_head, offs_c, sxc, opix, sxp, mask_c, out_ok)
    return _band_dot(gh, band, acc, False, PRECISION, UPCAST)


@triton.jit
def _sgdc_bwd_dx_dot_kernel(
    gy_ptr, k_ptr, lse_ptr, dx_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, skb, skc, skp,
    K: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    """Over input segments (row i, columns j0 + p): dx = sum over the output rows whose windows
    cover row i of g_halo @ band', a gather."""
    R: tl.constexpr = K // 2
    pid_bh, b, h, i, seg = _row_segment(H, W, G, BW, D)
    offs_q, mask_q, tap, hcols, hcol_ok = _segment_geometry(H, W, i, seg, K, BW, HALO, D, CLAMP, True)
    k_base = k_ptr + b * skb + h * K * K * skc
    lse_base = lse_ptr + pid_bh.to(tl.int64) * H * W
    head = b * sxb + h * CG * sxc
    if CLAMP:  # row i is group row q of its residue class, of length L
        q = i // D
        L = (H - i % D + D - 1) // D
        first = tl.where(q <= K - 1, 0, q - R)
        last = tl.where(q >= L - K, L - 1, q + R)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        acc = tl.zeros([BLOCK_C, BW], tl.float32)
        if CLAMP:
            for e in range(first, last + 1):
                acc = _dx_band_row(acc, i + (e - q) * D, q - _clamped_start(e, L, K), H, W, hcols, hcol_ok, tap,
                                   k_base, skc, skp, lse_base, gy_ptr + head, offs_c, sxc, sxp, mask_c, K, PRECISION,
                                   UPCAST, CLAMP, SOFTMAX)  # fmt: skip
        else:
            for u in range(K):
                # the output row whose tap row u reads row i
                acc = _dx_band_row(acc, i + (R - u) * D, u, H, W, hcols, hcol_ok, tap, k_base, skc, skp, lse_base,
                                   gy_ptr + head, offs_c, sxc, sxp, mask_c, K, PRECISION, UPCAST, CLAMP,
                                   SOFTMAX)  # fmt: skip
        here = head + offs_c[:, None] * sxc + offs_q[None, :] * sxp
        tl.store(dx_ptr + here, acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_q[None, :])


# ---------------------------------------------------------------------------------------------
# Block sizes
# ---------------------------------------------------------------------------------------------


def _blocks(cg: int, hw: int) -> dict:
    """Launch parameters: a channel block covering the head when it is small, and a pixel tile that
    keeps the fp32 accumulator (BLOCK_C x BLOCK_P) at 4096 elements, 32 per thread with 4 warps."""
    if INTERPRET:
        return dict(INTERPRET_BLOCKS)
    cg, hw = int(cg), int(hw)  # specialize (guard) symbolic sizes under torch.compile(dynamic=True)
    block_c = min(triton.next_power_of_2(cg), 32)
    block_p = max(32, min(4096 // block_c, triton.next_power_of_2(hw), 256))
    return {"BLOCK_P": block_p, "BLOCK_C": block_c, "num_warps": 4}


def _dot_blocks(cg: int, kernel_size: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the band kernels: segments of BW = 16 pixels (the smallest tl.dot
    side), the halo rounded up to a power of two, the whole head in one channel block up to 64
    channels; fp32 products in tf32x3."""
    blocks = (
        dict(INTERPRET_DOT_BLOCKS)
        if INTERPRET
        else {"BW": 16, "BLOCK_C": max(16, min(triton.next_power_of_2(int(cg)), 64))}
    )
    blocks["HALO"] = triton.next_power_of_2(blocks["BW"] + kernel_size - 1)
    fp32 = dtype == torch.float32
    blocks.update(PRECISION="tf32x3" if fp32 else "ieee", UPCAST=INTERPRET and dtype == torch.bfloat16)
    if not INTERPRET:
        blocks["num_warps"] = 4
    return blocks


def _dx_halo(blocks: dict, kernel_size: int, clamp: bool) -> int:
    """The halo of the band dx kernel: the forward's, or with clamped windows, where more output
    pixels than K per axis read an input pixel near the borders, BW + 2K - 2 columns plus 7 to
    start at a multiple of 8, rounded up to a power of two."""
    if not clamp:
        return blocks["HALO"]
    return triton.next_power_of_2(blocks["BW"] + 2 * kernel_size + 5)


def kernel_family(name: str, dtype: torch.dtype) -> str:
    """The kernels variant ``name`` runs on inputs of ``dtype``: "band" (v2) or "taps" (v1)."""
    if name not in VARIANTS:
        raise ValueError(f"variant: {name!r} is not a triton kernel variant; expected one of {', '.join(VARIANTS)}")
    return "band" if name == "v2dot" or (name == "v2dot16" and dtype != torch.float32) else "taps"


def _autotuned(kernel):
    """``kernel`` autotuned over a few (BLOCK_P, BLOCK_C, num_warps), keyed on the shape and the
    configuration; every kernel here is idempotent (it only overwrites its outputs), so
    benchmarking runs are harmless."""
    configs = [
        triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
        for p, c, w in [(128, 32, 4), (256, 16, 4), (64, 64, 4), (256, 32, 8), (128, 64, 8), (512, 16, 8)]
    ]
    return triton.autotune(configs, key=["H", "W", "CG", "sxp", "K", "D", "CLAMP", "SOFTMAX"])(kernel)


if AUTOTUNE:
    _fwd_tuned = _autotuned(_sgdc_fwd_kernel)
    _taps_tuned = _autotuned(_sgdc_bwd_taps_kernel)
    _dx_tuned = _autotuned(_sgdc_bwd_dx_kernel)


def _geometry(x: Tensor, kernel: Tensor, num_heads: int) -> tuple:
    """(H, W, Cg, G, sxb, sxc, sxp, skb, skc, skp): the integer arguments shared by all kernels."""
    _, C, H, W = x.shape
    # Offsets within one batch item are 32-bit (the batch offset is 64-bit).
    for name, t in (("x", x), ("kernel", kernel)):
        if t[0].numel() >= 2**31:
            raise ValueError(
                f"{name}: the triton backend needs fewer than 2**31 elements per batch item, got "
                f"{t[0].numel()} (shape {tuple(t.shape)}); use backend='cuda', which indexes in 64 bits"
            )

    def strides(t: Tensor) -> tuple:
        sb, sc, sh, sw = t.stride()
        sp = sw if W > 1 else sh
        if H > 1 and W > 1 and sh != W * sw:
            raise ValueError(f"sgdc triton: expected a dense NCHW or channels_last tensor, got strides {t.stride()}")
        return sb, sc, sp

    return (H, W, C // num_heads, num_heads, *strides(x), *strides(kernel))


def _launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``. Under the interpreter, wrap_triton hands back
    the raw kernel, which cannot run on the fake tensors of shape propagation (nothing to do there)
    nor trace into a graph (torch.compile of this backend needs a GPU)."""
    if INTERPRET:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        if any(isinstance(a, FakeTensor) for a in args):
            return
        if any(isinstance(a, FunctionalTensor) for a in args):
            raise RuntimeError(
                "sgdc triton: torch.compile of the triton backend needs a CUDA GPU; under "
                "TRITON_INTERPRET=1 it runs in eager mode only"
            )
    wrap_triton(kernel)[grid](*args, **kwargs)


def _grid(x: Tensor, num_heads: int):
    B, _, H, W = x.shape
    return lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]) * B * num_heads,)


def _segment_grid(x: Tensor, num_heads: int, dilation: int):
    B, _, H, W = x.shape
    return lambda meta: (triton.cdiv(triton.cdiv(W, dilation), meta["BW"]) * dilation * H * B * num_heads,)


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def _consts(kernel_size: int, gate: Tensor | None, dilation: int, clamp: bool, softmax: bool) -> dict:
    """The configuration as the kernels' constexpr arguments."""
    return {"K": kernel_size, "HAS_GATE": gate is not None, "D": dilation, "CLAMP": clamp, "SOFTMAX": softmax}


@triton_op("sgdc::triton_forward", mutates_args=())
def sgdc_triton_forward(
    x: Tensor, kernel: Tensor, gate: Tensor | None,
    kernel_size: int, num_heads: int, dilation: int, clamp: bool, softmax: bool, variant: str,
) -> Tensor:  # fmt: skip
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    geo = _geometry(x, kernel, num_heads)
    args = (x, kernel, gate if gate is not None else x, out, *geo)
    consts = _consts(kernel_size, gate, dilation, clamp, softmax)
    if kernel_family(variant, x.dtype) == "band":
        blocks = _dot_blocks(geo[2], kernel_size, x.dtype)
        _launch(_sgdc_fwd_dot_kernel, _segment_grid(x, num_heads, dilation), *args, **consts, **blocks)
    elif AUTOTUNE:
        _launch(_fwd_tuned, _grid(x, num_heads), *args, **consts)
    else:
        blocks = _blocks(geo[2], geo[0] * geo[1])
        _launch(_sgdc_fwd_kernel, _grid(x, num_heads), *args, **consts, **blocks)
    return out


@triton_op("sgdc::triton_backward", mutates_args=())
def sgdc_triton_backward(
    grad_out: Tensor, x: Tensor, kernel: Tensor, gate: Tensor | None,
    kernel_size: int, num_heads: int, dilation: int, clamp: bool, softmax: bool, variant: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    dx = torch.empty_like(x)
    dkernel = torch.empty_like(kernel)
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    if x.numel() == 0:
        return dx, dkernel, dgate
    B, _, H, W = x.shape
    geo = _geometry(x, kernel, num_heads)
    # Scratch: the per-pixel log-sum-exp (written and read with the softmax only), g_y when
    # gated, and for v1 dP (fp32, kernel's shape).
    lse = torch.empty((B * num_heads, H * W), dtype=torch.float32, device=x.device)
    g_y = torch.empty_like(x) if gate is not None else grad_out
    consts = _consts(kernel_size, gate, dilation, clamp, softmax)
    mode = {k: consts[k] for k in ("K", "D", "CLAMP", "SOFTMAX")}
    head_args = (grad_out, x, kernel, gate if gate is not None else x, dkernel, dgate if gate is not None else dx, g_y)
    dx_args = (g_y, kernel, lse, dx, *geo)
    if kernel_family(variant, x.dtype) == "band":
        blocks = _dot_blocks(geo[2], kernel_size, x.dtype)
        grid = _segment_grid(x, num_heads, dilation)
        split = x.dtype != torch.float32 and softmax  # raw 16-bit weights are exact in 16 bits
        _launch(_sgdc_bwd_dot_kernel, grid, *head_args, lse, *geo, **consts, **blocks, SPLIT=split)
        dx_blocks = {**blocks, "HALO": _dx_halo(blocks, kernel_size, clamp)}
        _launch(_sgdc_bwd_dx_dot_kernel, grid, *dx_args, **mode, **dx_blocks)
        return dx, dkernel, dgate
    dp = torch.empty_like(kernel, dtype=torch.float32)
    taps_args = (*head_args, dp, lse, *geo)
    grid = _grid(x, num_heads)
    if AUTOTUNE:
        _launch(_taps_tuned, grid, *taps_args, **consts)
        _launch(_dx_tuned, grid, *dx_args, **mode)
    else:
        blocks = _blocks(geo[2], H * W)
        _launch(_sgdc_bwd_taps_kernel, grid, *taps_args, **consts, **blocks)
        _launch(_sgdc_bwd_dx_kernel, grid, *dx_args, **mode, **blocks)
    return dx, dkernel, dgate


register_ops(sgdc_triton_forward, sgdc_triton_backward, fake=False)
