"""sgdc_conv: every backend against the float64 unfold oracle, gradients, opcheck, compile, layouts."""

import itertools

import pytest
import torch

import sgdc_kernels
from sgdc_kernels import BackendUnavailableError, available_backends, get_backend, sgdc_conv
from sgdc_kernels.testing import (
    assert_close,
    backend_fn,
    check_backend,
    check_tensors,
    forward_backward,
    gather_reference,
    make_inputs,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backends(device):
    # Under the CPU interpreter, Triton is slow and has its own tests (tests/test_triton.py).
    return [b for b in available_backends(device) if not (b == "triton" and device == "cpu")]


def _cpu_backend(*names):
    """pytest params of backends that run on the CPU; backend 'cpu' skipped, with the reason, where
    the extension is not built."""
    for name in names:
        why = sgdc_kernels.unavailable_reason(name) if name == "cpu" else None
        yield pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=why or ""))


def _cases():
    for device in DEVICES:
        for backend in _backends(device):
            for dtype in get_backend(backend).dtypes:
                yield pytest.param(device, backend, dtype, id=f"{device}-{backend}-{str(dtype)[6:]}")


SHAPES = [
    # B, C, H, W, G, K
    (2, 8, 9, 11, 2, 3),  # borders on every side
    (1, 4, 3, 2, 1, 5),  # H and W < K
    (2, 6, 5, 7, 3, 1),  # K = 1
    (1, 8, 10, 10, 4, 7),  # the paper's K and heads
    (1, 3, 1, 1, 1, 7),  # a single pixel
]


@pytest.mark.parametrize("device,backend,dtype", list(_cases()))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
def test_matches_float64_oracle(device, backend, dtype, shape, with_gate):
    if backend == "unfold" and dtype == torch.float64:
        # unfold in float64 is the oracle itself: check it against the independent reference
        check_against_gather_reference(shape, device, with_gate)
    else:
        check_backend(backend, shape, dtype, device, gate=with_gate)


def check_against_gather_reference(shape, device, with_gate):
    """`unfold` in float64 against sgdc_kernels.testing.gather_reference, written from the
    definition without F.unfold: forward and every gradient."""
    *_, G, K = shape
    tensors = make_inputs(shape, torch.float64, device, gate=with_gate)
    grad_out = torch.randn_like(tensors[0])
    out, grads = forward_backward(backend_fn("unfold", K, G), tensors, grad_out)
    ref, ref_grads = forward_backward(lambda *t: gather_reference(*t, K, G), tensors, grad_out)
    assert_close(out, ref, torch.float64, "out")
    for name, got, want in zip(("d_x", "d_weights", "d_gate"), grads, ref_grads):
        assert_close(got, want, torch.float64, name)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs Triton's interpreter")
@pytest.mark.parametrize("variant", ["v1", "v2dot"], ids=["taps", "band"])
@pytest.mark.parametrize(
    "shape,with_gate",
    [(SHAPES[1], True), (SHAPES[1], False), ((1, 2, 4, 5, 1, 13), True)],
    ids=["5-gate", "5", "13-gate"],
)
def test_triton_interpreter_at_kernel_sizes_5_and_13(variant, shape, with_gate):
    """The triton kernels (both families: the per-tap ones of v1 and the band ones of v2dot) at
    K = 5 and 13, which tests/test_triton.py does not run, on tiny shapes through the interpreter."""
    check_backend(f"triton@{variant}", shape, gate=with_gate)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_layouts(device, layout):
    shape = B, C, H, W, G, K = 2, 8, 6, 7, 2, 3
    for backend in _backends(device):
        x, kernel, gate = make_inputs(shape, device=device)
        if layout == "channels_last":
            x, kernel, gate = (t.contiguous(memory_format=torch.channels_last) for t in (x, kernel, gate))
        elif layout == "sliced":  # channel slices of a bigger tensor, as SGDC's split produces
            big = torch.randn(B, 2 * C + G * K * K, H, W, device=device)
            x, gate, kernel = torch.split(big, [C, C, G * K * K], dim=1)
        else:  # H and W swapped in memory
            x, kernel, gate = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x, kernel, gate))
        check_tensors(backend, (x, kernel, gate), K, G)


@pytest.mark.parametrize("backend", list(_cpu_backend("unfold", "torch", "cpu")))
@pytest.mark.parametrize("with_gate", [True, False])
def test_gradcheck_float64(backend, with_gate):
    x, kernel, gate = make_inputs((1, 4, 4, 5, 2, 3), torch.float64, gate=with_gate)
    inputs = tuple(t.requires_grad_() for t in (x, kernel, gate) if t is not None)

    def f(*args):
        return sgdc_conv(*args, kernel_size=3, num_heads=2, backend=backend)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_gate", [True, False])
@pytest.mark.parametrize("config", [(1, False, True), (2, True, False)], ids=["sgdc", "dilated-clamp-raw"])
@pytest.mark.parametrize("name", list(_cpu_backend("torch", "cpu")))
def test_opcheck(name, layout, with_gate, config):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, kernel, gate = (
        t.contiguous(memory_format=fmt).requires_grad_() if t is not None else None
        for t in make_inputs((2, 4, 6, 7, 2, 3), gate=with_gate)
    )
    backend = get_backend(name)
    torch.library.opcheck(backend.forward, (x, kernel, gate, 3, 2, *config, ""))
    grad_out = torch.randn_like(x)
    detached = [t.detach() if t is not None else None for t in (grad_out, x, kernel, gate)]
    torch.library.opcheck(backend.backward, (*detached, 3, 2, *config, ""))


class Block(torch.nn.Module):
    def __init__(self, C=8, G=2, K=3, backend="auto"):
        super().__init__()
        self.proj = torch.nn.Conv2d(C, 2 * C + G * K * K, 1)
        self.C, self.G, self.K, self.backend = C, G, K, backend

    def forward(self, x):
        gate, kernel, v = torch.split(self.proj(x), [self.C, self.G * self.K**2, self.C], dim=1)
        return sgdc_conv(v, kernel, gate, kernel_size=self.K, num_heads=self.G, backend=self.backend)


@pytest.mark.parametrize("backend", ["auto", *_cpu_backend("torch", "unfold", "cpu")])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    block = Block(backend=backend)
    x = torch.randn(2, 8, 6, 5, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)  # the first call is compiled, backend loading included
    expected = block(x)
    torch.testing.assert_close(out, expected)
    (gc,) = torch.autograd.grad(out.square().sum(), x)
    (ge,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_spatial(device):
    for backend in _backends(device):
        for shape in [(0, 4, 5, 5), (2, 4, 0, 3)]:
            B, C, H, W = shape
            x = torch.randn(shape, device=device, requires_grad=True)
            kernel = torch.randn(B, 2 * 9, H, W, device=device, requires_grad=True)
            out = sgdc_conv(x, kernel, kernel_size=3, num_heads=2, backend=backend)
            assert out.shape == shape
            out.sum().backward()
            assert x.grad.shape == shape and kernel.grad.shape == kernel.shape


def test_zero_inputs_are_uniform_average():
    # logits 0 -> uniform weights; gate 0 -> factor 1/2; x = 1 -> in-image fraction of the window.
    x = torch.ones(1, 2, 3, 3)
    out = sgdc_conv(x, torch.zeros(1, 9, 3, 3), torch.zeros(1, 2, 3, 3), kernel_size=3, num_heads=1)
    expected = torch.tensor([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) / 9 / 2
    torch.testing.assert_close(out[0, 0], expected)


def test_available_backends_and_registry():
    names = available_backends()
    assert {"unfold", "torch"} <= set(names)
    assert set(available_backends("cpu")) >= {"unfold", "torch"}
    with pytest.raises(ValueError, match="backend: unknown backend 'nope'"):
        get_backend("nope")
    x, kernel, gate = make_inputs((1, 4, 3, 3, 2, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        sgdc_conv(x, kernel, gate, kernel_size=3, num_heads=2, backend="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_unavailable_backend_says_why():
    x, kernel, gate = make_inputs((1, 4, 3, 3, 2, 3))
    assert "cuda" not in available_backends()
    with pytest.raises(BackendUnavailableError, match="cuda") as info:
        sgdc_conv(x, kernel, gate, kernel_size=3, num_heads=2, backend="cuda")
    assert "GPU" in str(info.value) or "pip install" in str(info.value)
    assert sgdc_kernels.unavailable_reason("cuda")


def test_auto_picks_the_cpu_kernels_on_cpu_else_torch():
    from sgdc_kernels.registry import resolve_backend

    want = "torch" if sgdc_kernels.unavailable_reason("cpu") else "cpu"
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", "cpu", dtype) == want


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash or a silent wrong result.
# ------------------------------------------------------------------------------------------------


def _good():
    return dict(
        x=torch.randn(2, 8, 5, 6),
        kernel=torch.randn(2, 2 * 9, 5, 6),
        gate=torch.randn(2, 8, 5, 6),
        kernel_size=3,
        num_heads=2,
    )


BAD = {
    "x rank 3": (dict(x=torch.randn(8, 5, 6)), ValueError, "x: expected a 4-D"),
    "kernel rank 5": (dict(kernel=torch.randn(2, 2, 9, 5, 6)), ValueError, "kernel: expected a 4-D"),
    "gate rank 2": (dict(gate=torch.randn(5, 6)), ValueError, "gate: expected a 4-D"),
    "batch mismatch": (dict(kernel=torch.randn(3, 18, 5, 6)), ValueError, "kernel: expected shape"),
    "spatial mismatch": (dict(kernel=torch.randn(2, 18, 5, 7)), ValueError, "kernel: expected shape"),
    "kernel channels": (dict(kernel=torch.randn(2, 9, 5, 6)), ValueError, r"num_heads\*kernel_size\*\*2"),
    "C % heads": (dict(num_heads=3, kernel=torch.randn(2, 27, 5, 6)), ValueError, "multiple of num_heads"),
    "even K": (dict(kernel_size=4), ValueError, "kernel_size: expected an odd"),
    "zero K": (dict(kernel_size=0), ValueError, "kernel_size: expected a positive"),
    "negative K": (dict(kernel_size=-3), ValueError, "kernel_size: expected a positive"),
    "float K": (dict(kernel_size=3.0), TypeError, "kernel_size"),
    "zero heads": (dict(num_heads=0), ValueError, "num_heads"),
    "bool heads": (dict(num_heads=True), TypeError, "num_heads"),
    "int x": (dict(x=torch.ones(2, 8, 5, 6, dtype=torch.int64)), TypeError, "x: expected a floating"),
    "int kernel": (dict(kernel=torch.ones(2, 18, 5, 6, dtype=torch.int32)), TypeError, "kernel: expected a floating"),
    "bool gate": (dict(gate=torch.ones(2, 8, 5, 6, dtype=torch.bool)), TypeError, "gate: expected a floating"),
    "mixed dtype": (
        dict(kernel=torch.randn(2, 18, 5, 6, dtype=torch.float64)),
        TypeError,
        "kernel: expected x's dtype",
    ),
    "mixed gate dtype": (dict(gate=torch.randn(2, 8, 5, 6).half()), TypeError, "gate: expected x's dtype"),
    "mixed device": (
        dict(gate=torch.randn(2, 8, 5, 6, device="meta")),
        ValueError,
        "gate: expected a tensor on x's device",
    ),
    "gate shape": (dict(gate=torch.randn(2, 8, 5, 5)), ValueError, "gate: expected the shape of x"),
    "gate channels": (dict(gate=torch.randn(2, 4, 5, 6)), ValueError, "gate: expected the shape of x"),
    "x not a tensor": (dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    "backend type": (dict(backend=3), TypeError, "backend: expected a str"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_clear_error(case):
    change, exc, pattern = BAD[case]
    args = {**_good(), **change}
    x, kernel, gate = args.pop("x"), args.pop("kernel"), args.pop("gate")
    with pytest.raises(exc, match=pattern):
        sgdc_conv(x, kernel, gate, **args)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs Triton's CPU interpreter")
def test_unsupported_dtype_for_backend_is_named():
    dtypes = get_backend("triton").dtypes
    if torch.float64 in dtypes:
        pytest.skip("this triton build accepts float64")
    x, kernel, gate = make_inputs((1, 4, 3, 3, 2, 3), torch.float64)
    with pytest.raises(TypeError, match="x: backend 'triton' does not support dtype torch.float64"):
        sgdc_conv(x, kernel, gate, kernel_size=3, num_heads=2, backend="triton")


def test_half_and_bfloat16_keep_dtype_on_cpu():
    for dtype, backend in itertools.product((torch.float16, torch.bfloat16), _backends("cpu")):
        x, kernel, gate = make_inputs((1, 4, 4, 4, 2, 3), dtype)
        assert sgdc_conv(x, kernel, gate, kernel_size=3, num_heads=2, backend=backend).dtype == dtype
