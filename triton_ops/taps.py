"""The per-tap kernel family ("taps", v1): forward, and a deterministic backward in two kernels.
Variant v1 runs it for every dtype, v2dot16 for float32 (ops.kernel_family).

Notation, configurations and memory layout: common.py. A 1-D grid of (pixel tile, b*G + h) pairs,
pixel tiles fastest; a tile is BLOCK_P flat pixels of one batch item and head. Each pixel's window
starts at an offset from it (-R*D when centred; per pixel, computed once per tile, when clamped),
tap (u, v) D*(u, v) further. A program computes the softmax statistics of its pixels once (the
log-sum-exp over the KK logits), keeps them in registers, and loops over the head's channels in
blocks of BLOCK_C, adding one shifted (BLOCK_C, BLOCK_P) load per tap; the probability of a tap is
recomputed as exp(logit - max) / sum from the statistics (max, 1/sum) where it is needed, so no
K*K-fold tensor ever exists.

Backward, deterministic (no atomics), in two kernels:
  1. ``_sgdc_bwd_taps_kernel``, over output pixels: g_y = dout * sigmoid(gate); for every tap,
     dP[t] = sum_c g_y * x_t (accumulated over channel blocks in an fp32 buffer of the weights'
     shape, owned by the program); y = sum_t P[t] * x_t gives dgate = dout * y * s * (1 - s); then
     dweights = P * (dP - sum_t P * dP). It also writes the per-pixel softmax statistics
     (max, 1/sum: 2*B*G*HW floats) and, when there is a gate, g_y (x's size) for kernel 2.
  2. ``_sgdc_bwd_dx_kernel``, a gather over input pixels q:
     dx[c, q] = sum_t P[t, q - off_t] * g_y[c, q - off_t], with P rebuilt from the weights and the
     statistics. Clamped windows: near a border more than K output pixels per axis read q (up to 2K - 1),
     so the gather scans the (2K - 1)^2 output pixels of q's residue class around it, masked to
     those whose window holds q, and skips the candidate rows that hold no window over any pixel of
     the tile (K + rows - 1 of the 2K - 1 remain for a tile of a few rows): about 2x the work of
     centred windows at K = 17.

Block sizes come from ``ops._blocks``, a heuristic on (Cg, HW); with SGDC_TRITON_AUTOTUNE=1 these
kernels are autotuned instead (once per shape key, cached by triton.autotune).
"""

import triton
import triton.language as tl

from .common import _clamp_offset, _load_stats, _load_tile_fp32, _prob, _store_stats, _weight


@triton.jit
def _softmax_stats(w_base, swc, swp, offs_p, mask_p, KK: tl.constexpr, BLOCK_P: tl.constexpr, SOFTMAX: tl.constexpr):
    """The softmax statistics (m, inv) per pixel: m the max of the KK logits and inv = 1 / sum_t
    exp(logit_t - m), by an online max/sum (fp32); (0, 1), unused, with raw weights. Masked taps
    (logit -inf) add nothing: while every logit so far is -inf the sum is rescaled against 0
    instead of the running max, whose exp(m - m_new) would be exp(-inf + inf) = NaN. A pixel whose
    logits are all -inf gets (-inf, inf), and its probabilities exp(-inf + inf) * inf are NaN, as
    torch.softmax gives."""
    if not SOFTMAX:
        return tl.zeros([BLOCK_P], tl.float32), tl.full([BLOCK_P], 1.0, tl.float32)
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_P], tl.float32)
    for t in range(KK):
        logit = tl.load(w_base + t * swc + offs_p * swp, mask=mask_p, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, logit)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite unless a logit is +inf
        s = s * tl.exp(m - ref) + tl.exp(logit - ref)
        m = m_new
    return m, 1.0 / s


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
def _sgdc_fwd_kernel(
    x_ptr, w_ptr, g_ptr, out_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, swb, swc, swp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    _pid_bh, b, h, offs_p, mask_p, i, j = _pixel_tile(H, W, G, BLOCK_P)
    w_base = w_ptr + b * swb + h * KK * swc
    m, inv = _softmax_stats(w_base, swc, swp, offs_p, mask_p, KK, BLOCK_P, SOFTMAX)
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
                prob = _weight(w_base + (u * K + v) * swc, offs_p, swp, mask_p, m, inv, SOFTMAX)
                acc += prob[None, :] * _load_tile_fp32(x_ptr + head, offs_c, sxc, src, sxp, mask_c, ok)
        here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
        mask = mask_c[:, None] & mask_p[None, :]
        if HAS_GATE:
            acc = acc * tl.sigmoid(_load_tile_fp32(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
        tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sgdc_bwd_taps_kernel(
    dout_ptr, x_ptr, w_ptr, g_ptr, dw_ptr, dg_ptr, gy_ptr, dp_ptr, stats_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, swb, swc, swp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    pid_bh, b, h, offs_p, mask_p, i, j = _pixel_tile(H, W, G, BLOCK_P)
    w_off = b * swb + h * KK * swc  # shared by weights, dweights and the dP buffer
    m, inv = _softmax_stats(w_ptr + w_off, swc, swp, offs_p, mask_p, KK, BLOCK_P, SOFTMAX)
    if SOFTMAX:
        _store_stats(stats_ptr, pid_bh, H * W, offs_p, mask_p, m, inv)
    head = b * sxb + h * CG * sxc
    if CLAMP:
        di, dj = _clamp_offset(i, H, K, D), _clamp_offset(j, W, K, D)

    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
        mask = mask_c[:, None] & mask_p[None, :]
        dout = _load_tile_fp32(dout_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p)
        if HAS_GATE:
            sg = tl.sigmoid(_load_tile_fp32(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
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
                xs = _load_tile_fp32(x_ptr + head, offs_c, sxc, src, sxp, mask_c, ok)
                # dP[t] of this channel block, added to the earlier blocks' sum (this program
                # owns these dP entries, so the read-modify-write is race-free and deterministic).
                dp_ptrs = dp_ptr + w_off + (u * K + v) * swc + offs_p * swp
                dp = tl.sum(g_y * xs, axis=0)
                dp += tl.load(dp_ptrs, mask=mask_p & (c0 > 0), other=0.0)
                tl.store(dp_ptrs, dp, mask=mask_p)
                if HAS_GATE:
                    w = _weight(w_ptr + w_off + (u * K + v) * swc, offs_p, swp, mask_p, m, inv, SOFTMAX)
                    y += w[None, :] * xs
        if HAS_GATE:
            dgate = dout * y * sg * (1.0 - sg)
            tl.store(dg_ptr + here, dgate.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # dP writes visible to every thread before they are read again

    if SOFTMAX:  # softmax backward: dweights = P * (dP - sum_t P * dP)
        pdp = tl.zeros([BLOCK_P], tl.float32)
        for t in range(KK):
            dp = tl.load(dp_ptr + w_off + t * swc + offs_p * swp, mask=mask_p, other=0.0)
            pdp += _prob(w_ptr + w_off + t * swc, offs_p, swp, mask_p, m, inv) * dp
        for t in range(KK):
            dp = tl.load(dp_ptr + w_off + t * swc + offs_p * swp, mask=mask_p, other=0.0)
            dw = _prob(w_ptr + w_off + t * swc, offs_p, swp, mask_p, m, inv) * (dp - pdp)
            tl.store(dw_ptr + w_off + t * swc + offs_p * swp, dw.to(dw_ptr.dtype.element_ty), mask=mask_p)
    else:  # raw weights: dweights = dP
        for t in range(KK):
            dp = tl.load(dp_ptr + w_off + t * swc + offs_p * swp, mask=mask_p, other=0.0)
            tl.store(dw_ptr + w_off + t * swc + offs_p * swp, dp.to(dw_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _dx_tap(acc, gy_head, offs_c, sxc, sxp, mask_c, tap_ptr, p, swp, ok, stats_base, SOFTMAX: tl.constexpr):
    """acc + w * g_y of the output pixels ``p`` (where ``ok``) whose tap at ``tap_ptr`` read x here."""
    if SOFTMAX:
        m, inv = _load_stats(stats_base, p, ok)
    else:
        m, inv = 0.0, 1.0
    prob = _weight(tap_ptr, p, swp, ok, m, inv, SOFTMAX)
    return acc + prob[None, :] * _load_tile_fp32(gy_head, offs_c, sxc, p, sxp, mask_c, ok)


@triton.jit
def _sgdc_bwd_dx_kernel(
    gy_ptr, w_ptr, stats_ptr, dx_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, swb, swc, swp,
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
    w_base = w_ptr + b * swb + h * KK * swc
    stats_base = stats_ptr + pid_bh.to(tl.int64) * H * W * 2
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
                        tap_ptr = w_base + ((tu // D) * K + tv // D) * swc
                        acc = _dx_tap(acc, gy_ptr + head, offs_c, sxc, sxp, mask_c, tap_ptr, p, swp, ok, stats_base,
                                      SOFTMAX)  # fmt: skip
        else:
            for u in range(K):
                for v in tl.static_range(K):
                    # the output pixel p = q - off_t whose tap t read x at q
                    p, ok = _shifted(offs_q, i, j, mask_q, (R - u) * D, (R - v) * D, H, W)
                    tap_ptr = w_base + (u * K + v) * swc
                    acc = _dx_tap(
                        acc, gy_ptr + head, offs_c, sxc, sxp, mask_c, tap_ptr, p, swp, ok, stats_base, SOFTMAX
                    )
        here = head + offs_c[:, None] * sxc + offs_q[None, :] * sxp
        tl.store(dx_ptr + here, acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_q[None, :])
