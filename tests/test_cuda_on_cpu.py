"""The CUDA kernels of csrc/ run on the CPU: every variant, forward and both backward passes,
against the float64 oracle, through the same launch code as the GPU build.

tests/cuda_emu/harness.cpp includes csrc/cuda/kernels.cuh unchanged, compiled for the host with
the system C++ compiler against tests/cuda_emu/cuda_emu.h, an emulation of the CUDA subset the
kernels use: every GPU thread a fiber, real block-wide barriers that report divergence,
NaN-poisoned shared memory of exactly the launch's size, guard pages around every buffer, store
counting, the runtime's launch checks (48 KB dynamic shared memory unless opted in) and three
thread orders per block whose results must be bitwise equal. See the README's Tests section for
what this cannot show (timing, the memory model of a real GPU, warp scheduling).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sgdc_kernels.testing import error_scales, forward_backward, make_inputs, mode_args, oracle

ROOT = Path(__file__).resolve().parent.parent
EMU = Path(__file__).resolve().parent / "cuda_emu"
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# unit roundoff of each output dtype: the output's own rounding
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP32_EPS = 2.0**-24


def _variants() -> list[str]:
    """The variants kernels.cuh defines (kVariantNames), read from the source itself."""
    import re

    text = (ROOT / "csrc" / "cuda" / "kernels.cuh").read_text()
    m = re.search(r"kVariantNames\[\]\s*=\s*\{([^}]*)\}", text)
    assert m, "kernels.cuh no longer defines kVariantNames: update this test"
    return re.findall(r'"(\w+)"', m.group(1))


VARIANTS = _variants()


def _compiler_and_headers() -> tuple[str, list[str], str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on PATH: cannot build the CUDA emulation")
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    if not any((Path(p) / "c10" / "util" / "Half.h").exists() for p in includes):
        pytest.skip("torch's C++ headers (c10/util/Half.h) are not installed: cannot build the CUDA emulation")
    return cxx, includes, str(Path(torch.__file__).parent / "lib")


@pytest.fixture(scope="session")
def harness(tmp_path_factory) -> Path:
    """The harness binary, built once per source state (cached by a hash of every input)."""
    cxx, includes, libdir = _compiler_and_headers()
    sources = [EMU / "harness.cpp", EMU / "cuda_emu.h", *CUDA_SOURCES]
    toolchain = "\n".join([cxx, torch.__version__, libdir, *includes]).encode()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + toolchain)
    cache = Path(os.environ.get("SGDC_EMU_CACHE", Path.home() / ".cache" / "sgdc_kernels"))
    exe = cache / f"cuda_emu_{digest.hexdigest()[:16]}"
    if not exe.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        # The kernel headers check with the header-only STD_TORCH_CHECK; the emulation's own
        # SGDC_CUDA_CHECK (cuda_emu.h) uses c10's TORCH_CHECK, hence -include and -lc10.
        cmd = [cxx, "-std=c++17", "-O1", "-g0", "-Wno-unknown-pragmas", f"-I{EMU}", f"-I{ROOT / 'csrc'}",
               *(f"-I{p}" for p in includes), "-include", "c10/util/Exception.h", str(EMU / "harness.cpp"),
               "-o", str(tmp), f"-L{libdir}", "-lc10", f"-Wl,-rpath,{libdir}"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, "the kernels do not compile for the host emulation:\n" + res.stderr[-6000:]
        tmp.rename(exe)
    return exe


def _raw(t: torch.Tensor) -> bytes:
    """The bytes of t in its memory order (NCHW, or NHWC for channels_last)."""
    if not t.is_contiguous():
        t = t.permute(0, 2, 3, 1)
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(data: bytes, like: torch.Tensor) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(data), dtype=like.dtype)
    if like.is_contiguous():
        return flat.view(like.shape)
    B, C, H, W = like.shape
    return flat.view(B, H, W, C).permute(0, 3, 1, 2)


def _terms(K: int, Cg: int) -> int:
    """A bound on the fp32 roundings that reach one result, each relative to the sum of the
    magnitudes of its terms: its sums (K*K taps for out; up to (K + K//2)^2 (p, t) pairs for dx near
    clamped borders; Cg channels in dP, K*K taps in sum_t P dP), the K*K-term sum inside every
    probability, and 16 for the rest (exp, the subtraction of the max, 1/sum, sigmoid, products)."""
    return (K + K // 2) ** 2 + 2 * K * K + Cg + 16


def _tolerance(ref: torch.Tensor, scales: dict, dtype: torch.dtype, terms: int) -> torch.Tensor:
    """|got - ref| allowed per element: the output's own rounding (unit roundoff u of its dtype
    times |ref|, or half its smallest subnormal where the value underflows, and fp32 intermediates
    that underflow: 64 fp32 subnormal steps) plus the fp32 arithmetic: `terms` roundings of eps32
    each, relative to the sum of the magnitudes of the terms ("scale"), and the rounding of each
    logit's distance to its pixel's max ("spread"; both from sgdc_kernels.testing.error_scales).
    16-bit inputs add what v3's tensor cores lose: they keep each weight and g_y as a 16-bit head
    and remainder, within u^2 relative (2 x 8 significant bits in bfloat16) or half a 16-bit
    subnormal absolute (a probability below the dtype's normal range), and drop the remainders'
    product: 3 u^2 of the scale plus half a subnormal times the sum of the other operand's
    magnitudes over the window ("window") and the number of weights (K*K)."""
    info = torch.finfo(dtype)
    half_subnormal = info.tiny * info.eps / 2
    fp32 = (terms * FP32_EPS) * scales["scale"] + FP32_EPS * scales["spread"]
    tol = UNIT_ROUNDOFF[dtype] * ref.abs() + half_subnormal + 64 * 2.0**-149 + fp32
    if dtype != torch.float32:
        tol = tol + 3 * UNIT_ROUNDOFF[dtype] ** 2 * scales["scale"] + half_subnormal * (scales["window"] + terms)
    return tol


class Cases:
    """Writes cases for the harness, runs it once, and checks each result against the oracle."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.cases = {}

    def add(
        self,
        shape,
        dtype: str,
        layout: str,
        gate: bool,
        variant: str,
        scale: float = 30.0,
        mode: dict | None = None,
        edit=None,
    ) -> None:
        """One case; ``mode``: window_conv's ``dilation``, ``border``, ``normalize`` (default sgdc_conv's);
        ``edit(x, weights, gate)``, if given, changes the float32 inputs in place before they are
        rounded to the dtype (masked taps, non-finite values)."""
        B, C, H, W, G, K = shape
        dilation, clamp, softmax = mode_args(mode)
        if not softmax:
            scale = min(scale, 1.0)  # raw weights: not logits, keep the sums of the order of the inputs
        cid = f"c{len(self.cases)}"
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        x, k, g = make_inputs(shape, torch.float32, "cpu", gate=gate, memory_format=fmt, scale=scale)
        if edit is not None:
            edit(x, k, g)
        x, k, g = (t.to(DTYPES[dtype]) if t is not None else None for t in (x, k, g))
        dout = torch.randn(x.shape).to(x.dtype).contiguous(memory_format=fmt)
        for suffix, t in (("x", x), ("k", k), ("g", g), ("dout", dout)):
            if t is not None:
                (self.dir / f"{cid}.{suffix}").write_bytes(_raw(t))
        line = f"{cid} {dtype} {layout} {B} {C} {H} {W} {G} {K} {int(gate)} {variant}"
        line += f" {dilation} {int(clamp)} {int(softmax)}"
        self.cases[cid] = (line, (x, k, g), dout, K, G, mode)

    def run(self, harness: Path) -> None:
        (self.dir / "cases.txt").write_text("\n".join(c[0] for c in self.cases.values()) + "\n")
        res = subprocess.run([str(harness), str(self.dir)], capture_output=True, text=True, timeout=600)
        started = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("start ")]
        failures = [ln for ln in res.stdout.splitlines() if ln.startswith("FAIL ")]
        if res.returncode not in (0, 1) or failures:
            last = self.cases[started[-1]][0] if started else "(none)"
            raise AssertionError(
                f"the emulated kernels failed (exit {res.returncode}); last case started: {last}\n"
                + "\n".join(failures[:20])
                + "\n"
                + res.stderr[-3000:]
            )
        for cid, (line, tensors, dout, K, G, mode) in self.cases.items():
            self._check(cid, line, tensors, dout, K, G, mode)

    def _check(self, cid, line, tensors, dout, K, G, mode) -> None:
        x, k, g = tensors
        exact = [t.double() if t is not None else None for t in tensors]  # gradients in float64 too
        ref_out, ref_grads = forward_backward(oracle(K, G, mode), exact, dout.double())
        # the error scales of each result: its terms, the logits' spread, and (16-bit) the window's
        # sums of |x| and |g_y|, which are those of raw weights 1
        raw = {**(mode or {}), "normalize": None}
        ones = (exact[0], torch.ones_like(exact[1]), exact[2])
        scales = {
            "scale": error_scales(exact, dout, K, G, mode),
            "spread": error_scales(exact, dout, K, G, mode, spread=True),
            "window": error_scales(ones, dout, K, G, raw),
        }
        results = {"out": (x, ref_out, {name: sc[0] for name, sc in scales.items()})}
        for n, (suffix, like) in enumerate((("dx", x), ("dk", k), ("dg", g))[: len(ref_grads)]):
            results[suffix] = (like, ref_grads[n], {name: sc[1][n] for name, sc in scales.items()})
        terms = _terms(K, x.shape[1] // G)
        for suffix, (like, ref, scale) in results.items():
            got = _from_raw((self.dir / f"{cid}.{suffix}").read_bytes(), like).double()
            # Outputs start as NaN and the harness checks that each element was stored once: NaN
            # must stand exactly where the oracle has NaN (masked or non-finite inputs), and
            # infinities must match.
            nan = ref.isnan()
            assert torch.equal(got.isnan(), nan), (
                f"{line}: {suffix} has NaN at {int((got.isnan() & ~nan).sum())} elements where the oracle "
                f"has none, and lacks it at {int((nan & ~got.isnan()).sum())} where the oracle has NaN"
            )
            inf = ref.isinf()
            assert torch.equal(got[inf], ref[inf]) and not got[~inf].isinf().any(), f"{line}: {suffix}: infinities"
            finite = ~nan & ~inf
            err = torch.where(finite, got - ref, 0.0).abs()
            ref = torch.where(finite, ref, 0.0)
            tol = _tolerance(ref, {name: torch.where(finite, t, 0.0) for name, t in scale.items()}, like.dtype, terms)
            if (err > tol).any():
                worst = int((err - tol).argmax())
                raise AssertionError(
                    f"{line}: {suffix} differs from the float64 oracle at flat index {worst}: "
                    f"got {got.view(-1)[worst]:.8g}, expected {ref.reshape(-1)[worst]:.8g} "
                    f"(tolerance {tol.reshape(-1)[worst]:.3g})"
                )


# (B, C, H, W, heads, K): H and W below K and not multiples of any tile, channels per head that
# are not multiples of any chunk (1, 3, 5, 17), several tiles both ways, 1x1 images.
def _shapes(K: int) -> list[tuple]:
    return [
        (2, 6, 5, 7, 2, K),  # Cg 3, image around K
        (1, 17, 9, 37, 1, K),  # one head of 17 channels, two tiles along W
        (1, 20, 19, 11, 4, K),  # four heads of 5 channels, two tiles along H
        (1, 9, 3, 2, 3, K),  # H, W < K for K > 3
        (1, 2, 1, 1, 2, K),  # 1x1 image, heads of one channel
    ]


KS = [1, 3, 5, 7, 9, 13]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernels_match_float64_oracle(harness, tmp_path, variant, dtype):
    """Every K, both layouts, gate or not, logits scaled by 30, on shapes with ragged tiles."""
    cases = Cases(tmp_path)
    for K in KS:
        for n, shape in enumerate(_shapes(K)):
            for layout in ("nchw", "nhwc"):
                gate = (n + (layout == "nhwc")) % 2 == 0  # both gate settings on every shape
                cases.add(shape, dtype, layout, gate, variant)
    cases.run(harness)


@pytest.mark.parametrize("variant", VARIANTS)
def test_large_shared_memory_and_many_blocks(harness, tmp_path, variant):
    """Launches over 48 KB of dynamic shared memory (channels_last 16-bit chunks, K = 9 and 13),
    many blocks, and a paper-like head (64 channels, K = 7) in every dtype."""
    cases = Cases(tmp_path)
    for dtype in DTYPES:
        cases.add((1, 128, 18, 40, 2, 7), dtype, "nhwc", True, variant, scale=4.0)
        cases.add((1, 128, 18, 40, 2, 7), dtype, "nchw", False, variant, scale=4.0)
    cases.add((2, 32, 9, 20, 2, 13), "bf16", "nhwc", True, variant)
    cases.add((1, 24, 6, 17, 1, 9), "f32", "nchw", True, variant)
    cases.run(harness)


def test_unknown_variant_is_a_clear_error(harness, tmp_path):
    cases = Cases(tmp_path)
    cases.add((1, 2, 3, 3, 1, 3), "f32", "nchw", False, "nonesuch")
    with pytest.raises(AssertionError, match="variant: 'nonesuch' is not a kernel variant of the cuda backend"):
        cases.run(harness)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "v2"])
@pytest.mark.parametrize("mode", [dict(border="clamp"), dict(dilation=2), dict(normalize=None)])
def test_a_variant_refuses_a_configuration_it_does_not_run(harness, tmp_path, variant, mode):
    """v1 and v3 compute sgdc_conv's configuration only; the launch code refuses the others
    instead of running another variant's kernels under their name."""
    cases = Cases(tmp_path)
    cases.add((1, 4, 8, 8, 1, 3), "f32", "nchw", False, variant, mode=mode)
    with pytest.raises(AssertionError, match=f"variant: {variant} runs only sgdc_conv's configuration"):
        cases.run(harness)


MODES = [
    dict(dilation=d, border=b, normalize=n)
    for d, b, n in ((1, "clamp", "softmax"), (1, "clamp", None), (2, "zero", "softmax"), (2, "clamp", None),
                    (3, "zero", None), (1, "zero", None))
]  # fmt: skip


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_window_conv_configurations(harness, tmp_path, dtype):
    """Dilated and clamped windows and raw weights (v2's group-space kernels, the variant that runs
    them): K up to 17, images at the smallest clamped size and ragged, several residue groups per
    axis, both layouts, gate or not. The oracle is F.unfold with those windows."""
    cases = Cases(tmp_path)
    for n, mode in enumerate(MODES):
        d = mode["dilation"]
        for K in (1, 3, 5, 7, 17) if d == 1 else (3, 5):
            for m, (extra_h, extra_w) in enumerate(((0, 3), (5, 22))):
                shape = (1, 6, K * d + extra_h, K * d + extra_w, 2, K)
                layout = ("nchw", "nhwc")[(n + m) % 2]
                cases.add(shape, dtype, layout, (n + m + K) % 2 == 0, "v2", 4.0, mode)
    cases.add((1, 34, 18, 41, 2, 7), dtype, "nhwc", True, "v2", 4.0, dict(border="clamp"))  # chunks, tiles
    cases.run(harness)


def _non_finite_edits(shape) -> dict:
    """Changes of the inputs (x, weights, gate) that docs/op.md's "Non-finite inputs" defines: masked
    taps (logit -inf; the first tap of every pixel and about 30% of the others), a pixel
    of each head whose taps are all masked (NaN there, as torch.softmax gives), and NaN, +inf, -inf
    in x and in the gate."""
    B, C, H, W, G, K = shape
    KK = K * K

    def masked(x, k, g):
        k[torch.rand(k.shape) < 0.3] = float("-inf")
        for h in range(G):
            k[:, h * KK] = float("-inf")

    def all_masked(x, k, g):
        masked(x, k, g)
        for h in range(G):
            k[0, h * KK : (h + 1) * KK, H // 2, W - 1] = float("-inf")

    def x_non_finite(x, k, g):
        x[0, 0, H // 2, W // 2] = float("nan")
        x[0, C - 1, 0, W - 1] = float("inf")
        x[0, C // 2, H - 1, 0] = float("-inf")

    def gate_non_finite(x, k, g):
        g[0, 0, H // 2, W // 2] = float("nan")
        g[0, C - 1, 0, W - 1] = float("inf")
        g[0, C // 2, H - 1, 0] = float("-inf")

    return {"masked": masked, "all_masked": all_masked, "x": x_non_finite, "gate": gate_non_finite}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_masked_taps_and_non_finite_inputs(harness, tmp_path, variant, dtype):
    """Masked taps give finite results and zero gradients for them, a pixel with every tap masked
    gives NaN where the oracle (torch.softmax) does, and NaN and infinities in x and the gate reach
    exactly the results the oracle's arithmetic sends them to, in every variant (v3's tensor cores
    for 16-bit K <= 9 included) and, in v2, every configuration; logits of magnitude 1e4 too."""
    cases = Cases(tmp_path)
    shapes = [(1, 20, 9, 37, 2, 3), (1, 6, 5, 7, 2, 7), (1, 18, 10, 17, 1, 9), (1, 4, 6, 9, 1, 13)]
    for n, shape in enumerate(shapes):
        for m, (name, edit) in enumerate(_non_finite_edits(shape).items()):
            # logits scaled by 4 with infinities in x: no probability near float32's underflow, where
            # an infinity times a probability that is 0 in float32 but not in float64 gives NaN
            # instead of the oracle's infinity (docs/op.md)
            layout = ("nchw", "nhwc")[(n + m) % 2]
            cases.add(shape, dtype, layout, True, variant, 4.0 if name == "x" else 30.0, edit=edit)
        cases.add(
            shape, dtype, ("nhwc", "nchw")[n % 2], n % 2 == 0, variant, 1e4, edit=_non_finite_edits(shape)["masked"]
        )
    if variant == "v2":
        for n, mode in enumerate(MODES):
            d = mode["dilation"]
            shape = (1, 6, 3 * d + 2, 3 * d + 9, 2, 3)
            for m, (name, edit) in enumerate(_non_finite_edits(shape).items()):
                if mode["normalize"] is None and name in ("masked", "all_masked"):
                    continue  # raw weights: no softmax, no masked taps
                cases.add(shape, dtype, ("nchw", "nhwc")[(n + m) % 2], True, "v2", 4.0, mode, edit)
    cases.run(harness)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_na2d_qk_configuration(harness, tmp_path, dtype):
    """The backward as sgdc_kernels.compat.na2d_qk calls it (custom_ops.define_dots_op): one head of
    DiNAT's 32 channels, channels_last, clamped windows, raw weights, no gate, K 3 to 13 and
    dilation 1 to 4 from the smallest image up. Its weight pass (dk) is na2d_qk with dout as the
    query and x as the key; the forward and dx are na2d_qk's gradients."""
    cases = Cases(tmp_path)
    for n, (K, d) in enumerate([(3, 1), (3, 4), (5, 2), (7, 3), (7, 1), (9, 2), (13, 1), (13, 4)]):
        mode = dict(dilation=d, border="clamp", normalize=None)
        cases.add((1, 32, K * d + n % 2, K * d + 3, 1, K), dtype, "nhwc", False, "v2", 4.0, mode)
    cases.run(harness)
