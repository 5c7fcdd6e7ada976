"""Property-based differential test: every backend that runs here against the float64 oracle, on
configurations drawn by hypothesis, forward and every gradient: `unfold`, `torch` and `cpu` (each
instruction set) on the CPU, `triton` on a GPU or through its interpreter, `cuda` on a GPU
(without one, its kernels run in tests/test_cuda_on_cpu.py's host emulation, with cases of the
same kinds written out).

A drawn case (:func:`cases`) is a window_conv configuration (K from 1 to 17, dilation 1 to 3, zero
or clamped windows, softmax or raw weights, 1 to 3 heads of 1 or more channels, gate or not), a
shape (batch 0 and up, H and W from 1, below K as often as not; clamped windows need H, W >=
K*dilation, and a draw below that checks the ValueError instead), a dtype of the backend, a layout
(NCHW, channels_last, channel slices of a larger tensor, H and W swapped in memory), and values:
random inputs with logits scaled by 0 to 1e4, masked taps (logit -inf: the first tap of every pixel,
a fraction of the others, every tap of one pixel) and NaN, +inf and -inf at drawn places in x, the
weights and the gate (docs/op.md, "Non-finite inputs").

The comparison (:func:`_check`): NaN exactly where the oracle has NaN, the same infinities, and
|got - oracle| within the backend's tolerances for its dtype (sgdc_kernels.testing.tolerances),
applied to the scale of each result's rounding errors rather than to the result itself: rtol *
|oracle| + atol * (the sum of the magnitudes of its terms) + u * (the same with each probability
weighted by its logit's distance to the max, which fp32 rounds) + half a subnormal of the dtype
per term (sgdc_kernels.testing.error_scales). Where a probability underflows in the backend's
precision but not in float64 and meets an infinity, the result may be NaN instead of the oracle's
infinity (sgdc_kernels.testing.underflow_reference).

Profiles: "ci" (the default) runs a bounded number of examples per backend with a fixed seed
(derandomize: the same examples on every run, so CI is reproducible), about 2 minutes in all on 2
cores; SGDC_HYPOTHESIS_PROFILE=long runs thousands per backend (as many as the interpreter allows
for triton) from a fresh random seed each run. The failing examples found are kept as explicit
regression tests at the end of this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import pytest
import torch

from sgdc_kernels import available_backends, get_backend, registry
from sgdc_kernels.custom_ops import FLOATING_GPU
from sgdc_kernels.testing import (
    assert_close_scaled,
    backend_fn,
    error_scales,
    forward_backward,
    oracle,
    tolerances,
    underflow_reference,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("SGDC_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"SGDC_HYPOTHESIS_PROFILE: expected 'ci' or 'long', got {PROFILE!r}")

# Examples per backend and profile. The interpreter runs the triton kernels on tiny cases only and
# slowly (seconds a case): a few in CI, as many as fit in about 15 minutes in the long profile.
INTERPRETED = "triton" in available_backends("cpu")
EXAMPLES = {
    "ci": {"unfold": 40, "torch": 60, "triton": 6 if INTERPRETED else 30, "cuda": 30, "cpu": 30},
    "long": {"unfold": 3000, "torch": 3000, "triton": 60 if INTERPRETED else 2000, "cuda": 2000, "cpu": 2000},
}
# The largest case of each backend: pixels (H*W), channels, batch, and the longest side
LIMITS = {
    "unfold": dict(pixels=160, channels=12, batch=3, side=16),
    "torch": dict(pixels=160, channels=12, batch=3, side=16),
    "triton": dict(pixels=48, channels=6, batch=2, side=8)
    if INTERPRETED
    else dict(pixels=400, channels=40, batch=2, side=40),
    "cuda": dict(pixels=400, channels=40, batch=2, side=40),
    "cpu": dict(pixels=400, channels=40, batch=2, side=40),
}
LAYOUTS = ("nchw", "channels_last", "sliced", "transposed")
NONFINITE = (float("nan"), float("inf"), float("-inf"))


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    C: int
    H: int
    W: int
    G: int
    K: int
    dilation: int
    border: str
    normalize: str | None
    dtype: torch.dtype
    layout: str
    gate: bool
    seed: int
    logit_scale: float
    masked: float  # fraction of masked taps
    first_masked: bool  # the first tap of every pixel masked
    all_masked: bool  # every tap of one pixel masked
    specials: tuple  # (tensor, position in [0, 1), value): NaN and infinities

    @property
    def mode(self) -> dict:
        return dict(dilation=self.dilation, border=self.border, normalize=self.normalize)

    @property
    def valid(self) -> bool:
        return self.border == "zero" or min(self.H, self.W) >= self.K * self.dilation


@st.composite
def cases(draw, family: str, dtypes, sgdc_only: bool = False) -> Case:
    """A case for backend ``family`` (its limits) in one of ``dtypes``; ``sgdc_only``: sgdc_conv's
    configuration (the cuda variants v1 and v3 run only that). Hypothesis draws the first choice
    of a list most often: they come in the order of interest (the softmax, masked taps, a batch)."""
    lim = LIMITS[family]
    border = "zero" if sgdc_only else draw(st.sampled_from(("zero", "clamp")))
    normalize = "softmax" if sgdc_only else draw(st.sampled_from(("softmax", None)))
    dilation = 1 if sgdc_only else draw(st.sampled_from((1, 2, 3)))
    if border == "clamp":  # H, W >= K*dilation, or just below it (the ValueError)
        K = draw(st.sampled_from([k for k in (3, 5, 1, 7, 9, 11, 13, 15, 17) if k * dilation <= lim["side"]] or [1]))
        H = max(1, K * dilation + draw(st.sampled_from((0, 1, 2, 3, -1))))
        W = max(1, K * dilation + draw(st.sampled_from((1, 0, 2, 3, -1))))
    else:
        K = draw(st.sampled_from((3, 5, 7, 1, 9, 11, 13, 15, 17)))
        H = draw(st.integers(1, lim["side"]))
        W = draw(st.integers(1, max(1, min(lim["side"], lim["pixels"] // H))))
    G = draw(st.integers(1, 3))
    Cg = draw(st.integers(1, max(1, lim["channels"] // G)))
    special = st.tuples(
        st.sampled_from(("x", "gate", "weights")), st.floats(0, 1, exclude_max=True), st.sampled_from(NONFINITE)
    )
    specials = draw(st.sampled_from((0, 1, 2, 3)).flatmap(lambda n: st.lists(special, min_size=n, max_size=n)))
    masked = normalize is not None and draw(st.sampled_from((True, False)))
    return Case(
        B=draw(st.sampled_from(tuple(range(1, lim["batch"] + 1)) + (0,))),
        C=G * Cg,
        H=H,
        W=W,
        G=G,
        K=K,
        dilation=dilation,
        border=border,
        normalize=normalize,
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(LAYOUTS)),
        gate=draw(st.sampled_from((True, False))),
        seed=draw(st.integers(0, 2**31 - 1)),
        logit_scale=draw(st.sampled_from((2.0, 30.0, 1e4, 0.0, 1.0))) if normalize else 1.0,
        masked=draw(st.sampled_from((0.3, 0.9))) if masked else 0.0,
        first_masked=masked and draw(st.sampled_from((True, False))),
        all_masked=masked and draw(st.sampled_from((False, True))),
        specials=tuple(specials),
    )


def make_tensors(c: Case) -> tuple:
    """x, weights, gate (or None) of the case, in its dtype and layout."""
    gen = torch.Generator().manual_seed(c.seed)
    KK = c.K * c.K

    def randn(channels, scale=1.0):
        return scale * torch.randn(c.B, channels, c.H, c.W, generator=gen)

    x, weights = randn(c.C), randn(c.G * KK, c.logit_scale)
    if c.logit_scale >= 1e4:
        weights = weights.clamp(-1e4, 1e4)  # docs/op.md: logits up to 1e4 in magnitude
    gate = randn(c.C) if c.gate else None
    if c.normalize and c.B > 0:
        weights[torch.rand(weights.shape, generator=gen) < c.masked] = float("-inf")
        if c.first_masked:
            weights[:, ::KK] = float("-inf")
        if c.all_masked:
            weights[0, :KK, c.H // 2, c.W // 2] = float("-inf")
    named = {"x": x, "weights": weights, "gate": gate}
    for name, where, value in c.specials:
        t = named[name]
        if t is not None and t.numel():
            t.view(-1)[int(where * t.numel())] = value
    tensors = [t.to(c.dtype) if t is not None else None for t in (x, weights, gate)]
    return tuple(_layout(t, c.layout, k) if t is not None else None for k, t in enumerate(tensors))


def _layout(t: torch.Tensor, layout: str, k: int) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # channels k+1 .. of a larger tensor, as SGDC's split produces
        big = torch.zeros(t.shape[0], t.shape[1] + k + 2, *t.shape[2:], dtype=t.dtype)
        big[:, k + 1 : k + 1 + t.shape[1]] = t
        return big[:, k + 1 : k + 1 + t.shape[1]]
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


def _compute_precision(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the backend computes in: float64 for float64, the dtype itself for `unfold` (which
    computes in its input's dtype), float32 otherwise."""
    if dtype == torch.float64 or backend == "unfold":
        return dtype
    return torch.float32


def _check(backend: str, c: Case, device: str = "cpu") -> None:
    """:func:`_check_case` in a thread of its own. Run from the test's own deep stack (pytest,
    hypothesis), the triton interpreter's deeply nested calls keep crossing a boundary of CPython
    3.11's frame stack, which maps and unmaps a chunk each time (millions of page faults): in a
    fresh thread, with a shallow stack, the same examples run about 5 times faster."""
    errors = []

    def run():
        try:
            _check_case(backend, c, device)
        except BaseException as e:  # re-raised in the test's thread, for hypothesis and pytest
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _check_case(backend: str, c: Case, device: str) -> None:
    """``backend`` on the case's tensors (moved to ``device``) against the oracle (on the CPU)."""
    tensors = make_tensors(c)
    fn = backend_fn(backend, c.K, c.G, c.mode)
    on_device = [t.to(device) if t is not None else None for t in tensors]
    if not c.valid:
        with pytest.raises(ValueError, match="border='clamp' needs H and W of at least"):
            fn(*on_device)
        return
    grad_out = torch.randn(c.B, c.C, c.H, c.W, generator=torch.Generator().manual_seed(c.seed + 1)).to(c.dtype)
    out, grads = forward_backward(fn, on_device, grad_out.to(device))
    out, grads = out.cpu(), [g.cpu() for g in grads]
    exact = [t.double() if t is not None else None for t in tensors]
    ref_out, ref_grads = forward_backward(oracle(c.K, c.G, c.mode), exact, grad_out.double())
    compute = _compute_precision(backend.partition("@")[0], c.dtype)
    alt_out, alt_grads = underflow_reference(exact, grad_out, c.K, c.G, c.mode, tiny=torch.finfo(compute).tiny)
    scale_out, scale_grads = error_scales(exact, grad_out, c.K, c.G, c.mode)
    spread_out, spread_grads = error_scales(exact, grad_out, c.K, c.G, c.mode, spread=True)
    ones = (exact[0], torch.ones_like(exact[1]), exact[2])
    window_out, window_grads = error_scales(ones, grad_out, c.K, c.G, {**c.mode, "normalize": None})
    tol = tolerances(backend.partition("@")[0], c.dtype)
    info, cinfo = torch.finfo(c.dtype), torch.finfo(compute)
    terms = (c.K + c.K // 2) ** 2 + 2 * c.K * c.K + c.C // c.G + 16

    def tolerance(ref, scale, spread, window):
        finite = lambda t: torch.where(t.isfinite(), t, 0.0)  # noqa: E731
        return (
            tol["rtol"] * finite(ref).abs()
            + tol["atol"] * finite(scale)
            + 2 * cinfo.eps * finite(spread)
            # half a subnormal per term, halved last: tiny * eps / 2 is 2**-1075 in float64, which
            # rounds to 0
            + info.tiny * info.eps * (finite(window) + terms) / 2
        )

    results = [("out", out, ref_out, alt_out, scale_out, spread_out, window_out)]
    results += zip(("d_x", "d_weights", "d_gate"), grads, ref_grads, alt_grads, scale_grads, spread_grads, window_grads)
    assert out.dtype == c.dtype and out.shape == tensors[0].shape
    for name, got, ref, alt, scale, spread, window in results:
        assert got.dtype == c.dtype, name
        assert_close_scaled(got, ref, tolerance(ref, scale, spread, window), what=f"{backend} {name}", alternative=alt)


# ---------------------------------------------------------------------------------------------
# One test per backend
# ---------------------------------------------------------------------------------------------


def _examples(family: str) -> settings:
    return settings(settings.get_profile(PROFILE), max_examples=EXAMPLES[PROFILE][family])


@_examples("unfold")
@given(cases("unfold", (torch.float64, torch.float32, torch.float16, torch.bfloat16)))
def test_unfold_matches_the_oracle(case):
    """`unfold` computes in its input's dtype, and in float64 is the oracle itself: this checks its
    lower precisions (float64 only validates the draw)."""
    _check("unfold", case)


@_examples("torch")
@given(cases("torch", (torch.float64, torch.float32, torch.float16, torch.bfloat16)))
def test_torch_matches_the_oracle(case):
    _check("torch", case)


@contextlib.contextmanager
def triton_all_dtypes():
    """The triton backend declaring the GPU dtypes under the interpreter too (it declares float32
    there, so that nothing else picks it for 16-bit CPU tensors; its operators run them)."""
    saved = get_backend("triton")  # loaded
    registry._LOADED["triton"] = dataclasses.replace(saved, dtypes=FLOATING_GPU)
    try:
        yield
    finally:
        registry._LOADED["triton"] = saved


def _device(backend: str) -> str | None:
    """Where ``backend`` runs here: a GPU if it runs there, else the CPU (triton: through the
    interpreter), else None."""
    if torch.cuda.is_available() and backend in available_backends("cuda"):
        return "cuda"
    return "cpu" if backend in available_backends("cpu") else None


@pytest.mark.skipif(_device("triton") is None, reason="needs a GPU with triton or Triton's interpreter")
@pytest.mark.parametrize("variant", ["v2dot16", "v2dot", "v1"])
def test_triton_matches_the_oracle(variant):
    """Each variant (v2dot16: the taps kernels in float32, the band kernels in 16 bits; v2dot: the
    band kernels; v1: the taps kernels), on a GPU or through the interpreter on CPU tensors."""
    device = _device("triton")

    @_examples("triton")
    @given(cases("triton", (torch.float32, torch.float16, torch.bfloat16)))
    def check(case):
        _check(f"triton@{variant}", case, device)

    with triton_all_dtypes() if device == "cpu" else contextlib.nullcontext():
        check()


@pytest.mark.skipif(_device("cuda") != "cuda", reason="needs a GPU and the compiled cuda backend")
@pytest.mark.parametrize("variant", ["v2", "v3", "v1"])
def test_cuda_matches_the_oracle(variant):
    """Each variant; v1 and v3 run sgdc_conv's configuration only. Without a GPU,
    tests/test_cuda_on_cpu.py runs these kernels through the host emulation instead."""

    @_examples("cuda")
    @given(cases("cuda", (torch.float32, torch.float16, torch.bfloat16), sgdc_only=variant != "v2"))
    def check(case):
        _check(f"cuda@{variant}", case, "cuda")

    check()


def _cpu_variants() -> list:
    """The instruction sets of backend 'cpu', each skipped (with the reason) where it does not run."""
    why = registry.unavailable_reason("cpu")
    runs = () if why else get_backend("cpu").variants
    return [
        pytest.param(v, marks=pytest.mark.skipif(v not in runs, reason=why or f"this CPU does not run {v}"))
        for v in ("avx512", "avx2", "baseline")
    ]


@pytest.mark.parametrize("variant", _cpu_variants())
def test_cpu_matches_the_oracle(variant):
    """Each instruction set this CPU runs (avx512, avx2, baseline: the variants of backend 'cpu')."""

    @_examples("cpu")
    @given(cases("cpu", (torch.float32, torch.float64, torch.bfloat16, torch.float16)))
    def check(case):
        _check(f"cpu@{variant}", case)

    check()


# ---------------------------------------------------------------------------------------------
# Examples the long profile found, kept as regression tests
# ---------------------------------------------------------------------------------------------

REGRESSIONS = {
    # the band kernels' tl.dot spread an infinite x to every pixel of a row segment
    "triton@v2dot: -inf in x, dilated clamped windows": (
        "triton@v2dot",
        Case(B=2, C=2, H=9, W=7, G=2, K=3, dilation=2, border="clamp", normalize="softmax", dtype=torch.float32,
             layout="transposed", gate=True, seed=4952896, logit_scale=2.0, masked=0.0, first_masked=False,
             all_masked=False, specials=(("x", 0.425045022518114, float("-inf")), ("x", 0.08, float("-inf")),
                                         ("weights", 0.02, float("-inf")))),
    ),
    # float64 with logits of 1e4: a d_weights one subnormal (2**-1074) from the oracle, which the
    # subnormal term of the tolerance must allow (it rounded to 0 in float64)
    "cpu: float64 subnormal d_weights, logits of 1e4": (
        "cpu",
        Case(B=1, C=3, H=13, W=12, G=3, K=11, dilation=1, border="clamp", normalize="softmax", dtype=torch.float64,
             layout="nchw", gate=True, seed=2, logit_scale=10000.0, masked=0.0, first_masked=False, all_masked=False,
             specials=()),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regressions(name):
    backend, case = REGRESSIONS[name]
    device = _device(backend.partition("@")[0])
    if device is None:
        pytest.skip(f"{backend} does not run here")
    with triton_all_dtypes() if backend.startswith("triton") and device == "cpu" else contextlib.nullcontext():
        _check(backend, case, device)
