"""The `triton` backend (triton_ops/) against the float64 unfold oracle, for every kernel variant
and every configuration of window_conv (dilation 1 and 2, zero or clamped borders, softmax or raw
weights).

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and these tests run the very same kernels on CPU
tensors through Triton's interpreter (slow, so the shapes are tiny). With a GPU they run on CUDA
tensors in float32, float16 and bfloat16, plus K up to 17, torch.compile and opcheck. Each test
that runs kernels does so for every kernel variant (``backend="triton@<variant>"``) whose kernels
differ for its dtype (a variant that runs the same kernels as an earlier one is skipped, saying so).
The file keeps the interpreter and the GPU tests of the backend together (about 450 lines), so that
one command runs everything the backend is checked by.
"""

import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from sgdc_kernels import available_backends, get_backend, registry, sgdc_conv, window_conv
from sgdc_kernels.custom_ops import BACKWARD_SCHEMA, FLOATING_GPU, FORWARD_SCHEMA
from sgdc_kernels.testing import TOLERANCES as TOL
from sgdc_kernels.testing import (
    assert_close,
    backend_fn,
    check_backend,
    check_tensors,
    make_inputs,
    mode_args,
    oracle,
)
from sgdc_kernels.testing import forward_backward as run

if importlib.util.find_spec("triton") is None:  # no triton here: every test below skips
    impl = None
else:  # triton is installed: failing to import the backend is an error, never a silent skip
    from sgdc_kernels.triton_ops import ops as impl

CPU_OK = "triton" in available_backends("cpu")  # only under TRITON_INTERPRET=1
CUDA_OK = torch.cuda.is_available() and "triton" in available_backends("cuda")
requires_interpreter = pytest.mark.skipif(not CPU_OK, reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
requires_gpu = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU with triton")

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _inputs(shape, dtype=torch.float32, device="cpu", gate=True, layout="nchw"):
    return make_inputs(shape, dtype, device, gate=gate, memory_format=LAYOUTS[layout])


def spec(variant):
    """The backend argument that selects ``variant``, as a user selects it."""
    return f"triton@{variant}"


def triton_conv(variant, K, G):
    return backend_fn(spec(variant), K, G)


def check_against_oracle(variant, shape, dtype, device, with_gate, layout, scale=2.0):
    *_, G, K = shape
    tensors = make_inputs(shape, dtype, device, gate=with_gate, memory_format=LAYOUTS[layout], scale=scale)
    check_tensors(spec(variant), tensors, K, G)


VARIANTS = impl.VARIANTS if impl is not None else ()


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Each kernel variant in turn; the tests select it as ``backend=spec(variant)``."""
    return request.param


def _first_variant(dtype, variant):
    """The first variant that runs the kernels ``variant`` runs for ``dtype``."""
    family = impl.kernel_family(variant, dtype)
    return next(v for v in VARIANTS if impl.kernel_family(v, dtype) == family)


def skip_if_same_kernels(variant, dtype):
    family = impl.kernel_family(variant, dtype)
    first = _first_variant(dtype, variant)
    if first != variant:
        pytest.skip(f"{variant} runs the same {family} kernels as {first} for {dtype}")


# window_conv's configurations: dilation x border x normalization (sgdc_conv's is the first)
MODES = [
    dict(dilation=d, border=b, normalize=n)
    for d, b, n in itertools.product((1, 2), ("zero", "clamp"), ("softmax", None))
]
CLAMPED = dict(dilation=2, border="clamp", normalize=None)  # every switch away from sgdc_conv's


def _mode_id(mode):
    return f"d{mode['dilation']}-{mode['border']}-{mode['normalize'] or 'raw'}"


@pytest.fixture
def all_dtypes(monkeypatch):
    """Backend 'triton' declaring the GPU dtypes under the interpreter too, for one test: the
    operators run 16-bit CPU tensors (the backend declares float32 only there, so that nothing
    else picks it for them), and check_backend goes through window_conv."""
    monkeypatch.setitem(registry._LOADED, "triton", dataclasses.replace(get_backend("triton"), dtypes=FLOATING_GPU))


# ---------------------------------------------------------------------------------------------
# CPU, through the interpreter
# ---------------------------------------------------------------------------------------------

CPU_CASES = [
    # (B, C, H, W, G, K), gate, layout, logit scale
    ((2, 8, 5, 7, 2, 3), True, "nchw", 2.0),  # borders on every side, two heads
    ((2, 8, 5, 7, 2, 3), False, "channels_last", 30.0),  # near one-hot softmax
    ((1, 4, 3, 2, 4, 7), True, "channels_last", 2.0),  # H and W < K, four heads of one channel
    ((1, 4, 3, 2, 4, 7), False, "nchw", 2.0),
    ((2, 6, 4, 5, 3, 1), True, "nchw", 2.0),  # K = 1, three heads of two channels
    ((1, 3, 6, 1, 1, 5), False, "channels_last", 2.0),  # W = 1
    ((1, 3, 1, 6, 1, 5), True, "nchw", 30.0),  # H = 1
    ((1, 8, 9, 8, 1, 7), True, "channels_last", 30.0),  # the paper's K, one head
    ((1, 2, 3, 4, 1, 13), True, "nchw", 2.0),  # K = 13
    ((1, 4, 4, 4, 2, 9), False, "channels_last", 2.0),  # K = 9
]


def _case_id(case):
    shape, with_gate, layout, scale = case
    return "x".join(map(str, shape)) + f"-{'gate' if with_gate else 'nogate'}-{layout}-s{scale:g}"


@requires_interpreter
@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_interpreter_matches_oracle(variant, case):
    skip_if_same_kernels(variant, torch.float32)
    shape, with_gate, layout, scale = case
    check_against_oracle(variant, shape, torch.float32, "cpu", with_gate, layout, scale)


@requires_interpreter
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_interpreter_several_tiles_and_channel_blocks(variant, monkeypatch, layout):
    # Partial last blocks everywhere. v1, shrunk to blocks of 2 channels and 16 pixels: 3 channel
    # blocks (dP summed across them) and 3 pixel tiles per (batch, head). The band kernels at
    # their smallest blocks (16 channels, row segments of 16): 3 channel blocks and 3 segments.
    skip_if_same_kernels(variant, torch.float32)
    monkeypatch.setitem(impl.INTERPRET_BLOCKS, "BLOCK_P", 16)
    monkeypatch.setitem(impl.INTERPRET_BLOCKS, "BLOCK_C", 2)
    assert impl.INTERPRET_DOT_BLOCKS == {"BW": 16, "BLOCK_C": 16}
    band = impl.kernel_family(variant, torch.float32) == "band"
    shape = (1, 34, 2, 35, 1, 3) if band else (1, 10, 7, 6, 2, 3)
    check_against_oracle(variant, shape, torch.float32, "cpu", True, layout, 30.0)


@requires_interpreter
def test_interpreter_several_segments_per_residue_class(variant, monkeypatch):
    # Dilation 2 and clamped windows across blocks: v1 in pixel tiles of 16, the band kernels
    # with two row segments (the second partial) in each of the two residue classes of columns.
    skip_if_same_kernels(variant, torch.float32)
    monkeypatch.setitem(impl.INTERPRET_BLOCKS, "BLOCK_P", 16)
    band = impl.kernel_family(variant, torch.float32) == "band"
    shape = (1, 2, 6, 35, 1, 3) if band else (1, 4, 7, 6, 2, 3)
    check_backend(spec(variant), shape, mode=dict(dilation=2, border="clamp"), memory_format=torch.channels_last)


@requires_interpreter
@pytest.mark.parametrize(
    "dtype,layout", [(torch.bfloat16, "channels_last"), (torch.float16, "nchw")], ids=["bf16", "fp16"]
)
def test_interpreter_16_bit(variant, dtype, layout):
    # The backend declares float32 only under the interpreter (the GPU tests cover 16 bits through
    # sgdc_conv); the operators themselves run 16-bit CPU tensors, which checks the band kernels'
    # rounding (16-bit operands, split probabilities) against the oracle's tolerances here.
    skip_if_same_kernels(variant, dtype)
    B, C, H, W, G, K = shape = (1, 6, 3, 9, 2, 5)
    tensors = make_inputs(shape, dtype, gate=True, memory_format=LAYOUTS[layout], scale=30.0)
    grad_out = torch.randn(B, C, H, W).to(dtype)
    backend = get_backend("triton")
    out, grads = run(lambda x, k, g: backend.forward(x, k, g, K, G, 1, False, True, variant), tensors, grad_out)
    ref_out, ref_grads = run(oracle(K, G), tensors, grad_out.double())
    for name, got, want in zip(("out", "d_x", "d_weights", "d_gate"), (out, *grads), (ref_out, *ref_grads)):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, name)


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_interpreter_configurations(variant, all_dtypes, mode, dtype):
    # K = 3 on the smallest clamped image plus a ragged margin (windows pinned at both borders
    # and free inside), two heads; the layout alternates so that each configuration meets both
    # across the two dtypes, and each (border, weights) pair runs with a gate at one dilation and
    # without at the other.
    skip_if_same_kernels(variant, dtype)
    k = MODES.index(mode)
    n = 3 * mode["dilation"]
    layout = list(LAYOUTS)[(k + (dtype == torch.bfloat16)) % 2]
    gate = (k + k // 4) % 2 == 0
    check_backend(spec(variant), (1, 4, n + 2, n + 3, 2, 3), dtype, mode=mode, memory_format=LAYOUTS[layout], gate=gate)


def _non_finite(kind, shape):
    """Inputs of ``shape`` (logits scaled by 2) with the non-finite values of docs/op.md's
    "Non-finite inputs": masked taps (logit -inf) at the first tap of every pixel and at
    about 30% of the others, and a pixel of each head with every tap masked (NaN there, as
    torch.softmax gives); NaN, +inf and -inf in x; or in the gate; or masked taps among logits of
    magnitude 1e4."""
    B, C, H, W, G, K = shape
    x, weights, gate = make_inputs(shape, gate=True, scale=1e4 if kind == "large" else 2.0)
    if kind in ("masked", "large"):
        weights[torch.rand(weights.shape) < 0.3] = float("-inf")
        weights[:, :: K * K] = float("-inf")
        if kind == "masked":
            weights[0, : K * K, H // 2, W - 1] = float("-inf")
    else:
        t = x if kind == "x" else gate
        t[0, 0, H // 2, W // 2] = float("nan")
        t[0, C - 1, 0, W - 1] = float("inf")
        t[0, C // 2, H - 1, 0] = float("-inf")
    return x, weights, gate


NON_FINITE_CASES = [
    ("masked", MODES[0]),
    ("x", MODES[0]),
    ("gate", MODES[0]),
    ("large", MODES[0]),
    ("masked", dict(dilation=2, border="clamp", normalize="softmax")),
    ("x", CLAMPED),
]


@requires_interpreter
@pytest.mark.parametrize("kind,mode", NON_FINITE_CASES, ids=lambda c: c if isinstance(c, str) else _mode_id(c))
def test_interpreter_masked_taps_and_non_finite_inputs(variant, all_dtypes, kind, mode):
    """Masked taps, NaN and infinities against the oracle, NaN exactly where it has NaN (before
    the fix, the taps kernels' online max turned a first masked tap into NaN everywhere; the band kernels'
    tl.dot spread a non-finite x or g_y to every pixel of a row segment through the band's zeros).
    Each family of kernels in float32 and bfloat16, run by the first variant that runs it."""
    dtypes = [d for d in (torch.float32, torch.bfloat16) if _first_variant(d, variant) == variant]
    if not dtypes:
        pytest.skip(f"{variant} runs the kernels of earlier variants in float32 and bfloat16")
    shape = (1, 3, 5, 6, 1, 3) if mode["dilation"] == 1 else (1, 3, 6, 7, 1, 3)
    for dtype in dtypes:
        tensors = [t.to(dtype) for t in _non_finite(kind, shape)]
        check_tensors(spec(variant), tensors, 3, 1, mode)


K17_CASES = [
    # (B, C, H, W, G, K), mode, gate, layout
    ((1, 2, 17, 18, 1, 17), dict(border="clamp", normalize=None), False, "channels_last"),  # OverLoCK's
    ((1, 2, 5, 18, 1, 17), dict(dilation=2), True, "nchw"),  # most taps outside the image
]


@requires_interpreter
@pytest.mark.parametrize(
    "case", K17_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + _mode_id({**MODES[0], **c[1]})
)
def test_interpreter_kernel_size_17(variant, monkeypatch, case):
    # The largest K OverLoCK uses: the band kernels' halo is exactly 2R + BW wide forward and
    # wider for dx with clamped windows; one v1 pixel tile (fewer interpreted programs).
    skip_if_same_kernels(variant, torch.float32)
    monkeypatch.setitem(impl.INTERPRET_BLOCKS, "BLOCK_P", 512)
    shape, mode, with_gate, layout = case
    check_backend(spec(variant), shape, mode=mode, gate=with_gate, memory_format=LAYOUTS[layout])


@requires_interpreter
def test_interpreter_backward_is_deterministic(variant):
    skip_if_same_kernels(variant, torch.float32)
    x, weights, gate = _inputs((1, 4, 5, 5, 2, 3))
    grad_out = torch.randn_like(x)
    first = run(triton_conv(variant, 3, 2), (x, weights, gate), grad_out)
    second = run(triton_conv(variant, 3, 2), (x, weights, gate), grad_out)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


@requires_interpreter
def test_interpreter_empty_tensors(variant):
    skip_if_same_kernels(variant, torch.float32)
    for B, C, H, W in [(0, 4, 5, 5), (2, 4, 0, 3)]:
        x = torch.randn(B, C, H, W, requires_grad=True)
        weights = torch.randn(B, 2 * 9, H, W, requires_grad=True)
        gate = torch.randn(B, C, H, W, requires_grad=True)
        out = sgdc_conv(x, weights, gate, kernel_size=3, num_heads=2, backend=spec(variant))
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape and weights.grad.shape == weights.shape and gate.grad.shape == gate.shape


@requires_interpreter
@pytest.mark.parametrize(
    "with_gate,mode", [(True, MODES[0]), (False, MODES[0]), (True, CLAMPED)], ids=["gate", "nogate", "clamped"]
)
def test_interpreter_opcheck(with_gate, mode):
    # Eager checks only: under the interpreter the kernels cannot be traced into a graph
    # (torch.compile and test_aot_dispatch_dynamic need a GPU; see test_gpu_opcheck).
    x, weights, gate = (
        t.requires_grad_() if t is not None else None for t in _inputs((1, 4, 6, 7, 2, 3), gate=with_gate)
    )
    backend = get_backend("triton")
    config = (3, 2, *mode_args(mode), backend.variant_for(*mode_args(mode)))
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(backend.forward, (x, weights, gate, *config), test_utils=checks)
    detached = [t.detach() if t is not None else None for t in (torch.randn_like(x), x, weights, gate)]
    torch.library.opcheck(backend.backward, (*detached, *config), test_utils=("test_schema", "test_faketensor"))


@requires_interpreter
def test_variant_selects_the_kernels_at_each_call(monkeypatch):
    launched = []
    real_launch = impl._launch
    monkeypatch.setattr(
        impl, "_launch", lambda kernel, *a, **kw: launched.append(kernel.__name__) or real_launch(kernel, *a, **kw)
    )
    x, weights, gate = _inputs((1, 2, 3, 3, 1, 3))
    for name, expected in [
        ("v1", "_sgdc_fwd_kernel"),
        ("v2dot", "_sgdc_fwd_dot_kernel"),
        ("v2dot16", "_sgdc_fwd_kernel"),
    ]:
        sgdc_conv(x, weights, gate, kernel_size=3, num_heads=1, backend=spec(name))
        assert launched[-1] == expected, name
    # the operator's argument itself, and the default when a call names no variant
    get_backend("triton").forward(x, weights, gate, 3, 1, 1, False, True, "v2dot")
    assert launched[-1] == "_sgdc_fwd_dot_kernel"
    assert get_backend("triton").variants == VARIANTS
    assert registry.resolve("triton", "cpu", torch.float32, 1, False, True) == ("triton", VARIANTS[0])
    sgdc_conv(x, weights, gate, kernel_size=3, num_heads=1, backend="triton")
    assert launched[-1] == "_sgdc_fwd_kernel"  # v2dot16 runs the taps kernels on float32


@requires_interpreter
def test_unknown_variant_names_the_choices():
    x, weights, gate = _inputs((1, 2, 3, 3, 1, 3))
    with pytest.raises(
        ValueError, match=r"unknown variant 'v9' of 'triton'; expected 'all' or one of v2dot16, v2dot, v1"
    ):
        sgdc_conv(x, weights, gate, kernel_size=3, num_heads=1, backend="triton@v9")
    backend = get_backend("triton")
    not_a_variant = r"variant: 'v9' is not a triton kernel variant; expected one of v2dot16, v2dot, v1"
    with pytest.raises(ValueError, match=not_a_variant):
        backend.forward(x, weights, gate, 3, 1, 1, False, True, "v9")
    with pytest.raises(ValueError, match=not_a_variant):
        backend.backward(torch.randn_like(x), x, weights, gate, 3, 1, 1, False, True, "v9")


def test_operators_have_the_shared_schemas():
    if impl is None:
        pytest.skip("triton is not installed")
    assert str(torch.ops.sgdc.triton_forward.default._schema) == "sgdc::triton_forward" + FORWARD_SCHEMA
    assert str(torch.ops.sgdc.triton_backward.default._schema) == "sgdc::triton_backward" + BACKWARD_SCHEMA


def test_interpreter_checks_run_where_they_can():
    """With triton installed and TRITON_INTERPRET=1 (conftest.py sets it without a GPU), the backend
    loads, so the interpreter tests above run rather than skip, alone or in the full suite."""
    if impl is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    from sgdc_kernels import unavailable_reason

    assert CPU_OK, unavailable_reason("triton")


def test_backend_declares_devices_and_dtypes():
    if not (CPU_OK or CUDA_OK):
        pytest.skip("the triton backend cannot run here")
    backend = get_backend("triton")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert ("cpu" in backend.device_types) == interpret
    assert torch.float32 in backend.dtypes and torch.float64 not in backend.dtypes


# ---------------------------------------------------------------------------------------------
# GPU: every dtype, large K, torch.compile, opcheck
# ---------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# test_ops.py already runs every CUDA backend, triton included (its default variant), on small NCHW
# shapes with and without gate in every dtype; these add every variant, channels_last, large K,
# several channel blocks and row segments, while keeping the number of distinct kernel
# compilations (each a few seconds) small.
GPU_CASES = [
    # (B, C, H, W, G, K), gate, layout
    ((1, 8, 9, 8, 1, 7), True, "channels_last"),
    ((2, 32, 17, 19, 4, 9), True, "channels_last"),
    ((1, 16, 12, 30, 2, 13), True, "nchw"),  # K = 13, H < K
    ((2, 96, 33, 20, 2, 5), False, "channels_last"),  # 48 channels per head: several channel blocks
    ((1, 260, 5, 37, 2, 3), True, "nchw"),  # 130 channels per head: 3 blocks of 64 in the band kernels
]


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "shape,with_gate,layout", GPU_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c)
)
def test_gpu_matches_oracle(variant, dtype, shape, with_gate, layout):
    skip_if_same_kernels(variant, dtype)
    check_against_oracle(variant, shape, dtype, "cuda", with_gate, layout, scale=30.0 if shape[-1] == 7 else 2.0)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_gpu_configurations(variant, dtype, mode):
    # Every configuration at OverLoCK's largest window: windows pinned at the borders and free
    # inside, several row segments per residue class, 48 channels per head (K = 5 in the
    # torch.compile test below).
    skip_if_same_kernels(variant, dtype)
    n = 17 * mode["dilation"]
    layout = torch.channels_last if MODES.index(mode) % 2 else torch.contiguous_format
    check_backend(spec(variant), (2, 96, n + 7, n + 37, 2, 17), dtype, "cuda", mode=mode, memory_format=layout)


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
def test_gpu_no_gate_and_paper_shape_slice(variant, dtype):
    skip_if_same_kernels(variant, dtype)
    check_against_oracle(variant, (2, 64, 32, 32, 4, 7), dtype, "cuda", False, "nchw")


@requires_gpu
def test_gpu_backward_is_deterministic(variant):
    skip_if_same_kernels(variant, torch.bfloat16)
    x, weights, gate = _inputs((2, 64, 32, 32, 4, 7), device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)
    first = run(triton_conv(variant, 7, 4), (x, weights, gate), grad_out)
    for _ in range(3):
        again = run(triton_conv(variant, 7, 4), (x, weights, gate), grad_out)
        for a, b in zip((first[0], *first[1]), (again[0], *again[1])):
            assert torch.equal(a, b)


@requires_gpu
@pytest.mark.parametrize(
    "with_gate,mode", [(True, MODES[0]), (False, MODES[0]), (True, CLAMPED)], ids=["gate", "nogate", "clamped"]
)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_opcheck(variant, with_gate, mode, layout):
    skip_if_same_kernels(variant, torch.float32)
    x, weights, gate = (
        t.requires_grad_() if t is not None else None
        for t in _inputs((2, 8, 6, 7, 2, 3), device="cuda", gate=with_gate, layout=layout)
    )
    backend = get_backend("triton")
    config = (3, 2, *mode_args(mode), variant)
    torch.library.opcheck(backend.forward, (x, weights, gate, *config))
    detached = [t.detach() if t is not None else None for t in (torch.randn_like(x), x, weights, gate)]
    torch.library.opcheck(backend.backward, (*detached, *config))


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", [MODES[0], CLAMPED], ids=_mode_id)
def test_gpu_torch_compile_fullgraph_traces_into_kernels(variant, dtype, mode):
    skip_if_same_kernels(variant, dtype)
    torch._dynamo.reset()
    G, K = 2, 5

    def f(x, weights, gate):
        return window_conv(x * 2, weights, gate, kernel_size=K, num_heads=G, backend=spec(variant), **mode).square()

    x, weights, gate = (t.requires_grad_() for t in _inputs((2, 16, 11, 12, G, K), dtype, "cuda"))
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, weights, gate)
    expected = f(x, weights, gate)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    got = torch.autograd.grad(out.sum(), (x, weights, gate))
    want = torch.autograd.grad(expected.sum(), (x, weights, gate))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# Without a GPU: the kernels compile for Hopper (Triton's own ptxas), which the interpreter can't show
# ---------------------------------------------------------------------------------------------

_COMPILE_FOR_SM90 = """
import json
from sgdc_kernels.triton_ops.sm90 import compile_all
print(json.dumps(compile_all(layouts=("nchw",), configs=("sgdc", "overlock"))))
"""


@pytest.mark.skipif(CUDA_OK, reason="with a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    # every kernel of every variant, in fp32 and bf16, for sgdc_conv and for OverLoCK's na2d_av
    assert {(r["config"], r["kernel"], r["dtype"]) for r in rows} == {
        (config, f"{family} {part}", dtype)
        for family, parts in (
            ("v1", ("forward", "backward taps", "backward dx")),
            ("band", ("forward", "backward", "backward dx")),
        )
        for part in parts
        for dtype in ("fp32", "bf16")
        for config in ("sgdc", "overlock")
    }
    for r in rows:
        if r["kernel"].startswith("band"):
            assert r["HGMMA"] + r["HMMA"] > 0, r  # tl.dot runs on the tensor cores
        if r["kernel"].startswith("band") and r["dtype"] == "bf16":
            assert r["stack"] == 0 and r["STL"] == 0, r  # no spills
