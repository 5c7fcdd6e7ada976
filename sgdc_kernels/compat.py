"""Drop-in replacements for operators other packages removed, on this package's fused kernels.

NATTEN's unfused 2-D neighborhood attention (``natten.functional`` of NATTEN 0.17; removed in
0.20, the old names in 0.17.5), which NAT/DiNAT, OverLoCK (ContMix), SegMAN and AgileFormer call:

* :func:`na2d_qk`: each pixel's query against the keys of its window, plus NATTEN's relative
  positional bias; :func:`natten2dqkrpb` is its old name and argument order.
* :func:`na2d_av`: each pixel's window of values weighted by its attention weights;
  :func:`natten2dav` is its old name.

Switch with one import::

    from sgdc_kernels.compat import na2d_qk, na2d_av  # instead of: from natten.functional import ...

and for Hugging Face transformers' DiNAT models, with one call, :func:`use_with_transformers_dinat`.
They run on every backend of :func:`sgdc_kernels.window_conv` (fused CUDA and Triton kernels on
GPUs, PyTorch elsewhere), in float32, float16 and bfloat16, under autograd and torch.compile.
"""

from __future__ import annotations

import re

import torch

from .ops import autocast_inputs, check_int, check_like, check_tensor, window_conv, window_dots
from .reference import accumulation_dtype, window_starts
from .registry import check_name

Tensor = torch.Tensor

__all__ = ["na2d_qk", "na2d_av", "natten2dqkrpb", "natten2dav", "use_with_transformers_dinat"]


def _square(name: str, value: object) -> object:
    """The one value of an int or of a pair of equal values (NATTEN accepts per-axis values; these
    kernels are square); :func:`check_int` checks it."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"{name}: expected an int or a pair of equal ints (square windows only), got {tuple(value)!r}"
            )
        value = value[0]
    return value


def _window_args(kernel_size, dilation, is_causal, extra_name: str, extra) -> tuple[int, int]:
    """``(K, dilation)`` of NATTEN's window arguments, checked; what these operators do not
    support (causal windows, extra tokens appended to every neighborhood) raises ValueError."""
    K = _square("kernel_size", kernel_size)
    d = _square("dilation", dilation)
    if any(is_causal) if isinstance(is_causal, (tuple, list)) else is_causal:
        raise ValueError("is_causal: causal neighborhoods are not supported; expected False")
    if extra is not None:
        raise ValueError(f"{extra_name}: extra tokens appended to every neighborhood are not supported; expected None")
    check_int("kernel_size", K, odd=True, minimum=2)
    check_int("dilation", d)
    return K, d


def _check_pair(name: str, t: Tensor, last: str, ref_name: str, ref: Tensor, K: int, d: int) -> None:
    """``t`` is (B, heads, H, W, ``last``) for ``ref`` of shape (B, heads, H, W, D), on its device
    (``last``: "kernel_size**2", or "D" for ref's D); H and W are at least ``K * d`` (NATTEN's
    windows lie inside the image)."""
    check_tensor(name, t, f"(B, heads, H, W, {last})")
    check_tensor(ref_name, ref, "(B, heads, H, W, D)")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}")
    B, heads, H, W, D = ref.shape
    last_size = D if last == "D" else K * K
    if tuple(t.shape) != (B, heads, H, W, last_size):
        raise ValueError(
            f"{name}: expected shape (B, heads, H, W, {last}) = {(B, heads, H, W, last_size)} for {ref_name} of "
            f"shape {tuple(ref.shape)}, got {tuple(t.shape)}"
        )
    if H < K * d or W < K * d:
        raise ValueError(f"{ref_name}: input axes must be at least kernel_size * dilation = {K * d}, got H={H}, W={W}")


def _channels(t: Tensor) -> Tensor:
    """(B, heads, H, W, C) -> (B*heads, C, H, W) channels_last: a view of a contiguous tensor."""
    B, heads, H, W, C = t.shape
    return t.reshape(B * heads, H, W, C).permute(0, 3, 1, 2)


def _natten_layout(t: Tensor, B: int, heads: int) -> Tensor:
    """(B*heads, C, H, W) -> (B, heads, H, W, C); a view of a channels_last tensor."""
    _, C, H, W = t.shape
    return t.permute(0, 2, 3, 1).reshape(B, heads, H, W, C)


def na2d_av(
    attn: Tensor,
    value: Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    additional_values: Tensor | None = None,
    is_causal: bool | tuple[bool, bool] = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """NATTEN's ``na2d_av``: ``out[b, h, i, j] = sum_t attn[b, h, i, j, t] * value[b, h, window_t(i, j)]``.

    Args:
        attn: (B, heads, H, W, K*K) weights, used as given (apply the softmax before, as with
            NATTEN); tap t = u*K + v is row u, column v of the pixel's window.
        value: (B, heads, H, W, D).
        kernel_size: K, odd and > 1 (an int or a pair of equal ints).
        dilation: distance between taps, >= 1 (an int or a pair of equal ints).
        additional_values: must be None (extra tokens are not supported).
        is_causal: must be False (causal masks are not supported).
        backend: as in :func:`sgdc_kernels.window_conv`.

    Windows follow NATTEN's rule: each pixel's window is shifted to stay inside the image, so H and
    W must be at least ``kernel_size * dilation``. Returns a tensor shaped like ``value``, in its
    dtype. No copy of ``attn`` or ``value`` is made when they are contiguous: the heads become the
    batch of ``window_conv`` and the last dimension its channels (channels_last).
    """
    K, d = _window_args(kernel_size, dilation, is_causal, "additional_values", additional_values)
    _check_pair("attn", attn, "kernel_size**2", "value", value, K, d)
    attn, value, _ = autocast_inputs(attn, value, None)
    check_like("attn", attn, "value", value)
    out = window_conv(
        _channels(value), _channels(attn), kernel_size=K, dilation=d, border="clamp", normalize=None, backend=backend
    )
    return _natten_layout(out, *value.shape[:2])


def na2d_qk(
    query: Tensor,
    key: Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    additional_keys: Tensor | None = None,
    is_causal: bool | tuple[bool, bool] = False,
    rpb: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """NATTEN's ``na2d_qk``: ``attn[b, h, i, j, t] = <query[b, h, i, j], key[b, h, window_t(i, j)]>
    + rpb[h, K-1 + di, K-1 + dj]``, with (di, dj) the offset of tap t's key from the query, in
    taps: ((key row - i) / dilation, (key column - j) / dilation).

    Args:
        query, key: (B, heads, H, W, D) (scale the query before, as with NATTEN).
        kernel_size: K, odd and > 1 (an int or a pair of equal ints).
        dilation: distance between taps, >= 1 (an int or a pair of equal ints).
        additional_keys: must be None (extra tokens are not supported).
        is_causal: must be False (causal masks are not supported).
        rpb: relative positional bias, (heads, 2K-1, 2K-1), or None.
        backend: as in :func:`sgdc_kernels.window_conv`.

    Returns (B, heads, H, W, K*K) in ``query``'s dtype, tap t = u*K + v as in :func:`na2d_av`, over
    NATTEN's windows (shifted to stay inside the image; H and W at least ``kernel_size *
    dilation``). Differentiable in ``query``, ``key`` and ``rpb``; the gradient of ``rpb`` is a sum
    in a fixed order (matrix products, no atomics), so it is deterministic. The dot products are the
    backend's operator ``sgdc::<name>_dots`` (the weight pass of ``window_conv``'s backward).
    """
    K, d = _window_args(kernel_size, dilation, is_causal, "additional_keys", additional_keys)
    check_name(backend)
    _check_pair("query", query, "D", "key", key, K, d)
    if rpb is not None:
        check_tensor("rpb", rpb, "(heads, 2*kernel_size-1, 2*kernel_size-1)")
        table = (key.shape[1], 2 * K - 1, 2 * K - 1)
        if tuple(rpb.shape) != table:
            raise ValueError(
                f"rpb: expected shape (heads, 2*kernel_size-1, 2*kernel_size-1) = {table} for key of shape "
                f"{tuple(key.shape)}, got {tuple(rpb.shape)}"
            )
    query, key, rpb = autocast_inputs(query, key, rpb)
    check_like("query", query, "key", key)
    if rpb is not None:
        check_like("rpb", rpb, "key", key)
    B, heads, H, W, _ = key.shape
    attn = _natten_layout(window_dots(backend, _channels(query), _channels(key), K, d, True), B, heads)
    if rpb is not None:
        attn = attn + relative_bias(rpb, H, W, K, d).to(attn.dtype)
    return attn


def relative_bias(rpb: Tensor, H: int, W: int, kernel_size: int, dilation: int) -> Tensor:
    """NATTEN's relative positional bias at every pixel and tap: (heads, H, W, K*K), in the
    accumulation dtype of ``rpb`` (float32 for 16-bit types).

    Tap u of row i reads row ``S(i) + u*dilation``, at ``a = K-1 + (S(i) - i)/dilation + u`` rows
    of the table (NATTEN's ``get_pb_start(i) + u``); the column index b likewise. The row index
    depends only on (i, u) and the column index only on (j, v), so the bias is a product of one-hot
    matrices, ``R[(i, u), a] * rpb[h, a, b] * C[(j, v), b]``: a gather whose gradient, ``R^T dA
    C``, is two matrix products (deterministic, unlike the atomic adds of a scatter).
    """
    K, d = kernel_size, dilation

    def one_hot(n: int) -> Tensor:  # (n, K, 2K-1): pixel, tap -> table index
        i = torch.arange(n, device=rpb.device)
        index = K - 1 + (window_starts(n, K, d, True, rpb.device) - i) // d
        index = index[:, None] + torch.arange(K, device=rpb.device)
        return torch.nn.functional.one_hot(index, 2 * K - 1).to(accumulation_dtype(rpb.dtype))

    table = rpb.to(accumulation_dtype(rpb.dtype))
    rows = torch.einsum("iua,hab->hiub", one_hot(H), table)
    bias = torch.einsum("hiub,jvb->hijuv", rows, one_hot(W))
    return bias.reshape(rpb.shape[0], H, W, K * K)


def natten2dqkrpb(query: Tensor, key: Tensor, rpb: Tensor | None, kernel_size: int, dilation: int) -> Tensor:
    """NATTEN's older name of :func:`na2d_qk` with a bias (removed in NATTEN 0.17.5), in its
    argument order, as Hugging Face transformers' NAT and DiNAT call it."""
    return na2d_qk(query, key, kernel_size, dilation, rpb=rpb)


def natten2dav(attn: Tensor, value: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """NATTEN's older name of :func:`na2d_av` (removed in NATTEN 0.17.5)."""
    return na2d_av(attn, value, kernel_size, dilation)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers' DiNAT
# ---------------------------------------------------------------------------------------------

# transformers 4.54 to 4.57 unpack DiNAT's 4-D hidden states into three names and fail; 5.x hands
# NATTEN's operators (B, W, H, heads, D) instead of (B, heads, H, W, D). 4.53 is the last release
# whose DiNAT attention is right.
DINAT_LAST_GOOD = (4, 53)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "4.53.3" or "5.0.0.dev0"."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def use_with_transformers_dinat() -> None:
    """Make Hugging Face transformers' DiNAT models (``DinatModel``, ``DinatForImageClassification``,
    ``DinatBackbone``) run on this package, without NATTEN::

        import sgdc_kernels.compat; sgdc_kernels.compat.use_with_transformers_dinat()

    Call it once, before building the models. It points ``natten2dqkrpb`` and ``natten2dav`` of
    ``transformers.models.dinat.modeling_dinat`` at :func:`natten2dqkrpb` and :func:`natten2dav`
    and lets that module's models be built without the ``natten`` package (its check of the
    ``natten`` backend, and nothing else, is skipped there). No module named ``natten`` is installed
    or imported; the rest of transformers is left as it is. Calling it again does nothing more.

    Raises RuntimeError with transformers 4.54 and later, whose DiNAT attention is broken (4.54 to
    4.57 fail to unpack its hidden states; 5.x passes NATTEN's operators (B, W, H, heads, D)
    tensors instead of (B, heads, H, W, D), computing a wrong attention); 4.53 and earlier work
    (``pip install "transformers<=4.53.3"``). ImportError without transformers.
    """
    import transformers

    if _release(transformers.__version__) > DINAT_LAST_GOOD:
        raise RuntimeError(
            f"transformers {transformers.__version__}: its DiNAT attention is broken (transformers 4.54 to 4.57 unpack "
            "its 4-D hidden states into three names and fail; 5.x passes NATTEN's operators (B, W, H, heads, D) "
            "instead of (B, heads, H, W, D), which computes a wrong attention); the DiNAT of transformers 4.53 and "
            'earlier is right: pip install "transformers<=4.53.3"'
        )
    from transformers.models.dinat import modeling_dinat

    if getattr(modeling_dinat, "_sgdc_kernels", False):
        return
    check_backends = modeling_dinat.requires_backends

    def requires_backends(obj, backends):
        backends = [b for b in (backends if isinstance(backends, (list, tuple)) else [backends]) if b != "natten"]
        if backends:
            check_backends(obj, backends)

    modeling_dinat.natten2dqkrpb = natten2dqkrpb
    modeling_dinat.natten2dav = natten2dav
    modeling_dinat.requires_backends = requires_backends
    modeling_dinat._sgdc_kernels = True
