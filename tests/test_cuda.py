"""The `cuda` backend: the compiled extension sgdc_kernels._C (csrc/).

Without a GPU: the extension imports, its operators have the schemas of sgdc_kernels.custom_ops,
fake kernels and autograd are wired, and the backend reports itself unavailable with the reason.
With a GPU: agreement with the float64 oracle `unfold_forward`, forward and backward, across
dtypes, layouts, K, heads, borders and odd sizes; determinism; opcheck; torch.compile; and one
tensor over 2**31 elements.
"""

import importlib
import shutil
import subprocess
import sys

import pytest
import torch

import sgdc_kernels
from sgdc_kernels import BackendUnavailableError, sgdc_conv
from sgdc_kernels.custom_ops import BACKWARD_SCHEMA, FORWARD_SCHEMA
from sgdc_kernels.testing import assert_close, check_backend, forward_backward, make_inputs, oracle


def _extension():
    try:
        return importlib.import_module("sgdc_kernels._C")
    except ImportError as exc:
        pytest.skip(
            f"sgdc_kernels._C is not built ({exc}); build it with "
            "`CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace` (CI builds it)"
        )


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _variants() -> list[str]:
    try:
        return importlib.import_module("sgdc_kernels._C").VARIANTS.split(",")
    except ImportError:
        return ["v2"]  # the GPU tests skip without the extension anyway


VARIANTS = _variants()


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Each GPU test that takes it runs once per kernel variant: the operators' ``variant``
    argument, or ``backend=f"cuda@{variant}"``."""
    return request.param


# ---------------------------------------------------------------------------------------------
# Without a GPU: registration, schemas, fakes, autograd wiring, availability.
# ---------------------------------------------------------------------------------------------


def test_extension_registers_operators_with_the_shared_schemas():
    _extension()
    fwd, bwd = torch.ops.sgdc.cuda_forward.default, torch.ops.sgdc.cuda_backward.default
    assert str(fwd._schema) == "sgdc::cuda_forward" + FORWARD_SCHEMA
    assert str(bwd._schema) == "sgdc::cuda_backward" + BACKWARD_SCHEMA
    assert torch._C._dispatch_has_kernel_for_dispatch_key(fwd.name(), "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(bwd.name(), "CUDA")


def test_build_info():
    _extension()
    from sgdc_kernels import _extension as loader

    info = loader.build_info()
    assert info is not None and info.get("archs"), info
    assert all(a.startswith("sm_") for a in info["archs"])
    assert info["cuda"].count(".") == 1
    # compiled against some torch from 2.10 (the isolated build's, or the running one without
    # isolation), for the stable ABI of 2.10, which the running torch (at least 2.10) provides
    assert info["torch"] == loader.built_against().split("+")[0], info
    assert info["loads into"] == "torch 2.10 and later (stable ABI)", info
    assert info["kernel variants"] == VARIANTS and len(VARIANTS) == len(set(VARIANTS)) >= 1


def test_the_extension_uses_only_the_stable_abi():
    """No C++ symbol of c10, ATen or torch is left for the dynamic linker to resolve (those change
    from one torch to the next): only the C shim of the stable ABI, the CUDA runtime, the C/C++
    runtime and the Python limited API. And the module is tagged abi3, for every CPython from 3.10."""
    ext = _extension()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) on PATH")
    assert ext.__file__.endswith(".abi3.so"), ext.__file__
    out = subprocess.run([nm, "-D", "--undefined-only", ext.__file__], capture_output=True, text=True, check=True)
    symbols = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    unstable = [s for s in symbols if s.startswith(("_ZN3c10", "_ZNK3c10", "_ZN2at", "_ZNK2at", "_ZN5torch"))]
    assert not unstable, unstable
    assert any(s.startswith(("aoti_torch_", "torch_")) for s in symbols), symbols


def test_extension_and_python_ops_share_the_namespace():
    """The C++ fragment and the Python-defined sgdc::torch_* ops load in one process, either order."""
    _extension()
    code = (
        "import torch, importlib, sgdc_kernels; order = {order!r}\n"
        "for step in order:\n"
        "    importlib.import_module('sgdc_kernels._C') if step == 'C' else sgdc_kernels.get_backend('torch')\n"
        "assert hasattr(torch.ops.sgdc, 'cuda_forward') and hasattr(torch.ops.sgdc, 'torch_forward')\n"
    )
    for order in (["C", "torch"], ["torch", "C"]):
        subprocess.run([sys.executable, "-c", code.format(order=order)], check=True)


def _fake_inputs(B, C, H, W, G, K, gate, channels_last, dtype, device="cuda"):
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make(c):
        return torch.empty(B, c, H, W, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()

    return make(C), make(G * K * K), (make(C) if gate else None)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_kernels_and_autograd(channels_last, gate, dtype):
    """Under FakeTensorMode (no GPU needed), forward and backward give the shapes, strides and
    dtypes of torch.empty_like of the inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _extension()
    with FakeTensorMode():
        x, k, g = _fake_inputs(2, 8, 5, 6, 2, 3, gate, channels_last, dtype)
        out = torch.ops.sgdc.cuda_forward(x, k, g, 3, 2, 1, False, True, "v2")
        assert out.shape == x.shape and out.stride() == x.stride() and out.dtype == dtype
        assert out.device.type == "cuda"
        dx, dk, dg = torch.ops.sgdc.cuda_backward(out, x, k, g, 3, 2, 1, False, True, "v2")
        assert dx.stride() == x.stride() and dk.stride() == k.stride()
        assert dk.shape == k.shape and dk.dtype == dtype
        if gate:
            assert dg.shape == x.shape and dg.stride() == g.stride()
        else:
            assert dg.numel() == 0
        # Autograd through the registered backward; the engine needs a real CUDA device for
        # fake CUDA tensors, so this part runs on fake meta tensors.
        x, k, g = _fake_inputs(2, 8, 5, 6, 2, 3, gate, channels_last, dtype, device="meta")
        out = torch.ops.sgdc.cuda_forward(x, k, g, 3, 2, 1, False, True, "v2")
        grads = torch.autograd.grad(out.sum(), [t for t in (x, k, g) if t is not None])
        for grad, leaf in zip(grads, (x, k, g)):
            assert grad.shape == leaf.shape and grad.stride() == leaf.stride()


def test_operators_reject_cpu_tensors():
    _extension()
    x, k = torch.randn(1, 4, 3, 3), torch.randn(1, 4 * 9, 3, 3)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.ops.sgdc.cuda_forward(x, k, None, 3, 4, 1, False, True, "v2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_unavailable_without_gpu_says_why():
    assert "cuda" not in sgdc_kernels.available_backends()
    reason = sgdc_kernels.unavailable_reason("cuda")
    assert "no CUDA GPU" in reason or "not built" in reason, reason
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        sgdc_conv(torch.randn(1, 4, 3, 3), torch.randn(1, 4 * 49, 3, 3), backend="cuda")


# ---------------------------------------------------------------------------------------------
# With a GPU.
# ---------------------------------------------------------------------------------------------

# (B, C, H, W, heads, K): borders, H or W < K, 1x1, K in {1,3,5,7,9,13}, Cg not a multiple of 8,
# several tiles in both directions.
SHAPES = [
    (2, 8, 9, 11, 2, 3),
    (1, 12, 7, 5, 3, 5),
    (2, 16, 13, 10, 4, 7),
    (1, 4, 5, 6, 1, 1),
    (1, 6, 4, 3, 2, 9),
    (1, 4, 1, 1, 2, 13),
    (1, 3, 15, 17, 1, 13),
    (2, 20, 8, 40, 2, 7),
    (1, 16, 33, 70, 4, 5),
    (1, 10, 19, 21, 5, 11),
]


def _inputs(shape, dtype, channels_last, gate, device="cuda"):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return make_inputs(shape, dtype, device, gate=gate, memory_format=fmt)


@requires_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}G{}K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
def test_matches_float64_reference(shape, dtype, channels_last, gate, variant):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    check_backend(f"cuda@{variant}", shape, dtype, "cuda", gate=gate, memory_format=fmt)


WINDOW_MODES = [
    dict(dilation=d, border=b, normalize=n)
    for d, b, n in ((1, "clamp", None), (1, "clamp", "softmax"), (2, "zero", "softmax"), (2, "clamp", None),
                    (1, "zero", None))
]  # fmt: skip


@requires_gpu
@pytest.mark.parametrize("mode", WINDOW_MODES, ids=lambda m: f"d{m['dilation']}-{m['border']}-{m['normalize']}")
@pytest.mark.parametrize("K", [3, 7, 13, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_window_conv_configurations(mode, K, dtype, channels_last):
    """Dilated and clamped windows and raw weights, with the default variant, the one that runs them
    (the others refuse them: test_variants_refuse_configurations_they_do_not_run)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    d = mode["dilation"]
    shape = (2, 24, K * d + 5, K * d + 19, 2, K)
    check_backend("cuda", shape, dtype, "cuda", gate=K % 2 == 1 and channels_last, memory_format=fmt, mode=mode)


@requires_gpu
def test_variants_refuse_configurations_they_do_not_run():
    x, k, g = _inputs((1, 16, 14, 15, 2, 5), torch.bfloat16, True, True)
    config = (5, 2, 1, True, False)
    for v in VARIANTS:
        if v == "v2":
            torch.ops.sgdc.cuda_forward(x, k, g, *config, v)
            continue
        with pytest.raises(RuntimeError, match=f"variant: {v} runs only sgdc_conv's configuration"):
            torch.ops.sgdc.cuda_forward(x, k, g, *config, v)
        with pytest.raises(ValueError, match=f"backend: 'cuda@{v}' runs only sgdc_conv's configuration"):
            sgdc_kernels.window_conv(x, k, g, kernel_size=5, num_heads=2, border="clamp", backend=f"cuda@{v}")


@requires_gpu
def test_two_variants_in_one_process_and_one_graph():
    x, k, g = _inputs((1, 16, 14, 15, 2, 5), torch.float32, False, True)

    def both(x, k, g):
        return [sgdc_conv(x, k, g, kernel_size=5, num_heads=2, backend=f"cuda@{v}") for v in VARIANTS]

    eager = both(x, k, g)
    compiled = torch.compile(both, fullgraph=True)(x, k, g)
    for v, a, b in zip(VARIANTS, eager, compiled):
        torch.testing.assert_close(a, b, msg=v)
        torch.testing.assert_close(a, eager[0], atol=1e-5, rtol=1e-5, msg=v)


@requires_gpu
def test_na2d_av_on_the_gpu():
    """NATTEN's layout on the fused kernels: OverLoCK's large kernel on a 56x56 map, bf16."""
    from sgdc_kernels.compat import na2d_av

    attn = torch.randn(2, 4, 56, 56, 17 * 17, device="cuda").softmax(-1).bfloat16().requires_grad_()
    value = torch.randn(2, 4, 56, 56, 32, device="cuda").bfloat16().requires_grad_()
    grad = torch.randn_like(value)
    out, grads = forward_backward(lambda a, v: na2d_av(a, v, 17, backend="cuda"), (attn, value), grad)
    ref, ref_grads = forward_backward(
        lambda a, v: na2d_av(a, v, 17, backend="torch"), (attn.double(), value.double()), grad.double()
    )
    assert_close(out, ref, torch.bfloat16, "out")
    for got, want, name in zip(grads, ref_grads, ("d_attn", "d_value")):
        assert_close(got, want, torch.bfloat16, name)


@requires_gpu
def test_empty_batch(variant):
    x, k, g = _inputs((0, 8, 5, 5, 2, 3), torch.float32, False, True)
    out = torch.ops.sgdc.cuda_forward(x, k, g, 3, 2, 1, False, True, variant)
    assert out.shape == x.shape
    dx, dk, dg = torch.ops.sgdc.cuda_backward(out, x, k, g, 3, 2, 1, False, True, variant)
    assert dx.shape == x.shape and dk.shape == k.shape and dg.shape == g.shape


@requires_gpu
def test_unknown_variant_is_a_clear_error():
    x, k, g = _inputs((1, 8, 5, 5, 2, 3), torch.float32, False, True)
    with pytest.raises(RuntimeError, match="variant: 'nonesuch' is not a kernel variant of the cuda backend"):
        torch.ops.sgdc.cuda_forward(x, k, g, 3, 2, 1, False, True, "nonesuch")
    with pytest.raises(ValueError, match="backend: unknown variant 'nonesuch' of 'cuda'"):
        sgdc_conv(x, k, g, kernel_size=3, num_heads=2, backend="cuda@nonesuch")


@requires_gpu
def test_operator_checks_its_inputs():
    x, k, g = _inputs((1, 8, 5, 5, 2, 3), torch.float32, False, True)
    config = (3, 2, 1, False, True, "v2")
    with pytest.raises(RuntimeError, match="weights must have shape"):
        torch.ops.sgdc.cuda_forward(x, k[:, :9], g, *config)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.sgdc.cuda_forward(x, k.half(), g, *config)
    with pytest.raises(RuntimeError, match="dense in x's memory format"):
        torch.ops.sgdc.cuda_forward(x, k.contiguous(memory_format=torch.channels_last), g, *config)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K,config", [(7, (1, False, True)), (9, (1, False, True)), (13, (2, True, False))])
def test_backward_is_deterministic(dtype, K, config, variant):
    if config != (1, False, True) and variant != "v2":
        pytest.skip(f"{variant} runs sgdc_conv's configuration only")
    x, k, g = _inputs((2, 64, 32, 48, 4, K), dtype, True, True)
    dout = torch.randn_like(x)
    first = torch.ops.sgdc.cuda_backward(dout, x, k, g, K, 4, *config, variant)
    for _ in range(3):
        again = torch.ops.sgdc.cuda_backward(dout, x, k, g, K, 4, *config, variant)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@requires_gpu
@pytest.mark.parametrize("channels_last,gate", [(False, True), (True, False)])
def test_opcheck(channels_last, gate, variant):
    x, k, g = _inputs((2, 8, 6, 7, 2, 3), torch.float32, channels_last, gate)
    args = (x.requires_grad_(), k.requires_grad_(), g.requires_grad_() if gate else None, 3, 2, 1, False, True, variant)
    torch.library.opcheck(torch.ops.sgdc.cuda_forward.default, args)
    dout = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.sgdc.cuda_backward.default, (dout, *(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    )


@requires_gpu
def test_torch_compile_fullgraph(variant):
    x, k, g = _inputs((2, 16, 12, 12, 4, 5), torch.float32, False, True)

    def step(x, k, g):
        out = sgdc_conv(x, k, g, kernel_size=5, num_heads=4, backend=f"cuda@{variant}")
        return torch.autograd.grad((out * out).sum(), (x, k, g))

    leaves = [t.requires_grad_() for t in (x, k, g)]
    eager = step(*leaves)
    compiled = torch.compile(step, fullgraph=True)(*leaves)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@requires_gpu
@pytest.mark.slow
def test_tensor_over_2_31_elements(variant):
    """x and kernel with more than 2**31 elements (fp16, ~25 GB in all): outputs and gradients at
    the two corners, where offsets are smallest and largest, match the oracle run on crops."""
    B, C, H, W, G, K = 1, 8, 16400, 16400, 1, 3
    assert B * C * H * W > 2**31 and B * G * K * K * H * W > 2**31
    if torch.cuda.mem_get_info()[0] < 30 * 2**30:
        pytest.skip("needs about 30 GB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda c: torch.randn(B, c, H, W, device="cuda", dtype=torch.float16, generator=gen)  # noqa: E731
    x, k, dout = rand(C), rand(G * K * K), rand(C)
    out = torch.ops.sgdc.cuda_forward(x, k, None, K, G, 1, False, True, variant)
    dx, dk, _ = torch.ops.sgdc.cuda_backward(dout, x, k, None, K, G, 1, False, True, variant)
    n, m = 24, 2 * (K // 2)  # crop size; margin where a crop's inner edge cuts the window
    for top, left in ((0, 0), (H - n, W - n)):
        rows, cols = slice(top, top + n), slice(left, left + n)

        def crop(t, rows=rows, cols=cols):
            return t[:, :, rows, cols]

        ref_out, (ref_dx, ref_dk) = forward_backward(oracle(K, G), (crop(x), crop(k), None), crop(dout).double())
        # keep the part at least m away from the crop's inner edges
        keep = (
            slice(None),
            slice(None),
            slice(0, n - m) if top == 0 else slice(m, n),
            slice(0, n - m) if left == 0 else slice(m, n),
        )
        for got, ref, what in ((out, ref_out, "out"), (dx, ref_dx, "dx"), (dk, ref_dk, "dweights")):
            assert_close(crop(got)[keep], ref[keep], torch.float16, what)
