"""window_conv: the configurations beyond sgdc_conv (dilation, clamped windows, raw weights), and
the NATTEN drop-in built on it, against two independent float64 references."""

import itertools

import pytest
import torch

from sgdc_kernels import available_backends, sgdc_conv, window_conv
from sgdc_kernels.compat import na2d_av
from sgdc_kernels.testing import (
    assert_close,
    check_backend,
    forward_backward,
    gather_reference,
    make_inputs,
    oracle,
)

# The triton kernels through the interpreter where it runs: the per-tap ones (v1) and the band ones (v2dot)
TRITON_CPU = ["triton@v1", "triton@v2dot"] if "triton" in available_backends("cpu") else []

MODES = [
    dict(dilation=d, border=b, normalize=n)
    for d, b, n in itertools.product((1, 2), ("zero", "clamp"), ("softmax", None))
]


def _id(mode):
    return f"d{mode['dilation']}-{mode['border']}-{mode['normalize'] or 'raw'}"


def _shape(K, d, G=2, Cg=3):
    # the smallest clamped image plus a ragged margin: windows pinned at both borders and free inside
    n = K * d
    return (2, G * Cg, n + 2, n + 3, G, K)


@pytest.mark.parametrize("mode", MODES, ids=_id)
@pytest.mark.parametrize("K", [1, 3, 5, 7, 17])
def test_the_two_references_agree(mode, K):
    """The unfold formulation (replicate-padded windows for clamping) and the gather written from
    the definition (NATTEN's window-start formula), forward and every gradient."""
    if K == 17 and mode["dilation"] == 2:
        pytest.skip("covered by K=17, dilation 1 and the other dilated cases")
    shape = _shape(K, mode["dilation"], G=2, Cg=2)
    tensors = make_inputs(shape, torch.float64)
    grad_out = torch.randn_like(tensors[0])
    a, ga = forward_backward(oracle(K, 2, mode), tensors, grad_out)
    b, gb = forward_backward(lambda *t: gather_reference(*t, K, 2, mode), tensors, grad_out)
    torch.testing.assert_close(a, b)
    for name, p, q in zip(("d_x", "d_weights", "d_gate"), ga, gb):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")


def test_clamp_matches_natten_on_a_worked_example():
    """1-D view: K=3 on 5 pixels, pixel 0 reads 0..2 (not -1..1) and pixel 4 reads 2..4."""
    x = torch.arange(5.0).reshape(1, 1, 1, 5).expand(1, 1, 3, 5).contiguous()
    w = torch.zeros(1, 9, 3, 5)
    w[:, 3:6] = 1.0  # middle row of taps, weight 1 each: the sum of the row's three columns
    out = window_conv(x, w, kernel_size=3, border="clamp", normalize=None, backend="torch")
    assert out[0, 0, 1].tolist() == [3.0, 3.0, 6.0, 9.0, 9.0]
    zero = window_conv(x, w, kernel_size=3, border="zero", normalize=None, backend="torch")
    assert zero[0, 0, 1].tolist() == [1.0, 3.0, 6.0, 9.0, 7.0]


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "triton"])
@pytest.mark.parametrize("mode", MODES, ids=_id)
@pytest.mark.parametrize("K", [3, 5, 13, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_backends_match_the_oracle(backend, mode, K, dtype):
    if backend == "unfold" and dtype != torch.float32:
        pytest.skip("unfold computes in the input's dtype: its 16-bit accuracy is tested in test_ops.py")
    layout = torch.channels_last if K == 5 else torch.contiguous_format
    check_backend(backend, _shape(K, mode["dilation"]), dtype, mode=mode, memory_format=layout, gate=K != 13)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs Triton's interpreter")
@pytest.mark.parametrize("variant", ["v1", "v2dot"], ids=["taps", "band"])
@pytest.mark.parametrize("mode", MODES, ids=_id)
@pytest.mark.parametrize("K", [5, 13])
def test_triton_interpreter_matches_the_oracle(variant, mode, K):
    """The triton kernels (the per-tap ones of v1, the band ones of v2dot) at K = 5 and 13 in every
    configuration, through the interpreter: one head of two channels, the smallest image
    (clamped windows: K * dilation plus a ragged margin; centred ones: below K)."""
    d = mode["dilation"]
    if K == 13 and d == 2 and mode["border"] == "clamp":
        pytest.skip("a 26 x 27 image takes a minute in the interpreter; dilated clamped windows run at K = 5 here")
    n = K * d if mode["border"] == "clamp" else 3
    shape = (1, 2, n, n + 1, 1, K)
    layout = torch.channels_last if K == 5 else torch.contiguous_format
    check_backend(f"triton@{variant}", shape, mode=mode, memory_format=layout, gate=K == 5)


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b in ("torch", "cpu")])
@pytest.mark.parametrize("mode", MODES[1:], ids=_id)
def test_gradcheck_float64(backend, mode):
    x, w, g = make_inputs(_shape(3, mode["dilation"], G=1, Cg=2), torch.float64)
    x, w, g = (t[:1].detach().requires_grad_() for t in (x, w, g))

    def f(*args):
        return window_conv(*args, kernel_size=3, backend=backend, **mode)

    assert torch.autograd.gradcheck(f, (x, w, g))


def test_sgdc_conv_is_the_default_configuration():
    x, k, g = make_inputs((2, 8, 9, 10, 2, 5))
    a = sgdc_conv(x, k, g, kernel_size=5, num_heads=2, backend="torch")
    b = window_conv(x, k, g, kernel_size=5, num_heads=2, backend="torch")
    assert torch.equal(a, b)


def test_compiles_fullgraph():
    x, w, _ = make_inputs((1, 4, 8, 9, 2, 3))
    f = torch.compile(
        lambda x, w: window_conv(x, w, kernel_size=3, num_heads=2, dilation=2, border="clamp", normalize=None),
        fullgraph=True,
        backend="aot_eager",
    )
    want = window_conv(x, w, kernel_size=3, num_heads=2, dilation=2, border="clamp", normalize=None)
    torch.testing.assert_close(f(x, w), want)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(dilation=0), ValueError, "dilation: expected a positive int"),
        (dict(border="reflect"), ValueError, "border: expected 'zero' or 'clamp'"),
        (dict(normalize="sigmoid"), ValueError, "normalize: expected 'softmax' or None"),
        (dict(border="clamp", dilation=3), ValueError, r"x: border='clamp' needs H and W of at least"),
    ],
)
def test_bad_configuration_is_named(kwargs, error, match):
    x, w, _ = make_inputs((1, 4, 8, 9, 2, 3))
    with pytest.raises(error, match=match):
        window_conv(x, w, kernel_size=3, num_heads=2, **kwargs)


# ---------------------------------------------------------------------------------------------
# NATTEN's na2d_av
# ---------------------------------------------------------------------------------------------


def _natten_inputs(B=2, heads=3, H=9, W=11, D=5, K=3, dtype=torch.float32):
    attn = torch.randn(B, heads, H, W, K * K, dtype=dtype).softmax(-1)
    value = torch.randn(B, heads, H, W, D, dtype=dtype)
    return attn, value


def _natten_reference(attn, value, K, d):
    """na2d_av through the independent gather, heads folded into the batch."""
    B, heads, H, W, D = value.shape
    x = value.permute(0, 1, 4, 2, 3).reshape(B * heads, D, H, W)
    w = attn.permute(0, 1, 4, 2, 3).reshape(B * heads, K * K, H, W)
    out = gather_reference(x, w, None, K, 1, dict(dilation=d, border="clamp", normalize=None))
    return out.reshape(B, heads, D, H, W).permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("K,d", [(3, 1), (5, 2), (7, 1), (3, 3)])
def test_na2d_av_matches_the_definition(K, d):
    attn, value = _natten_inputs(H=K * d + 1, W=K * d + 4, K=K, dtype=torch.float64)
    attn.requires_grad_()
    value.requires_grad_()
    grad = torch.randn_like(value)
    out, grads = forward_backward(lambda a, v: na2d_av(a, v, K, d, backend="torch"), (attn, value), grad)
    ref, ref_grads = forward_backward(lambda a, v: _natten_reference(a, v, K, d), (attn, value), grad)
    assert out.shape == value.shape
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "triton"] + TRITON_CPU)
def test_na2d_av_masked_and_non_finite(backend):
    """docs/op.md's "Non-finite inputs" through na2d_av: attention softmaxed with masked taps (exact
    zeros), a pixel with every tap masked (NaN weights), NaN and infinities in the values; forward
    and gradients against the independent gather, NaN exactly where it has NaN."""
    K, d = 3, 2
    logits = torch.randn(1, 2, K * d + 1, K * d + 2, K * K)
    logits[torch.rand(logits.shape) < 0.3] = float("-inf")
    logits[..., 0] = float("-inf")
    logits[0, 1, 2, 3] = float("-inf")
    attn = logits.softmax(-1)
    value = torch.randn(1, 2, K * d + 1, K * d + 2, 3)
    value[0, 0, 1, 1, 0] = float("nan")
    value[0, 1, 4, 6, 2] = float("inf")
    value[0, 1, 0, 7, 1] = float("-inf")
    grad = torch.randn_like(value)
    out, grads = forward_backward(lambda a, v: na2d_av(a, v, K, d, backend=backend), (attn, value), grad)
    ref, ref_grads = forward_backward(
        lambda a, v: _natten_reference(a, v, K, d), (attn.double(), value.double()), grad.double()
    )
    assert_close(out, ref, torch.float32, "out")
    for name, got, want in zip(("d_attn", "d_value"), grads, ref_grads):
        assert_close(got, want, torch.float32, name)


def test_na2d_av_accepts_natten_argument_forms():
    attn, value = _natten_inputs(K=3)
    want = na2d_av(attn, value, 3)
    torch.testing.assert_close(na2d_av(attn, value, (3, 3), dilation=(1, 1)), want)
    torch.testing.assert_close(na2d_av(attn, value, kernel_size=3, dilation=1, is_causal=False), want)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda a, v: na2d_av(a, v, 4), ValueError, "kernel_size: expected an odd int greater than 1"),
        (lambda a, v: na2d_av(a, v, (3, 5)), ValueError, "kernel_size: expected an int or a pair of equal ints"),
        (lambda a, v: na2d_av(a, v, 3, dilation=4), ValueError, r"input axes must be at least kernel_size \* dil"),
        (lambda a, v: na2d_av(a, v, 3, is_causal=True), ValueError, "is_causal: causal neighborhoods"),
        (lambda a, v: na2d_av(a, v, 5), ValueError, r"attn: expected shape \(B, heads, H, W, kernel_size\*\*2\)"),
        (lambda a, v: na2d_av(a[0], v, 3), ValueError, "attn: expected a 5-D"),
        (lambda a, v: na2d_av(a.double(), v, 3), TypeError, "attn: expected value's dtype"),
        (lambda a, v: na2d_av(a, v.long(), 3), TypeError, "value: expected a floating-point tensor"),
        (lambda a, v: na2d_av(a, v, 3, dilation=(1, 2)), ValueError, "dilation: expected an int or a pair of equal"),
    ],
)
def test_na2d_av_rejects_what_natten_rejects(call, error, match):
    attn, value = _natten_inputs(K=3)
    with pytest.raises(error, match=match):
        call(attn, value)
