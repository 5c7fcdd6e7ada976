"""Backend 'cpu': the fused CPU kernels of csrc/cpu/, through their operators sgdc::cpu_forward and
sgdc::cpu_backward (csrc/cpu/window_conv_cpu_ops.cpp).

Every instruction set this machine runs (the variants avx512, avx2, baseline), forced one at a time,
against the float64 oracle: every configuration (zero or clamped border, softmax or raw weights,
dilation 1 to 3, K from 1 to 17, gate or not), every dtype, both layouts, images smaller than the
window, 1x1 images, an empty batch, logits scaled by 30; NaN and infinities as the `torch` backend
propagates them, -inf logits as masked taps; bitwise the same results for 1, 2 and 3 threads
(torch.set_num_threads) and from run to run; a weights tensor of over 2**31 elements; the checks
that protect memory (clear errors naming the argument); and, in the built library, AVX-512 and AVX2
code only in the kernels of their instruction set, with FMAs on zmm and ymm in the hot loops.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sgdc_kernels import registry, window_conv
from sgdc_kernels.custom_ops import memory_format_of
from sgdc_kernels.testing import TOLERANCES, forward_backward, make_inputs, oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
KS = [1, 3, 5, 7, 13, 17]
ALL_ISAS = ("avx512", "avx2", "baseline")


@pytest.fixture(scope="session")
def isas():
    """Every instruction set this machine runs, the best first: the variants of backend 'cpu'."""
    why = registry.unavailable_reason("cpu")
    if why:
        pytest.skip(why)
    return list(registry.get_backend("cpu").variants)


class threads:
    """torch.set_num_threads(n) inside the block."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _forward(x, w, g, K, G, d=1, clamp=False, softmax=True, isa=""):
    return torch.ops.sgdc.cpu_forward(x, w, g, K, G, d, clamp, softmax, isa)


def _backward(dout, x, w, g, K, G, d=1, clamp=False, softmax=True, isa=""):
    return torch.ops.sgdc.cpu_backward(dout, x, w, g, K, G, d, clamp, softmax, isa)


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


def _run(x, w, g, dout, K, G, d, clamp, softmax, isa, n_threads=2):
    with threads(n_threads):
        out = _forward(x, w, g, K, G, d, clamp, softmax, isa)
        dx, dw, dg = _backward(dout, x, w, g, K, G, d, clamp, softmax, isa)
    return [out, dx, dw] + ([dg] if g is not None else [])


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
def test_every_configuration_matches_the_oracle(isas, dtype):
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
                    got = _run(x, w, g, dout, K, shape[4], d, clamp, softmax, isa)
                    what = f"{isa} {shape} {layout} d={d} clamp={clamp} softmax={softmax} gate={gate}"
                    _compare(got, want, (x, x, w, g), dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_heads(isas, dtype):
    """Heads of 64 and 100 channels: channels_last's groups of 4, 2 and 1 vector chunks."""
    for (shape, d), (clamp, softmax), layout in itertools.product(
        [((1, 128, 9, 20, 2, 3), 1), ((1, 200, 8, 19, 2, 3), 2)], [(False, True), (True, False)], LAYOUTS
    ):
        if clamp and shape[2] < 3 * d:
            continue
        x, w, g, dout = _inputs(shape, dtype, layout, not clamp, softmax, 8)
        want = _reference(x, w, g, dout, 3, 2, _mode(d, clamp, softmax))
        for isa in isas:
            got = _run(x, w, g, dout, 3, 2, d, clamp, softmax, isa)
            _compare(got, want, (x, x, w, g), dtype, f"{isa} {shape} {layout} d={d} clamp={clamp}")


def test_tiles_and_bands(isas):
    """K = 17 on 150 columns: the backward's rings of P and g_y take the most memory per column, and
    the columns split into tiles (at least 64 columns each) whose windows and readers overlap
    their neighbours'; three threads split the rows into bands. Every border and normalization."""
    shape = (1, 6, 21, 150, 2, 17)
    for (clamp, softmax), layout in itertools.product([(False, True), (True, False)], LAYOUTS):
        x, w, g, dout = _inputs(shape, torch.float32, layout, clamp, softmax, 9)
        want = _reference(x, w, g, dout, 17, 2, _mode(1, clamp, softmax))
        for isa in isas:
            got = _run(x, w, g, dout, 17, 2, 1, clamp, softmax, isa, n_threads=3)
            _compare(got, want, (x, x, w, g), torch.float32, f"{isa} {layout} clamp={clamp}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_and_empty_images(isas, layout):
    """1x1 images (every tap but the centre outside), one channel per head, an empty batch."""
    cases = [((1, 2, 1, 1, 2, 3), 1), ((2, 3, 1, 1, 1, 1), 1), ((1, 4, 1, 2, 4, 5), 2), ((1, 1, 2, 1, 1, 7), 3)]
    for shape, d in cases:
        for softmax, gate in [(True, True), (False, False)]:
            x, w, g, dout = _inputs(shape, torch.float32, layout, gate, softmax, 1)
            want = _reference(x, w, g, dout, shape[5], shape[4], _mode(d, False, softmax))
            for isa in isas:
                got = _run(x, w, g, dout, shape[5], shape[4], d, False, softmax, isa)
                _compare(got, want, (x, x, w, g), torch.float32, f"{isa} {shape} d={d}")
    x, w, g, dout = _inputs((0, 4, 5, 6, 2, 3), torch.float32, layout, True, True, 1)
    for isa in isas:
        got = _run(x, w, g, dout, 3, 2, 1, True, True, isa)
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
def test_nan_and_inf_propagate_as_in_the_torch_backend(isas, layout, clamp, softmax):
    shape = (1, 4, 9, 10, 2, 3)
    x, w, g, dout = _special_inputs(shape, layout, softmax)
    mode = _mode(1, clamp, softmax)

    def torch_backend(*t):
        return window_conv(*t, kernel_size=3, num_heads=2, backend="torch", **mode)

    out, grads = forward_backward(torch_backend, (x, w, g), dout)
    want = [out, *grads]
    for isa in isas:
        got = _run(x, w, g, dout, 3, 2, 1, clamp, softmax, isa)
        for name, a, b in zip(("out", "dx", "dweights", "dgate"), got, want):
            what = f"{isa} {layout} clamp={clamp} softmax={softmax}: {name}"
            assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN at other places"
            assert torch.equal(a.isinf(), b.isinf()), f"{what}: infinities at other places"
            assert torch.equal(a[a.isinf()], b[b.isinf()]), f"{what}: infinities of another sign"
            fin = a.isfinite()
            torch.testing.assert_close(a[fin], b[fin], **TOLERANCES[torch.float32], msg=lambda m, w=what: f"{w}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_minus_infinity_logits_are_masked_taps(isas, layout):
    """-inf logits weigh 0: the results stay finite and match the oracle, in every configuration."""
    shape = (1, 6, 11, 12, 2, 3)
    for d, clamp in [(1, False), (1, True), (2, False)]:
        x, w, g, dout = _inputs(shape, torch.float32, layout, True, True, 4)
        w[:, 0::2][torch.rand_like(w[:, 0::2]) < 0.5] = float("-inf")  # about half of the even taps
        want = _reference(x, w, g, dout, 3, 2, _mode(d, clamp, True))
        for isa in isas:
            got = _run(x, w, g, dout, 3, 2, d, clamp, True, isa)
            assert all(t.isfinite().all() for t in got), f"{isa}: masked taps made a non-finite result"
            _compare(got, want, (x, x, w, g), torch.float32, f"{isa} d={d} clamp={clamp}")


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_the_same_for_any_thread_count_and_run(isas, dtype):
    cases = [
        ((2, 32, 21, 40, 2, 7), 1, False, True),
        ((1, 8, 30, 33, 1, 5), 2, True, False),
        ((1, 12, 24, 17, 3, 3), 3, False, False),
        ((3, 4, 13, 50, 4, 13), 1, True, True),
        ((1, 6, 20, 150, 2, 17), 1, False, True),  # several tiles
    ]
    for (shape, d, clamp, softmax), layout, isa in itertools.product(cases, LAYOUTS, isas):
        x, w, g, dout = _inputs(shape, dtype, layout, True, softmax, 5)
        first = _run(x, w, g, dout, shape[5], shape[4], d, clamp, softmax, isa, n_threads=1)
        for n in (1, 2, 3):
            again = _run(x, w, g, dout, shape[5], shape[4], d, clamp, softmax, isa, n_threads=n)
            for a, b in zip(first, again):
                assert torch.equal(_bits(a), _bits(b)), f"{isa} {shape} {layout}: {n} threads differ"


def test_forcing_an_instruction_set(isas):
    """Every instruction set this machine runs can be forced (the variant), the best is the default
    (variant ""); one that cannot run here, or an unknown one, is refused with the reason."""
    x, w, g, _ = _inputs((1, 4, 6, 6, 1, 3), torch.float32, "nchw", False, True, 6)
    assert "baseline" in isas and isas == [i for i in ALL_ISAS if i in isas]
    assert registry.resolve("auto", "cpu", torch.float32, 1, False, True) == ("cpu", isas[0])
    best = _forward(x, w, None, 3, 1)
    for isa in ALL_ISAS:
        if isa in isas:
            torch.testing.assert_close(_forward(x, w, None, 3, 1, isa=isa), best)
        else:
            with pytest.raises(RuntimeError, match=f"variant '{isa}' does not run here"):
                _forward(x, w, None, 3, 1, isa=isa)
    with pytest.raises(RuntimeError, match="unknown variant 'sse9'; expected '', 'avx512', 'avx2' or 'baseline'"):
        _forward(x, w, None, 3, 1, isa="sse9")


def _bad_calls():
    """(name, call, what the message says): direct calls of the operators with what
    sgdc_kernels.window_conv would never pass them."""
    torch.manual_seed(0)
    x, w, g = torch.randn(2, 8, 5, 6), torch.randn(2, 18, 5, 6), torch.randn(2, 8, 5, 6)
    dout = torch.randn(2, 8, 5, 6)
    cl = torch.channels_last
    return {
        "x 3-D": (lambda: _forward(x[0], w, g, 3, 2), "x must be a 4-D"),
        "x int": (lambda: _forward(x.long(), w, g, 3, 2), "x must be float32, float16, bfloat16 or float64"),
        "x sliced": (lambda: _forward(x[..., ::2], w[..., ::2], None, 3, 2), "x must be contiguous or channels_last"),
        "weights dtype": (lambda: _forward(x, w.double(), g, 3, 2), "weights has dtype"),
        "weights shape": (lambda: _forward(x, w[:, :9], g, 3, 2), "weights must be dense"),
        "weights channels": (lambda: _forward(x, w[:, :9].contiguous(), g, 3, 2), "weights must have shape"),
        "weights layout": (
            lambda: _forward(x, w.contiguous(memory_format=cl), g, 3, 2),
            "weights must be dense in x's",
        ),
        "weights 3-D": (lambda: _forward(x, w[0], g, 3, 2), "weights must be 4-D"),
        "gate shape": (lambda: _forward(x, w, g[:, :, :4].contiguous(), 3, 2), "gate must have x's shape"),
        "gate layout": (lambda: _forward(x, w, g.contiguous(memory_format=cl), 3, 2), "gate must be dense in x's"),
        "gate dtype": (lambda: _forward(x, w, g.half(), 3, 2), "gate has dtype"),
        "even kernel_size": (
            lambda: _forward(x, torch.randn(2, 32, 5, 6), g, 4, 2),
            "kernel_size must be a positive odd",
        ),
        "num_heads": (lambda: _forward(x, w, g, 3, 0), "num_heads must be positive"),
        "heads": (lambda: _forward(x, torch.randn(2, 27, 5, 6), g, 3, 3), "must be a positive multiple of num_heads"),
        "dilation": (lambda: _forward(x, w, g, 3, 2, 0), "dilation must be a positive int"),
        "clamp": (lambda: _forward(x, w, g, 3, 2, 2, True), "clamped windows need H and W of at least"),
        "grad_out shape": (lambda: _backward(dout[:1], x, w, g, 3, 2), "grad_out must have x's shape"),
        "grad_out dtype": (lambda: _backward(dout.double(), x, w, g, 3, 2), "grad_out has dtype"),
        "grad_out layout": (
            lambda: _backward(dout.contiguous(memory_format=cl), x, w, g, 3, 2),
            "grad_out must be dense",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_to_the_operators_raise_clear_errors(isas, case):
    call, match = _bad_calls()[case]
    op = "sgdc::cpu_backward" if case.startswith("grad_out") else "sgdc::cpu_forward"
    with pytest.raises(RuntimeError, match=f"{op}: .*{match}"):
        call()


def _library() -> Path:
    import sgdc_kernels._C as ext

    return Path(ext.__file__)


def _functions(objdump_args):
    """{demangled function name: its disassembly} of the extension's library."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump (binutils)")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", *objdump_args, str(_library())],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    functions = {}
    for body in re.split(r"\n(?=[0-9a-f]+ <)", text):
        m = re.match(r"[0-9a-f]+ <(.*)>:", body)
        if m:
            functions[m.group(1)] = body
    return functions


def test_wide_vector_code_only_in_its_instruction_sets_kernels(isas):
    """No function of the library outside sgdc::cpu::avx512 uses zmm registers, and none outside it
    and sgdc::cpu::avx2 ymm ones: an inline function of a header compiled for AVX-512 (the
    linker keeps one copy of it for every caller) would crash a CPU without AVX-512."""
    functions = _functions([])
    zmm = [name for name, body in functions.items() if "%zmm" in body]
    ymm = [name for name, body in functions.items() if "%ymm" in body]
    assert not [n for n in zmm if "sgdc::cpu::avx512::" not in n], zmm[:20]
    assert not [n for n in ymm if "sgdc::cpu::avx512::" not in n and "sgdc::cpu::avx2::" not in n], ymm[:20]


# what the float32 inner loops of each instruction set's kernels must contain: fused multiply-adds
# on its widest registers (SSE2 has no FMA: multiplies and adds on xmm)
VECTOR_FMA = {"avx512": r"vfmadd\d+ps .*%zmm", "avx2": r"vfmadd\d+ps .*%ymm", "baseline": r"\bmulps .*%xmm"}
HOT = [f"Kernels<float, float>::{name}" for name in
       ("forward_nchw_item", "backward_nchw_item", "wsum2<", "wsum<", "backward_cl_item")]  # fmt: skip


def test_the_hot_loops_are_vectorized(isas):
    """objdump of the extension: the window sums (NCHW forward and backward, channels_last's wsum
    and wsum2, and its backward with dP) use FMAs on zmm (AVX-512) and ymm (AVX2) registers,
    multiplies on xmm for SSE2, in every instruction set this build compiled (all three on x86-64
    with GCC)."""
    import sgdc_kernels._C as ext

    functions = _functions([])
    for isa in ext.CPU_COMPILED.split(","):
        for hot in HOT:
            bodies = [body for name, body in functions.items() if f"sgdc::cpu::{isa}::" in name and hot in name]
            assert bodies, f"{isa}: no function {hot} in the library"
            assert any(re.search(VECTOR_FMA[isa], b) for b in bodies), f"{isa}: {hot} has no {VECTOR_FMA[isa]}"


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
def test_offsets_beyond_2_to_the_31(isas, layout):
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
    with threads(2):
        out = _forward(x, w, None, K, 1)
    crop = [t[..., -n:, -n:].contiguous(memory_format=fmt) for t in (x, w)]
    torch.testing.assert_close(out[..., -n + r :, -n + r :].double(), oracle(K, 1)(*crop, None)[..., r:, r:],
                               **TOLERANCES[dtype])  # fmt: skip
    top = x[:, :, :24].double()
    mean = torch.nn.functional.avg_pool2d(top, K, stride=1, padding=r, count_include_pad=True)
    torch.testing.assert_close(out[:, :, : 24 - r].double(), mean[:, :, : 24 - r], **TOLERANCES[dtype])
    if os.environ.get("SGDC_TEST_LARGE") != "1" or _available_memory() < 12 * 2**30:
        pytest.skip("the backward at this size runs with SGDC_TEST_LARGE=1 and 12 GB of available memory")
    dout = torch.randn(x.shape).to(dtype).contiguous(memory_format=fmt)
    with threads(2):
        dx, dw, _ = _backward(dout, x, w, None, K, 1)
    ref = [t.double() for t in crop]
    _, grads = forward_backward(oracle(K, 1), ref + [None], dout[..., -n:, -n:].double())
    # dx of the corner away from its cut edges (where pixels outside the crop read it)
    torch.testing.assert_close(dx[..., -n + 2 * r :, -n + 2 * r :].double(), grads[0][..., 2 * r :, 2 * r :],
                               **TOLERANCES[dtype])  # fmt: skip
    torch.testing.assert_close(dw[..., -n + r :, -n + r :].double(), grads[1][..., r:, r:], **TOLERANCES[dtype])
