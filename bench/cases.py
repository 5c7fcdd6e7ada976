"""The cases bench/run.py times, and the function each of its rows calls.

A case is one call of an operator at one shape: :class:`ConvCase`, an sgdc_conv call of shape
BxCxHxWxGxK, :class:`NA2DCase`, an na2d_av call of OverLoCK's dynamic (ContMix) blocks in
NATTEN's layout (:data:`OVERLOCK_SHAPES`), or :class:`AttentionCase`, the neighborhood attention
of a DiNAT layer (na2d_qk with its bias, softmax, na2d_av; :data:`DINAT_SHAPES`).
:func:`parse_shapes` turns a --shapes list into cases; :func:`make_fn` builds the callable a row
times, from a backend name (``name`` or ``name@variant``, passed to the operator as is) or a
compiled peer; :func:`skip_reason` says why a row's kernel variant does not run a case's
configuration.
"""

from __future__ import annotations

import functools

import torch

from sgdc_kernels import registry, sgdc_conv, testing
from sgdc_kernels.compat import na2d_av, na2d_qk
from sgdc_kernels.reference import shift_forward

PEER = "torch.compile(shift)"  # sgdc_conv shapes only
UNFOLD_PEER = "torch.compile(unfold)"
PEERS = (PEER, UNFOLD_PEER)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


class ConvCase:
    """An sgdc_conv call: x, kernel logits and gate logits of shape BxCxHxWxGxK."""

    op, default_peer = "sgdc_conv", PEER
    config = (1, False, True)  # (dilation, clamp, softmax) of the window sum, as Backend.runs takes it

    def __init__(self, dims: tuple[int, ...]):
        self.dims, self.label = dims, "x".join(map(str, dims))

    def layouts(self, requested: list[str]) -> list[str]:
        return requested

    def inputs(self, dtype, device, layout):
        """Random inputs (never zeros) in the given memory layout, and a gradient for the output."""
        torch.manual_seed(0)
        x, kernel, gate = testing.make_inputs(self.dims, dtype, device, memory_format=LAYOUTS[layout], scale=1.0)
        return (x, kernel, gate), torch.randn_like(x)

    def call(self, backend: str, x, kernel, gate):
        B, C, H, W, G, K = self.dims
        return sgdc_conv(x, kernel, gate, kernel_size=K, num_heads=G, backend=backend)

    def shift(self, x, kernel, gate):
        """The shift-and-accumulate formulation, for torch.compile (the PEER row)."""
        return shift_forward(x, kernel, gate, self.dims[5], self.dims[4])

    def tiny(self) -> ConvCase:
        B, C, H, W, G, K = self.dims
        return ConvCase((1, C, 2, 2, G, K))

    def roofline_bytes(self, dtype) -> tuple[int, int]:
        """Fewest bytes moved (docs/performance.md): forward, and forward+backward."""
        B, C, H, W, G, K = self.dims
        act, taps = B * C * H * W, B * G * K * K * H * W
        size = torch.empty((), dtype=dtype).element_size()
        fwd = (3 * act + taps) * size  # read x, kernel, gate; write out
        bwd = (5 * act + 2 * taps) * size  # read x, kernel, gate, dout; write dx, dkernel, dgate
        return fwd, fwd + bwd


class NA2DCase:
    """An na2d_av call in NATTEN's layout: attn (B, heads, H, W, K*K), softmaxed as a model passes
    it, and value (B, heads, H, W, D); dims = (B, heads, H, W, D, K)."""

    op, default_peer = "na2d_av", UNFOLD_PEER
    config = (1, True, False)  # NATTEN's clamped windows over raw (already softmaxed) weights

    def __init__(self, label: str, dims: tuple[int, ...]):
        self.label, self.dims = label, dims

    def layouts(self, requested: list[str]) -> list[str]:
        return ["natten"]

    def inputs(self, dtype, device, layout="natten"):
        B, G, H, W, D, K = self.dims
        torch.manual_seed(0)
        attn = torch.randn(B, G, H, W, K * K, device=device).softmax(dim=-1).to(dtype)
        value = torch.randn(B, G, H, W, D, device=device).to(dtype)
        return (attn, value), torch.randn_like(value)

    def call(self, backend: str, attn, value):
        return na2d_av(attn, value, self.dims[5], backend=backend)

    def tiny(self) -> NA2DCase:
        B, G, H, W, D, K = self.dims
        return NA2DCase(self.label, (1, G, K, K, D, K))

    def describe(self) -> str:
        B, G, H, W, D, K = self.dims
        same = [n for n, dims in OVERLOCK_SHAPES.items() if dims == self.dims and n != self.label]
        also = f" (the same call as {', '.join(same)})" if same else ""
        return (f"{self.label}: na2d_av, attn ({B}, {G}, {H}, {W}, {K * K}), value ({B}, {G}, {H}, {W}, {D}), "
                f"kernel_size {K}{also}")  # fmt: skip

    def roofline_bytes(self, dtype) -> tuple[int, int]:
        """Fewest bytes moved: forward, and forward+backward."""
        B, G, H, W, D, K = self.dims
        pixels = B * G * H * W
        size = torch.empty((), dtype=dtype).element_size()
        fwd = (K * K + 2 * D) * pixels * size  # read attn, value; write out
        bwd = (2 * K * K + 3 * D) * pixels * size  # read attn, value, dout; write dattn, dvalue
        return fwd, fwd + bwd


# The na2d_av calls of OverLoCK's dynamic (ContMix) blocks, from the OverLoCK code: per model, the
# embedding widths and sub_num_heads of stages 3 and 4, which run at 1/16 and 1/32 of the input
# with a large kernel of 13 and 7 and a small kernel of 5. A block has 2*sub_num_heads heads; each
# of its two na2d_av calls (small and large kernel) takes every head, with half of the channels.
OVERLOCK_MODELS = {"xt": ((256, 336), (4, 6)), "t": ((256, 512), (4, 8))}
OVERLOCK_KERNELS = {3: (5, 13), 4: (5, 7)}
OVERLOCK_INPUT, OVERLOCK_BATCH = 512, 8  # a segmentation input; the batch of the sgdc_conv reference shape


def overlock_shapes() -> dict[str, tuple[int, ...]]:
    """``overlock-<model>-s<stage>-k<K>`` -> (B, heads, H, W, D, K) of its na2d_av call."""
    shapes = {}
    for model, (widths, sub_heads) in OVERLOCK_MODELS.items():
        for stage, dim, sub in zip((3, 4), widths, sub_heads):
            heads, side = 2 * sub, OVERLOCK_INPUT // 2 ** (stage + 1)
            for K in OVERLOCK_KERNELS[stage]:
                shapes[f"overlock-{model}-s{stage}-k{K}"] = (OVERLOCK_BATCH, heads, side, side, dim // (2 * heads), K)
    return shapes


OVERLOCK_SHAPES = overlock_shapes()


class AttentionCase:
    """The neighborhood attention of a NAT/DiNAT layer in NATTEN's layout, as transformers' DiNAT
    computes it: ``na2d_av(softmax(na2d_qk(query, key, rpb=rpb)), value)``; query, key and value
    (B, heads, H, W, D), rpb (heads, 2K-1, 2K-1); dims = (B, heads, H, W, D, K, dilation). Every
    input gets a gradient."""

    op, default_peer = "na2d_qk+softmax+na2d_av", UNFOLD_PEER

    def __init__(self, label: str, dims: tuple[int, ...]):
        self.label, self.dims = label, dims
        self.config = (dims[6], True, False)  # NATTEN's clamped windows over raw weights

    def layouts(self, requested: list[str]) -> list[str]:
        return ["natten"]

    def inputs(self, dtype, device, layout="natten"):
        B, G, H, W, D, K, d = self.dims
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, G, H, W, D, device=device).to(dtype) for _ in range(3))
        rpb = torch.randn(G, 2 * K - 1, 2 * K - 1, device=device).to(dtype)
        return (q / D**0.5, k, v, rpb), torch.randn_like(v)

    def call(self, backend: str, query, key, value, rpb):
        K, d = self.dims[5:]
        attn = na2d_qk(query, key, K, d, rpb=rpb, backend=backend).softmax(dim=-1)
        return na2d_av(attn, value, K, d, backend=backend)

    def tiny(self) -> AttentionCase:
        B, G, H, W, D, K, d = self.dims
        return AttentionCase(self.label, (1, G, K * d, K * d, D, K, d))

    def describe(self) -> str:
        B, G, H, W, D, K, d = self.dims
        return (f"{self.label}: na2d_qk (rpb) + softmax + na2d_av, query/key/value ({B}, {G}, {H}, {W}, {D}), "
                f"kernel_size {K}, dilation {d}")  # fmt: skip

    def roofline_bytes(self, dtype) -> tuple[int, int]:
        """Fewest bytes moved by a fused attention: forward, and forward+backward."""
        B, G, H, W, D, K, d = self.dims
        act = B * G * H * W * D * torch.empty((), dtype=dtype).element_size()
        return 4 * act, 11 * act  # read q, k, v, write out; then read q, k, v, dout, write dq, dk, dv


# DiNAT-Mini (transformers' DinatConfig defaults: embed_dim 64, heads 2, 4, 8, 16 of 32 channels,
# kernel 7, dilations up to 8, 4, 2, 1) at a 224x224 input: stage s at 56 / 2**(s-1) pixels a side,
# the largest dilation of each stage (its window spans the whole image).
DINAT_BATCH = 8
DINAT_SHAPES = {
    f"dinat-mini-s{s}": (DINAT_BATCH, 2**s, 56 // 2 ** (s - 1), 56 // 2 ** (s - 1), 32, 7, 2 ** (4 - s))
    for s in (1, 2, 3, 4)
}
NAMED = {"overlock": (NA2DCase, OVERLOCK_SHAPES), "dinat": (AttentionCase, DINAT_SHAPES)}


def parse_shapes(text: str) -> list:
    """The cases of a --shapes list: BxCxHxWxGxK, OverLoCK or DiNAT names, `overlock` for every
    distinct OverLoCK call (models sharing a call are timed once, under the first name) or `dinat`
    for DiNAT-Mini's four stages. A bad entry raises ValueError with one line."""
    cases = []
    for item in text.split(","):
        if item in NAMED:
            kind, shapes = NAMED[item]
            first = {}
            for name, dims in shapes.items():
                first.setdefault(dims, name)
            cases += [kind(name, dims) for dims, name in first.items()]
        elif any(item in shapes for _, shapes in NAMED.values()):
            kind, shapes = next((k, s) for k, s in NAMED.values() if item in s)
            cases.append(kind(item, shapes[item]))
        else:
            cases.append(ConvCase(parse_shape(item)))
    return cases


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) != 6 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"shape {text!r}: expected BxCxHxWxGxK, e.g. 8x256x128x128x4x7, 'overlock', 'dinat' or one of "
            + ", ".join([*OVERLOCK_SHAPES, *DINAT_SHAPES])
        )
    return tuple(int(p) for p in parts)


_COMPILED = {}


def make_fn(backend: str, case):
    """A callable (*inputs) -> out: the case's operator called with ``backend=backend`` (a name or
    ``name@variant``), or a compiled peer."""
    if backend == PEER and not hasattr(case, "shift"):
        raise ValueError(f"{PEER} times sgdc_conv shapes only")
    if backend in PEERS:
        # one compiled callable per peer and case; torch.compile keeps its graphs per code object
        # (shared by the cases), so bench/run.py resets dynamo between cases to stay under its
        # recompile limit
        key = (backend, case.label)
        if key not in _COMPILED:
            fn = case.shift if backend == PEER else functools.partial(case.call, "unfold")
            _COMPILED[key] = torch.compile(fn, dynamic=False)
        return _COMPILED[key]
    return functools.partial(case.call, backend)


def skip_reason(backend: str, case, device: str, dtype: torch.dtype) -> str | None:
    """Why a row of ``backend`` does not time ``case``: its kernel variant does not run the case's
    configuration (Backend.runs), and a call would raise the ValueError whose message this returns;
    None for a row that runs."""
    name, sep, variant = backend.partition("@")
    if not sep or backend in PEERS or registry.get_backend(name).runs(variant, *case.config):
        return None
    try:
        registry.resolve(backend, device, dtype, *case.config)
    except ValueError as exc:
        return str(exc).removeprefix("backend: ")
    return None  # resolve accepts it after all: let the row run
