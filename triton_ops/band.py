"""The band-matrix kernel family ("band", v2): tl.dot kernels, one image-row segment of BW pixels
per program. Variant v2dot runs it for every dtype, v2dot16 for 16-bit inputs (ops.kernel_family).

Notation, configurations and memory layout: common.py. A program owns a segment of BW = 16 pixels
of one image row and one (batch, head); per halo row, one tl.dot of the head's channels' halo
(channels x HALO) with a band matrix of the probabilities (HALO x BW), which the tensor cores run.
The backward is two kernels, with dP in registers (no fp32 scratch): the first writes dgate,
dweights, the softmax statistics (max, 1/sum) and g_y (gated only), the second gathers dx with
tl.dot. With dilation a segment
is BW consecutive pixels of one residue class of columns (columns D apart, strided loads in NCHW);
with clamped windows the halo start moves with the windows (a runtime multiple of 8, which Triton
does not prove aligned: no 16-byte vector loads in NCHW), and dx, which gathers from up to
BW + 2K - 2 output columns per segment, gets a halo of next_pow2(BW + 2K + 5) columns (32 up to
K = 5, 64 for K = 7 to 21).

The band. For a segment of BW output pixels of row i and one halo row u (image row i + u - R), the
K taps of row u read columns j0 + p - R .. j0 + p + R. The kernels load the HALO = next_pow2(BW +
K - 1) columns from j0 - LEFT, LEFT = (HALO - BW) / 2 >= R (aligned, see _segment_geometry), so
    out[:, p] += sum_q x_halo[:, q] * band_u[q, p],   band_u[q, p] = P[u*K + d, p],
d = q - p - (LEFT - R), for 0 <= d < K and 0 elsewhere: one (channels x HALO) @ (HALO x BW)
product per halo row. The backward uses the same band: dP[u*K + v, p] = (x_halo^T @ g)[q, p]
at d = v, and the gather dx[:, p] = sum_u g_halo_u @ band'_u with band'_u[q, p] =
P[u*K + 2R - d] at the output pixel (i + R - u, j0 - LEFT + q).

Precision. Products accumulate in fp32. 16-bit operands: x and the gradients are exact in their
dtype, the fp32 probabilities are rounded to it, which costs the forward and dx about as much as
16-bit storage of the result; the backward's y (it feeds dgate and S, where dP - S cancels when the
softmax is peaked) splits them into a 16-bit head and a 16-bit remainder (two products, SPLIT),
about 16 significant bits (raw weights are exact in 16 bits: no split). fp32 operands use
PRECISION ("tf32x3": three tf32 products, close to fp32; "ieee": fp32 FMAs).

The other configurations, in the group-space view: with dilation D the columns m + D*g of one
residue m form an undilated axis (g = 0 .. L - 1, L = ceil((W - m) / D)), and a segment is BW
consecutive g of one residue (columns D apart; so are the halo's); halo rows are D rows apart.
Clamped windows start at s(g) = min(max(g - R, 0), L - K) instead of g - R: the band entry of
halo column hs + q and pixel g is tap (hs + q) - s(g), and since s steps by 0 or 1, the
segment's windows still span at most BW + K - 1 columns; the halo starts at
hs = min(g0 - LEFT, s(g0)) rounded down to a multiple of 8 (which fits, as HALO >= K + 15).
dx gathers over the output pixels whose window covers its segment: along columns these span
up to BW + 2K - 2 (more than K per input column near the borders), so clamped windows give dx a
wider halo (``ops._dx_halo``); along rows a program loops over exactly the output rows [a, b]
whose windows cover its row (a = 0 if q <= K - 1 else q - R, b = L - 1 if q >= L - K else q + R,
in group space), tap row q - s(row).

Non-finite inputs (docs/op.md). A tl.dot multiplies every column of a halo by the band, which is
zero off each pixel's window: a NaN or infinite x or g_y would reach every pixel of the segment
(0 * inf = NaN), and tf32x3 and the 16-bit split turn an infinite product into NaN. Any result that
such a value reaches comes out non-finite, so finite results are right, and a channel block whose
results are not all finite is summed again over each pixel's own terms (``_masked_dot``, one halo
column at a time, only then); dP, whose off-band entries are never stored, is recomputed with
fp32 products when tf32x3 leaves a band entry non-finite.

Launch parameters come from ``ops._dot_blocks`` and ``ops._dx_halo``.
"""

import triton
import triton.language as tl

from .common import (
    _clamp_offset,
    _clamped_start,
    _load_stats,
    _load_tile_fp32,
    _load_tile_native,
    _store_stats,
    _weight,
)


@triton.jit
def _segment_stats(w_base, swc, swp, offs_p, mask_p, KK: tl.constexpr, BW: tl.constexpr, SOFTMAX: tl.constexpr):
    """The softmax statistics (m, inv) of the segment's BW pixels (m the max of the logits, inv =
    1 / sum_t exp(logit_t - m)) from one (taps x BW) tile: a few loads and two reductions per
    thread, instead of KK dependent steps of ``taps._softmax_stats``; (0, 1), unused, with raw
    weights. The max is taken over all taps first, so masked taps (logit -inf) add exp(-inf) = 0;
    m is -inf only where every logit is -inf, and then the sum is NaN and so are the pixel's
    probabilities, as torch.softmax gives."""
    if not SOFTMAX:
        return tl.zeros([BW], tl.float32), tl.full([BW], 1.0, tl.float32)
    taps = tl.arange(0, triton.next_power_of_2(KK))[:, None]
    logit = tl.load(w_base + taps * swc + offs_p[None, :] * swp, mask=(taps < KK) & mask_p[None, :], other=0.0)
    logit = tl.where(taps < KK, logit.to(tl.float32), float("-inf"))
    m = tl.max(logit, axis=0)
    return m, 1.0 / tl.sum(tl.exp(logit - m[None, :]), axis=0)


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
def _masked_dot(a, band, ok, acc, HALO: tl.constexpr):
    """acc + a @ band over the band's entries ``ok`` only, one halo column at a time in fp32: the
    exact sum of the window's terms, where a non-finite element of ``a`` outside a pixel's window
    does not reach that pixel (tl.dot multiplies it by the band's zero: NaN)."""
    cols = tl.arange(0, HALO)
    for q in range(HALO):
        a_q = tl.sum(tl.where(cols[None, :] == q, a.to(tl.float32), 0.0), axis=1)
        band_q = tl.sum(tl.where(cols[:, None] == q, band, 0.0), axis=0)
        ok_q = tl.max(tl.where(cols[:, None] == q, ok.to(tl.int32), 0), axis=0) > 0
        acc += tl.where(ok_q[None, :], a_q[:, None] * band_q[None, :], 0.0)
    return acc


@triton.jit
def _any_nonfinite(t):
    """Whether the 2-D tile ``t`` holds a NaN or an infinity."""
    bad = tl.where(tl.abs(t) < float("inf"), 0, 1)
    return tl.max(tl.max(bad, axis=1), axis=0) > 0


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
    mirrored band). The other configurations: the module docstring."""
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
def _forward_band(w_base, swc, swp, u, d, offs_p, mask_p, m, inv, K: tl.constexpr, SOFTMAX: tl.constexpr):
    """band_u (HALO x BW, fp32) of the segment's output pixels."""
    ok = (d >= 0) & (d < K) & mask_p[None, :]
    return _weight(w_base + (u * K + d) * swc, offs_p[None, :], swp, ok, m[None, :], inv[None, :], SOFTMAX)


@triton.jit
def _ungated_rows(x_head, sxc, sxp, offs_c, mask_c, w_base, swc, swp, row0, H, W, d, offs_p, mask_p, hcols, hcol_ok,
                  m, inv, K: tl.constexpr, BW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, D: tl.constexpr, SOFTMAX: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
    """y = sum_t w[t] * x_t for the channels offs_c of the segment (BLOCK_C x BW, fp32); halo row u
    is image row row0 + u*D. EXACT: each pixel's own taps only (:func:`_masked_dot`)."""
    acc = tl.zeros([offs_c.shape[0], BW], tl.float32)
    for u in range(K):
        row = row0 + u * D
        xh = _load_tile_native(x_head, offs_c, sxc, row * W + hcols, sxp, mask_c, hcol_ok & (row >= 0) & (row < H))
        band = _forward_band(w_base, swc, swp, u, d, offs_p, mask_p, m, inv, K, SOFTMAX)
        if EXACT:
            acc = _masked_dot(xh, band, (d >= 0) & (d < K), acc, d.shape[0])
        else:
            acc = _band_dot(xh, band, acc, SPLIT, PRECISION, UPCAST)
    return acc


@triton.jit
def _window_sums(x_head, sxc, sxp, offs_c, mask_c, w_base, swc, swp, row0, H, W, d, offs_p, mask_p, hcols, hcol_ok,
                 m, inv, K: tl.constexpr, BW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, D: tl.constexpr, SOFTMAX: tl.constexpr):  # fmt: skip
    """:func:`_ungated_rows` on the tensor cores, recomputed exactly when a result is not finite.
    A non-finite x (or weight) in a row's halo reaches every pixel of the segment through the
    band's zeros, and the split products turn an infinity into NaN; any result it reaches is
    non-finite, so finite results are the band's, and the others are summed over each pixel's own
    taps, as the definition does (docs/op.md, "Non-finite inputs")."""
    acc = _ungated_rows(x_head, sxc, sxp, offs_c, mask_c, w_base, swc, swp, row0, H, W, d, offs_p, mask_p, hcols,
                        hcol_ok, m, inv, K, BW, SPLIT, PRECISION, UPCAST, D, SOFTMAX, False)  # fmt: skip
    if _any_nonfinite(acc):
        acc = _ungated_rows(x_head, sxc, sxp, offs_c, mask_c, w_base, swc, swp, row0, H, W, d, offs_p, mask_p, hcols,
                            hcol_ok, m, inv, K, BW, SPLIT, PRECISION, UPCAST, D, SOFTMAX, True)  # fmt: skip
    return acc


@triton.jit
def _sgdc_fwd_dot_kernel(
    x_ptr, w_ptr, g_ptr, out_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, swb, swc, swp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    _pid_bh, b, h, i, seg = _row_segment(H, W, G, BW, D)
    offs_p, mask_p, d, hcols, hcol_ok = _segment_geometry(H, W, i, seg, K, BW, HALO, D, CLAMP, False)
    w_base = w_ptr + b * swb + h * K * K * swc
    m, inv = _segment_stats(w_base, swc, swp, offs_p, mask_p, K * K, BW, SOFTMAX)
    head = b * sxb + h * CG * sxc
    row0 = _first_row(i, H, K, D, CLAMP)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        acc = _window_sums(x_ptr + head, sxc, sxp, offs_c, mask_c, w_base, swc, swp, row0, H, W, d, offs_p, mask_p,
                           hcols, hcol_ok, m, inv, K, BW, False, PRECISION, UPCAST, D, SOFTMAX)  # fmt: skip
        if HAS_GATE:
            acc = acc * tl.sigmoid(_load_tile_fp32(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
        here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
        tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def _sgdc_bwd_dot_kernel(
    dout_ptr, x_ptr, w_ptr, g_ptr, dw_ptr, dg_ptr, gy_ptr, stats_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, swb, swc, swp,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    """Over output segments: dgate, dweights, the statistics and (gated) g_y = dout * sigmoid(gate),
    rounded to x's dtype; dP stays in registers, one (HALO x BW) band per halo row."""
    pid_bh, b, h, i, seg = _row_segment(H, W, G, BW, D)
    offs_p, mask_p, d, hcols, hcol_ok = _segment_geometry(H, W, i, seg, K, BW, HALO, D, CLAMP, False)
    w_off = b * swb + h * K * K * swc  # shared by weights and dweights
    m, inv = _segment_stats(w_ptr + w_off, swc, swp, offs_p, mask_p, K * K, BW, SOFTMAX)
    if SOFTMAX:
        _store_stats(stats_ptr, pid_bh, H * W, offs_p, mask_p, m, inv)
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
            y = _window_sums(x_ptr + head, sxc, sxp, offs_c, mask_c, w_ptr + w_off, swc, swp, row0, H, W, d, offs_p,
                             mask_p, hcols, hcol_ok, m, inv, K, BW, SPLIT, PRECISION, UPCAST, D, SOFTMAX)  # fmt: skip
            dout = _load_tile_fp32(dout_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p)
            here = head + offs_c[:, None] * sxc + offs_p[None, :] * sxp
            mask = mask_c[:, None] & mask_p[None, :]
            if HAS_GATE:
                sg = tl.sigmoid(_load_tile_fp32(g_ptr + head, offs_c, sxc, offs_p, sxp, mask_c, mask_p))
                g_y = (dout * sg).to(gy_ptr.dtype.element_ty)
                tl.store(gy_ptr + here, g_y, mask=mask)
                tl.store(dg_ptr + here, (dout * y * sg * (1.0 - sg)).to(dg_ptr.dtype.element_ty), mask=mask)
                s_pdp += tl.sum(g_y.to(tl.float32) * y, axis=0)
            else:
                s_pdp += tl.sum(dout * y, axis=0)
        tl.debug_barrier()  # g_y written by every thread before it is read back

    # Pass 2, per halo row u: dP band = x_halo^T @ g over the channels; dweights = P * (dP - S)
    # (softmax) or dP (raw weights).
    for u in range(K):
        row = row0 + u * D
        row_ok = hcol_ok & (row >= 0) & (row < H)
        in_band = (d >= 0) & (d < K) & mask_p[None, :]
        dp = _dp_band(x_ptr + head, gy_ptr + head, sxc, sxp, row * W + hcols, row_ok, offs_p, mask_p, CG, HALO, BW,
                      BLOCK_C, PRECISION, UPCAST)  # fmt: skip
        if PRECISION != "ieee":
            # tf32x3 splits an infinite x into inf + NaN: where a dP of the band is not finite, the
            # band again in fp32 products, which keep IEEE arithmetic (entries off the band are unused)
            if _any_nonfinite(tl.where(in_band, dp, 0.0)):
                dp = _dp_band(x_ptr + head, gy_ptr + head, sxc, sxp, row * W + hcols, row_ok, offs_p, mask_p, CG, HALO,
                              BW, BLOCK_C, "ieee", UPCAST)  # fmt: skip
        if SOFTMAX:
            band = _forward_band(w_ptr + w_off, swc, swp, u, d, offs_p, mask_p, m, inv, K, SOFTMAX)
            dw = band * (dp - s_pdp[None, :])
        else:
            dw = dp
        tl.store(
            dw_ptr + w_off + (u * K + d) * swc + offs_p[None, :] * swp, dw.to(dw_ptr.dtype.element_ty), mask=in_band
        )


@triton.jit
def _dp_band(x_head, gy_head, sxc, sxp, hpix, hpix_ok, offs_p, mask_p, CG, HALO: tl.constexpr, BW: tl.constexpr,
             BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """dP (HALO x BW, fp32) of one halo row: x_halo^T @ g_y over the head's channels; entry (q, p)
    is dP of the tap of pixel p that reads halo pixel q (flat pixels ``hpix``)."""
    dp = tl.zeros([HALO, BW], tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        xh = _load_tile_native(x_head, offs_c, sxc, hpix, sxp, mask_c, hpix_ok)
        g_y = _load_tile_native(gy_head, offs_c, sxc, offs_p, sxp, mask_c, mask_p)
        dp = _mma(tl.trans(xh), g_y.to(xh.dtype), dp, PRECISION, UPCAST)
    return dp


@triton.jit
def _dx_band_row(acc, row, u, H, W, hcols, hcol_ok, tap, w_base, swc, swp, stats_base, gy_head, offs_c, sxc, sxp,
                 mask_c, K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, CLAMP: tl.constexpr,
                 SOFTMAX: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
    """acc + g_halo @ band' for the output pixels of image row ``row`` (its tap row ``u``) at the
    halo columns: band'[q, p] is the weight of tap (u, v) of output pixel q, v = tap[q, p] with
    clamped windows, 2R - tap[q, p] with centred ones. EXACT: the band's entries only
    (:func:`_masked_dot`)."""
    out_ok = hcol_ok & (row >= 0) & (row < H)
    opix = row * W + hcols
    if SOFTMAX:
        m, inv = _load_stats(stats_base, opix[:, None], out_ok[:, None])
    else:
        m, inv = 0.0, 1.0
    ok = (tap >= 0) & (tap < K) & out_ok[:, None]
    if CLAMP:
        band = _weight(w_base + (u * K + tap) * swc, opix[:, None], swp, ok, m, inv, SOFTMAX)
    else:  # tap is d, the forward's band column: the mirrored tap 2R - d read this pixel
        band = _weight(w_base + (u * K + 2 * (K // 2) - tap) * swc, opix[:, None], swp, ok, m, inv, SOFTMAX)
    gh = _load_tile_native(gy_head, offs_c, sxc, opix, sxp, mask_c, out_ok)
    if EXACT:
        return _masked_dot(gh, band, ok, acc, hcols.shape[0])
    return _band_dot(gh, band, acc, False, PRECISION, UPCAST)


@triton.jit
def _dx_rows(i, q, L, first, last, H, W, hcols, hcol_ok, tap, w_base, swc, swp, stats_base, gy_head, offs_c, sxc, sxp,
             mask_c, K: tl.constexpr, BW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             D: tl.constexpr, CLAMP: tl.constexpr, SOFTMAX: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
    """dx (BLOCK_C x BW, fp32) of the segment: the sum over the output rows whose windows cover row
    i (group row q of length L with clamped windows, output group rows first .. last)."""
    R: tl.constexpr = K // 2
    acc = tl.zeros([offs_c.shape[0], BW], tl.float32)
    if CLAMP:
        for e in range(first, last + 1):
            acc = _dx_band_row(acc, i + (e - q) * D, q - _clamped_start(e, L, K), H, W, hcols, hcol_ok, tap, w_base,
                               swc, swp, stats_base, gy_head, offs_c, sxc, sxp, mask_c, K, PRECISION, UPCAST, CLAMP,
                               SOFTMAX, EXACT)  # fmt: skip
    else:
        for u in range(K):
            # the output row whose tap row u reads row i
            acc = _dx_band_row(acc, i + (R - u) * D, u, H, W, hcols, hcol_ok, tap, w_base, swc, swp, stats_base,
                               gy_head, offs_c, sxc, sxp, mask_c, K, PRECISION, UPCAST, CLAMP, SOFTMAX,
                               EXACT)  # fmt: skip
    return acc


@triton.jit
def _sgdc_bwd_dx_dot_kernel(
    gy_ptr, w_ptr, stats_ptr, dx_ptr,
    H, W, CG, G,
    sxb, sxc, sxp, swb, swc, swp,
    K: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    D: tl.constexpr = 1, CLAMP: tl.constexpr = False, SOFTMAX: tl.constexpr = True,
):  # fmt: skip
    """Over input segments (row i, columns j0 + p): dx = sum over the output rows whose windows
    cover row i of g_halo @ band', a gather."""
    R: tl.constexpr = K // 2
    pid_bh, b, h, i, seg = _row_segment(H, W, G, BW, D)
    offs_q, mask_q, tap, hcols, hcol_ok = _segment_geometry(H, W, i, seg, K, BW, HALO, D, CLAMP, True)
    w_base = w_ptr + b * swb + h * K * K * swc
    stats_base = stats_ptr + pid_bh.to(tl.int64) * H * W * 2
    head = b * sxb + h * CG * sxc
    # Clamped windows: row i is group row q of its residue class, of length L, covered by the
    # windows of the output group rows first .. last.
    q = i // D
    L = (H - i % D + D - 1) // D
    first = tl.where(q <= K - 1, 0, q - R)
    last = tl.where(q >= L - K, L - 1, q + R)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        acc = _dx_rows(i, q, L, first, last, H, W, hcols, hcol_ok, tap, w_base, swc, swp, stats_base, gy_ptr + head,
                       offs_c, sxc, sxp, mask_c, K, BW, PRECISION, UPCAST, D, CLAMP, SOFTMAX, False)  # fmt: skip
        if _any_nonfinite(acc):  # as in _window_sums: a non-finite g_y or weight, each pixel's own terms
            acc = _dx_rows(i, q, L, first, last, H, W, hcols, hcol_ok, tap, w_base, swc, swp, stats_base, gy_ptr + head,
                           offs_c, sxc, sxp, mask_c, K, BW, PRECISION, UPCAST, D, CLAMP, SOFTMAX, True)  # fmt: skip
        here = head + offs_c[:, None] * sxc + offs_q[None, :] * sxp
        tl.store(dx_ptr + here, acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_q[None, :])
