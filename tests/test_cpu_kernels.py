"""The fused CPU kernels of csrc/cpu/, before the extension calls them: built with the system C++
compiler (tests/cpu_kernels/shim.py, each instruction set's file with its flags) and called through
the C ABI of tests/cpu_kernels/capi.cpp on torch tensors.

Every instruction set this machine runs (AVX-512, AVX2, baseline), forced one at a time, against the
float64 oracle: every configuration (zero or clamped border, softmax or raw weights, dilation 1 to 3,
K from 1 to 17, gate or not), every dtype, both layouts, images smaller than the window, 1x1 images,
an empty batch, logits scaled by 30; NaN and infinities as the `torch` backend propagates them, -inf
logits as masked taps; bitwise the same results for 1, 2 and 3 threads and from run to run; and a
weights tensor of over 2**31 elements.
"""

from __future__ import annotations

import importlib.util
import itertools
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sgdc_kernels import window_conv
from sgdc_kernels.custom_ops import memory_format_of
from sgdc_kernels.testing import TOLERANCES, forward_backward, make_inputs, oracle

SHIM = Path(__file__).resolve().parent / "cpu_kernels" / "shim.py"
_spec = importlib.util.spec_from_file_location("sgdc_cpu_kernels_shim", SHIM)
shim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shim)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
KS = [1, 3, 5, 7, 13, 17]


@pytest.fixture(scope="session")
def kernels():
    try:
        return shim.load()
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}: cannot build the CPU kernels")


@pytest.fixture(scope="session")
def isas(kernels):
    """Every instruction set this machine runs, the best first."""
    found = kernels.available_isas()
    return sorted(found, key=lambda n: -shim.ISAS[n])


def _mode(d, clamp, softmax):
    return dict(dilation=d, border="clamp" if clamp else "zero", normalize="softmax" if softmax else None)


def _inputs(shape, dtype, layout, gate, softmax, seed):
    torch.manual_seed(seed)
    # logits scaled by 30 (a peaked softmax); raw weights of 1/K, so that the window sums stay of
    # the order of the inputs (softmaxed weights, the usual raw ones, are smaller still)
    scale = 30.0 if softmax else 1.0 / shape[5]
    x, w, g = make_inputs(shape, dtype, gate=gate, memory_format=LAYOUTS[layout], scale=scale)
    dout = torch.randn(x.shape).to(dtype)
    # every tensor in x's memory format, as the operators pass them (x with one channel or one pixel
    # is plain contiguous as well as channels_last, and then counts as contiguous)
    fmt = memory_format_of(x)
    return [t.contiguous(memory_format=fmt) if t is not None else None for t in (x, w, g, dout)]


def _reference(x, w, g, dout, K, G, mode):
    exact = [t.double() if t is not None else None for t in (x, w, g)]
    out, grads = forward_backward(oracle(K, G, mode), exact, dout.double())
    return [out, *grads]


def _run(kernels, x, w, g, dout, K, G, d, clamp, softmax, isa, threads=2):
    out, ran = kernels.forward(x, w, g, K, G, d, clamp, softmax, threads=threads, isa=isa)
    assert ran == isa
    grads, ran = kernels.backward(dout, x, w, g, K, G, d, clamp, softmax, threads=threads, isa=isa)
    assert ran == isa
    return [out, *(t for t in grads if t is not None)]


def _compare(got, want, like, dtype, what):
    names = ("out", "dx", "dweights", "dgate")
    for name, a, b, inp in zip(names, got, want, like):
        assert a.dtype == dtype and a.shape == inp.shape and a.stride() == inp.stride(), f"{what}: {name} layout"
        torch.testing.assert_close(a.double(), b, **TOLERANCES[dtype], msg=lambda m, n=name: f"{what}: {n}: {m}")


def _shapes(K, d, clamp):
    """(B, C, H, W, G, K): the smallest clamped image plus ragged margins, at least 21 columns (a
    full vector chunk and a partial one), heads of 20 channels (several vector chunks and a tail)
    where the window is small, fewer channels where it is large (the oracle's unfold grows with
    K*K); centred windows also on images smaller than the window."""
    n = K * d
    C, G = (40, 2) if n <= 9 else (20, 1) if n <= 21 else (6, 2)
    shapes = [(2 if n <= 5 else 1, C, n + 2, max(n + 11, 21), G, K)]
    if not clamp:
        shapes.append((1, 6, max(1, n - 3), max(1, n // 2), 3, K))
    return shapes


CONFIGS = [
    (K, d, clamp, softmax)
    for K, d, clamp, softmax in itertools.product(KS, (1, 2, 3), (False, True), (True, False))
    if not (K >= 13 and d == 3)  # K*d > 39: the oracle's unfold is slow, and d = 3 is covered by smaller K
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_configuration_matches_the_oracle(kernels, isas, dtype):
    """Each case runs on every instruction set, against one float64 oracle evaluation."""
    n = 0
    for K, d, clamp, softmax in CONFIGS:
        for shape in _shapes(K, d, clamp):
            for layout in LAYOUTS:
                n += 1
                gate = n % 2 == 0
                if dtype != torch.float32 and K not in (3, 7, 13) and (n % 3) != 0:
                    continue  # the 16-bit and float64 paths: every configuration, a third of the K
                x, w, g, dout = _inputs(shape, dtype, layout, gate, softmax, n)
                want = _reference(x, w, g, dout, K, shape[4], _mode(d, clamp, softmax))
                for isa in isas:
                    got = _run(kernels, x, w, g, dout, K, shape[4], d, clamp, softmax, isa)
                    what = f"{isa} {shape} {layout} d={d} clamp={clamp} softmax={softmax} gate={gate}"
                    _compare(got, want, (x, x, w, g), dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_heads(kernels, isas, dtype):
    """Heads of 64 and 100 channels: channels_last's groups of 4, 2 and 1 vector chunks."""
    for (shape, d), (clamp, softmax), layout in itertools.product(
        [((1, 128, 9, 20, 2, 3), 1), ((1, 200, 8, 19, 2, 3), 2)], [(False, True), (True, False)], LAYOUTS
    ):
        if clamp and shape[2] < 3 * d:
            continue
        x, w, g, dout = _inputs(shape, dtype, layout, not clamp, softmax, 8)
        want = _reference(x, w, g, dout, 3, 2, _mode(d, clamp, softmax))
        for isa in isas:
            got = _run(kernels, x, w, g, dout, 3, 2, d, clamp, softmax, isa)
            _compare(got, want, (x, x, w, g), dtype, f"{isa} {shape} {layout} d={d} clamp={clamp}")


def test_tiles_and_bands(kernels, isas):
    """K = 17 on 150 columns: the backward's rings of P and g_y take the most memory per column, and
    the columns split into tiles (at least 64 columns each) whose windows and readers overlap
    their neighbours'; three threads split the rows into bands. Every border and normalization."""
    shape = (1, 6, 21, 150, 2, 17)
    for (clamp, softmax), layout in itertools.product([(False, True), (True, False)], LAYOUTS):
        x, w, g, dout = _inputs(shape, torch.float32, layout, clamp, softmax, 9)
        want = _reference(x, w, g, dout, 17, 2, _mode(1, clamp, softmax))
        for isa in isas:
            got = _run(kernels, x, w, g, dout, 17, 2, 1, clamp, softmax, isa, threads=3)
            _compare(got, want, (x, x, w, g), torch.float32, f"{isa} {layout} clamp={clamp}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_and_empty_images(kernels, isas, layout):
    """1x1 images (every tap but the centre outside), one channel per head, an empty batch."""
    cases = [((1, 2, 1, 1, 2, 3), 1), ((2, 3, 1, 1, 1, 1), 1), ((1, 4, 1, 2, 4, 5), 2), ((1, 1, 2, 1, 1, 7), 3)]
    for shape, d in cases:
        for softmax, gate in [(True, True), (False, False)]:
            x, w, g, dout = _inputs(shape, torch.float32, layout, gate, softmax, 1)
            want = _reference(x, w, g, dout, shape[5], shape[4], _mode(d, False, softmax))
            for isa in isas:
                got = _run(kernels, x, w, g, dout, shape[5], shape[4], d, False, softmax, isa)
                _compare(got, want, (x, x, w, g), torch.float32, f"{isa} {shape} d={d}")
    x, w, g, dout = _inputs((0, 4, 5, 6, 2, 3), torch.float32, layout, True, True, 1)
    for isa in isas:
        got = _run(kernels, x, w, g, dout, 3, 2, 1, True, True, isa)
        assert [t.shape for t in got] == [x.shape, x.shape, w.shape, g.shape]


def _special_inputs(shape, layout, softmax):
    """Inputs with NaN and infinities in x, the weights, the gate and dout, and some logits at -inf."""
    torch.manual_seed(3)
    x, w, g, dout = _inputs(shape, torch.float32, layout, True, softmax, 3)
    B, C, H, W, G, K = shape
    x[0, 0, 1, 2] = float("nan")
    x[0, 1, H - 1, W - 1] = float("inf")
    x[0, 2, 3, 0] = float("-inf")
    w[0, 0:3, 2, 2] = float("-inf")  # masked taps (logits) / an infinite weight
    w[0, K * K - 1, 4, 5] = float("nan")
    w[0, 1, 0, 0] = float("inf")
    w[0, K * K : 2 * K * K, 5, 1] = float("-inf")  # every tap of head 1 at (5, 1): a NaN pixel
    g[0, 0, 2, 3] = float("inf")
    g[0, 1, 3, 3] = float("-inf")
    g[0, 3, 1, 1] = float("nan")
    dout[0, 2, 5, 5] = float("inf")
    return x, w, g, dout


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("clamp", [False, True], ids=["zero", "clamp"])
@pytest.mark.parametrize("softmax", [True, False], ids=["softmax", "raw"])
def test_nan_and_inf_propagate_as_in_the_torch_backend(kernels, isas, layout, clamp, softmax):
    shape = (1, 4, 9, 10, 2, 3)
    x, w, g, dout = _special_inputs(shape, layout, softmax)
    mode = _mode(1, clamp, softmax)

    def torch_backend(*t):
        return window_conv(*t, kernel_size=3, num_heads=2, backend="torch", **mode)

    out, grads = forward_backward(torch_backend, (x, w, g), dout)
    want = [out, *grads]
    for isa in isas:
        got = _run(kernels, x, w, g, dout, 3, 2, 1, clamp, softmax, isa)
        for name, a, b in zip(("out", "dx", "dweights", "dgate"), got, want):
            what = f"{isa} {layout} clamp={clamp} softmax={softmax}: {name}"
            assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN at other places"
            assert torch.equal(a.isinf(), b.isinf()), f"{what}: infinities at other places"
            assert torch.equal(a[a.isinf()], b[b.isinf()]), f"{what}: infinities of another sign"
            fin = a.isfinite()
            torch.testing.assert_close(a[fin], b[fin], **TOLERANCES[torch.float32], msg=lambda m, w=what: f"{w}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_minus_infinity_logits_are_masked_taps(kernels, isas, layout):
    """-inf logits weigh 0: the results stay finite and match the oracle, in every configuration."""
    shape = (1, 6, 11, 12, 2, 3)
    for d, clamp in [(1, False), (1, True), (2, False)]:
        x, w, g, dout = _inputs(shape, torch.float32, layout, True, True, 4)
        w[:, 0::2][torch.rand_like(w[:, 0::2]) < 0.5] = float("-inf")  # about half of the even taps
        want = _reference(x, w, g, dout, 3, 2, _mode(d, clamp, True))
        for isa in isas:
            got = _run(kernels, x, w, g, dout, 3, 2, d, clamp, True, isa)
            assert all(t.isfinite().all() for t in got), f"{isa}: masked taps made a non-finite result"
            _compare(got, want, (x, x, w, g), torch.float32, f"{isa} d={d} clamp={clamp}")


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_the_same_for_any_thread_count_and_run(kernels, isas, dtype):
    cases = [
        ((2, 32, 21, 40, 2, 7), 1, False, True),
        ((1, 8, 30, 33, 1, 5), 2, True, False),
        ((1, 12, 24, 17, 3, 3), 3, False, False),
        ((3, 4, 13, 50, 4, 13), 1, True, True),
        ((1, 6, 20, 150, 2, 17), 1, False, True),  # several tiles
    ]
    for (shape, d, clamp, softmax), layout, isa in itertools.product(cases, LAYOUTS, isas):
        x, w, g, dout = _inputs(shape, dtype, layout, True, softmax, 5)
        first = _run(kernels, x, w, g, dout, shape[5], shape[4], d, clamp, softmax, isa, threads=1)
        for threads in (1, 2, 3):
            again = _run(kernels, x, w, g, dout, shape[5], shape[4], d, clamp, softmax, isa, threads=threads)
            for a, b in zip(first, again):
                assert torch.equal(_bits(a), _bits(b)), f"{isa} {shape} {layout}: {threads} threads differ"


def test_forcing_an_instruction_set(kernels, isas):
    """Every instruction set this machine runs can be forced; the best is the default; one that
    cannot run (not compiled, or not supported by this CPU) is refused with the reason."""
    x, w, g, _ = _inputs((1, 4, 6, 6, 1, 3), torch.float32, "nchw", False, True, 6)
    assert kernels.forward(x, w, None, 3, 1)[1] == isas[0] == kernels.best_isa()
    for isa in shim.ISAS:
        if isa in isas:
            assert kernels.forward(x, w, None, 3, 1, isa=isa)[1] == isa
        else:
            with pytest.raises(ValueError, match=f"instruction set {isa} is not available"):
                kernels.forward(x, w, None, 3, 1, isa=isa)
    assert "baseline" in isas


def test_a_shape_it_cannot_run_is_refused(kernels):
    x, w, g, _ = _inputs((1, 4, 6, 6, 1, 3), torch.float32, "nchw", False, True, 6)
    with pytest.raises(ValueError, match="clamped windows need H and W of at least kernel_size"):
        kernels.forward(x, w, None, 3, 1, dilation=3, clamp=True)
    with pytest.raises(ValueError, match="multiple of the heads"):
        kernels.forward(x, w[:, :0].contiguous(), None, 3, 3)


def test_instruction_sets_share_no_inline_code(kernels):
    """The instruction-set objects define no weak (inline or template) symbol outside their own
    namespace: the linker could otherwise keep an AVX-512 copy of it for every caller."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs nm (binutils)")
    folder = shim.build()
    for isa in shim.ISA_FLAGS:
        obj = folder / f"window_conv_cpu_{isa}.o"
        listing = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True, check=True)
        weak = [ln for ln in listing.stdout.splitlines() if ln.split(" ")[1:2] and ln.split(" ")[1] in "WVu"]
        # DW.ref.__gxx_personality_v0: a pointer for exception unwinding, data and no code
        foreign = [ln for ln in weak if f"sgdc::cpu::{isa}::" not in ln and " DW.ref." not in ln]
        assert not foreign, f"{isa}: weak symbols outside sgdc::cpu::{isa}:\n" + "\n".join(foreign[:20])
        assert any(f"sgdc::cpu::{isa}::forward" in ln for ln in listing.stdout.splitlines()), f"{isa}: no kernels"


# what the float32 inner loops of each instruction set's object must contain: fused multiply-adds
# on its widest registers (SSE2 has no FMA: multiplies and adds on xmm)
VECTOR_FMA = {"avx512": r"vfmadd\d+ps .*%zmm", "avx2": r"vfmadd\d+ps .*%ymm", "baseline": r"\bmulps .*%xmm"}
HOT = [f"Kernels<float, float>::{name}" for name in
       ("forward_nchw_item", "backward_nchw_item", "wsum2<", "wsum<", "backward_cl_item")]  # fmt: skip


def test_the_hot_loops_are_vectorized(kernels):
    """objdump of each instruction set's object: the window sums (NCHW forward and backward,
    channels_last's wsum and wsum2, and its backward with dP) use FMAs on zmm (AVX-512) and ymm
    (AVX2) registers, multiplies on xmm for SSE2."""
    import re

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump (binutils)")
    folder = shim.build()
    for isa, pattern in VECTOR_FMA.items():
        text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", str(folder / f"window_conv_cpu_{isa}.o")],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        functions = re.split(r"\n(?=[0-9a-f]+ <)", text)
        for hot in HOT:
            bodies = [f for f in functions if hot in f.split("\n", 1)[0]]
            assert bodies, f"{isa}: no function {hot} in the object"
            assert any(re.search(pattern, f) for f in bodies), f"{isa}: {hot} has no {pattern}"


def _sparse(shape, dtype, memory_format):
    """An uninitialized-looking tensor of zeros whose pages exist only once written (anonymous
    memory, no transparent huge pages): a tensor of billions of elements that reads as zeros."""
    numel = 1
    for n in shape:
        numel *= n
    size = torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, numel * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    flat = torch.frombuffer(buf, dtype=dtype, count=numel)
    if memory_format == torch.channels_last:
        B, C, H, W = shape
        return flat.view(B, H, W, C).permute(0, 3, 1, 2), buf
    return flat.view(shape), buf


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_offsets_beyond_2_to_the_31(kernels, layout):
    """weights of 2.31e9 bfloat16 elements (one head, K = 17, a 1024 x 7813 image; x of one channel,
    two in channels_last, where one would also count as contiguous) that read as zeros but in the
    bottom-right corner of the image, where they hold random logits. In NCHW taps 269 to 288 of
    every pixel lie beyond element 2**31, in channels_last the last 0.57M pixels: the corner's
    outputs match the oracle on the corner alone (away from its cut edges), the top rows the
    average over the window (zero logits weigh every tap alike). With SGDC_TEST_LARGE=1 the
    backward runs too (4.6 GB of dweights, about half a minute)."""
    K, H, W, C = 17, 1024, 7813, 1 if layout == "nchw" else 2
    KK, fmt, dtype, r, n = K * K, LAYOUTS[layout], torch.bfloat16, K // 2, 40
    assert 269 * H * W > 2**31 and KK * (H * W - 569_000) > 2**31
    torch.manual_seed(7)
    w, buf = _sparse((1, KK, H, W), dtype, fmt)
    w[..., -n:, -n:] = (4 * torch.randn(1, KK, n, n)).to(dtype)
    x = torch.randn(1, C, H, W).to(dtype).contiguous(memory_format=fmt)
    out, _ = kernels.forward(x, w, None, K, 1, threads=2)
    crop = [t[..., -n:, -n:].contiguous(memory_format=fmt) for t in (x, w)]
    torch.testing.assert_close(out[..., -n + r :, -n + r :].double(), oracle(K, 1)(*crop, None)[..., r:, r:],
                               **TOLERANCES[dtype])  # fmt: skip
    top = x[:, :, :24].double()
    mean = torch.nn.functional.avg_pool2d(top, K, stride=1, padding=r, count_include_pad=True)
    torch.testing.assert_close(out[:, :, : 24 - r].double(), mean[:, :, : 24 - r], **TOLERANCES[dtype])
    if os.environ.get("SGDC_TEST_LARGE") != "1" or _available_memory() < 12 * 2**30:
        pytest.skip("the backward at this size runs with SGDC_TEST_LARGE=1 and 12 GB of available memory")
    dout = torch.randn(x.shape).to(dtype).contiguous(memory_format=fmt)
    (dx, dw, _), _ = kernels.backward(dout, x, w, None, K, 1, threads=2)
    ref = [t.double() for t in crop]
    _, grads = forward_backward(oracle(K, 1), ref + [None], dout[..., -n:, -n:].double())
    # dx of the corner away from its cut edges (where pixels outside the crop read it)
    torch.testing.assert_close(dx[..., -n + 2 * r :, -n + 2 * r :].double(), grads[0][..., 2 * r :, 2 * r :],
                               **TOLERANCES[dtype])  # fmt: skip
    torch.testing.assert_close(dw[..., -n + r :, -n + r :].double(), grads[1][..., r:, r:], **TOLERANCES[dtype])
