"""The `triton` backend (triton_ops/) against the float64 unfold oracle.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and these tests run the very same kernels on CPU
tensors through Triton's interpreter (float32; slow, so the shapes are tiny). With a GPU they run
on CUDA tensors in float32, float16 and bfloat16, plus K up to 13, torch.compile and opcheck.
"""

import os
import subprocess
import sys

import pytest
import torch

from sgdc_kernels import available_backends, get_backend, sgdc_conv
from sgdc_kernels.testing import TOLERANCES as TOL
from sgdc_kernels.testing import backend_fn, check_backend, make_inputs
from sgdc_kernels.testing import forward_backward as run

CPU_OK = "triton" in available_backends("cpu")  # only under TRITON_INTERPRET=1
CUDA_OK = torch.cuda.is_available() and "triton" in available_backends("cuda")
requires_interpreter = pytest.mark.skipif(not CPU_OK, reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
requires_gpu = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU with triton")

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _inputs(shape, dtype=torch.float32, device="cpu", gate=True, layout="nchw"):
    return make_inputs(shape, dtype, device, gate=gate, memory_format=LAYOUTS[layout])


def triton_conv(K, G):
    return backend_fn("triton", K, G)


def check_against_oracle(shape, dtype, device, with_gate, layout):
    check_backend("triton", shape, dtype, device, gate=with_gate, memory_format=LAYOUTS[layout])


# ---------------------------------------------------------------------------------------------
# CPU, through the interpreter (float32)
# ---------------------------------------------------------------------------------------------

CPU_SHAPES = [
    # B, C, H, W, G, K
    (2, 8, 5, 7, 2, 3),  # borders on every side, two heads
    (1, 4, 3, 2, 4, 7),  # H and W < K, four heads of one channel
    (2, 6, 4, 5, 3, 1),  # K = 1, three heads of two channels
    (1, 8, 9, 8, 1, 7),  # the paper's K, one head
    (1, 3, 6, 1, 1, 5),  # W = 1
]


@requires_interpreter
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_interpreter_matches_oracle(shape, with_gate, layout):
    check_against_oracle(shape, torch.float32, "cpu", with_gate, layout)


@requires_interpreter
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_interpreter_several_tiles_and_channel_blocks(monkeypatch, layout):
    # Blocks smaller than the head and the image: 3 channel blocks (dP summed across them) and
    # 3 pixel tiles per (batch, head), with partial last blocks.
    from sgdc_kernels.triton_ops import sgdc_conv as impl

    monkeypatch.setitem(impl.INTERPRET_BLOCKS, "BLOCK_P", 16)
    monkeypatch.setitem(impl.INTERPRET_BLOCKS, "BLOCK_C", 2)
    check_against_oracle((1, 10, 7, 6, 2, 3), torch.float32, "cpu", True, layout)


@requires_interpreter
@pytest.mark.parametrize("shape,layout", [((1, 2, 3, 4, 1, 13), "nchw"), ((1, 4, 4, 4, 2, 9), "channels_last")])
def test_interpreter_large_k(shape, layout):
    check_against_oracle(shape, torch.float32, "cpu", True, layout)


@requires_interpreter
def test_interpreter_backward_is_deterministic():
    x, kernel, gate = _inputs((1, 4, 5, 5, 2, 3))
    grad_out = torch.randn_like(x)
    first = run(triton_conv(3, 2), (x, kernel, gate), grad_out)
    second = run(triton_conv(3, 2), (x, kernel, gate), grad_out)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


@requires_interpreter
def test_interpreter_empty_tensors():
    for B, C, H, W in [(0, 4, 5, 5), (2, 4, 0, 3)]:
        x = torch.randn(B, C, H, W, requires_grad=True)
        kernel = torch.randn(B, 2 * 9, H, W, requires_grad=True)
        gate = torch.randn(B, C, H, W, requires_grad=True)
        out = sgdc_conv(x, kernel, gate, kernel_size=3, num_heads=2, backend="triton")
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape and kernel.grad.shape == kernel.shape and gate.grad.shape == gate.shape


@requires_interpreter
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
def test_interpreter_opcheck(with_gate):
    # Eager checks only: under the interpreter the kernels cannot be traced into a graph
    # (torch.compile and test_aot_dispatch_dynamic need a GPU; see test_gpu_opcheck).
    x, kernel, gate = (t.requires_grad_() if t is not None else None for t in _inputs((1, 4, 4, 3, 2, 3), gate=with_gate))
    backend = get_backend("triton")
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(backend.forward, (x, kernel, gate, 3, 2), test_utils=checks)
    detached = [t.detach() if t is not None else None for t in (torch.randn_like(x), x, kernel, gate)]
    torch.library.opcheck(backend.backward, (*detached, 3, 2), test_utils=("test_schema", "test_faketensor"))


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
# test_ops.py already runs every CUDA backend, triton included, on small NCHW shapes with and without
# gate in every dtype; these add channels_last, large K and several channel blocks, while keeping
# the number of distinct kernel compilations (each a few seconds) small.
GPU_CASES = [
    # (B, C, H, W, G, K), gate, layout
    ((1, 8, 9, 8, 1, 7), True, "channels_last"),
    ((2, 32, 17, 19, 4, 9), True, "channels_last"),
    ((1, 16, 12, 30, 2, 13), True, "nchw"),  # K = 13, H < K
    ((2, 96, 33, 20, 2, 5), False, "channels_last"),  # 48 channels per head: several channel blocks
]


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "shape,with_gate,layout", GPU_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c)
)
def test_gpu_matches_oracle(dtype, shape, with_gate, layout):
    check_against_oracle(shape, dtype, "cuda", with_gate, layout)


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
def test_gpu_no_gate_and_paper_shape_slice(dtype):
    check_against_oracle((2, 64, 32, 32, 4, 7), dtype, "cuda", False, "nchw")


@requires_gpu
def test_gpu_backward_is_deterministic():
    x, kernel, gate = _inputs((2, 64, 32, 32, 4, 7), device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)
    first = run(triton_conv(7, 4), (x, kernel, gate), grad_out)
    for _ in range(3):
        again = run(triton_conv(7, 4), (x, kernel, gate), grad_out)
        for a, b in zip((first[0], *first[1]), (again[0], *again[1])):
            assert torch.equal(a, b)


@requires_gpu
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_opcheck(with_gate, layout):
    x, kernel, gate = (
        t.requires_grad_() if t is not None else None
        for t in _inputs((2, 8, 6, 5, 2, 3), device="cuda", gate=with_gate, layout=layout)
    )
    backend = get_backend("triton")
    torch.library.opcheck(backend.forward, (x, kernel, gate, 3, 2))
    detached = [t.detach() if t is not None else None for t in (torch.randn_like(x), x, kernel, gate)]
    torch.library.opcheck(backend.backward, (*detached, 3, 2))


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_gpu_torch_compile_fullgraph_traces_into_kernels(dtype):
    torch._dynamo.reset()
    G, K = 2, 5

    def f(x, kernel, gate):
        return sgdc_conv(x * 2, kernel, gate, kernel_size=K, num_heads=G, backend="triton").square()

    x, kernel, gate = (t.requires_grad_() for t in _inputs((2, 16, 11, 9, G, K), dtype, "cuda"))
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, kernel, gate)
    expected = f(x, kernel, gate)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    got = torch.autograd.grad(out.sum(), (x, kernel, gate))
    want = torch.autograd.grad(expected.sum(), (x, kernel, gate))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# Without a GPU: the kernels compile for Hopper (Triton's own ptxas), which the interpreter can't show
# ---------------------------------------------------------------------------------------------

_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sgdc_kernels.triton_ops import sgdc_conv as m

INTS = ["H", "W", "CG", "G", "sxb", "sxc", "sxp", "skb", "skc", "skp"]
KERNELS = {  # kernel: its pointer arguments (None: the input dtype) and its constexprs
    m._sgdc_fwd_kernel: (["x_ptr", "k_ptr", "g_ptr", "out_ptr"], ["K", "HAS_GATE"]),
    m._sgdc_bwd_taps_kernel: (
        ["dout_ptr", "x_ptr", "k_ptr", "g_ptr", "dk_ptr", "dg_ptr", "gy_ptr", ("dp_ptr", "fp32"), ("lse_ptr", "fp32")],
        ["K", "HAS_GATE"],
    ),
    m._sgdc_bwd_dx_kernel: (["gy_ptr", "k_ptr", ("lse_ptr", "fp32"), "dx_ptr"], ["K"]),
}
for dtype in ("fp32", "bf16"):
    for kernel, (pointers, const_names) in KERNELS.items():
        signature = {}
        for p in pointers:
            name, ty = p if isinstance(p, tuple) else (p, dtype)
            signature[name] = "*" + ty
        signature.update({n: "i32" for n in INTS})
        consts = {"K": 7, "HAS_GATE": True, "BLOCK_P": 128, "BLOCK_C": 32}
        consts = {k: v for k, v in consts.items() if k in const_names or k.startswith("BLOCK")}
        signature.update({n: "constexpr" for n in consts})
        src = ASTSource(fn=kernel, signature=signature, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert compiled.asm["cubin"], kernel
        print(kernel.__name__, dtype, "compiled for sm_90")
"""


@pytest.mark.skipif(CUDA_OK, reason="with a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled for sm_90") == 6
