"""NATTEN's QK half: sgdc_kernels.compat.na2d_qk (and natten2dqkrpb, natten2dav) against a float64
reference written from NATTEN's definition (its window start and relative-bias start rules, a plain
gather, nothing of this package), in every backend and dtype, forward and the gradients of query,
key and rpb; gradcheck, opcheck, torch.compile; and transformers' DiNAT on these operators against
a dense neighborhood attention written here."""

import importlib.util
import math
import sys

import pytest
import torch

from sgdc_kernels import available_backends, get_backend, registry
from sgdc_kernels.compat import na2d_av, na2d_qk, natten2dav, natten2dqkrpb
from sgdc_kernels.testing import assert_close, forward_backward, tolerances
from sgdc_kernels.testing import natten_window_start as natten_start

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# The reference: NATTEN's rules, one pixel at a time
# ---------------------------------------------------------------------------------------------


def natten_pb_start(i: int, n: int, K: int, d: int) -> int:
    """NATTEN's get_pb_start: the row (column) of the bias table that tap 0 of pixel i reads."""
    r = K // 2
    if d == 1:
        return r + (i < r) * (r - i) + (i + r >= n) * (n - i - 1 - r)
    if i - r * d < 0:
        return K - 1 - i // d
    if i + r * d >= n:
        return (n - i - 1) // d
    return r


def taps(n: int, K: int, d: int, rule) -> torch.Tensor:
    """(n, K): what tap u of pixel i reads: the image row (rule=natten_start, step d) or the
    bias row (rule=natten_pb_start, step 1)."""
    step = d if rule is natten_start else 1
    return torch.tensor([[rule(i, n, K, d) + u * step for u in range(K)] for i in range(n)])


def reference_qk(query, key, rpb, K, d):
    """attn[b, h, i, j, u*K+v] = <query[b, h, i, j], key[b, h, row(i, u), col(j, v)]>
    + rpb[h, pb_row(i, u), pb_col(j, v)], in float64; differentiable by autograd."""
    B, heads, H, W, D = query.shape
    rows, cols = taps(H, K, d, natten_start), taps(W, K, d, natten_start)
    keys = key.double()[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # (B, heads, H, W, K, K, D)
    attn = torch.einsum("bhijd,bhijuvd->bhijuv", query.double(), keys)
    if rpb is not None:
        pr, pc = taps(H, K, d, natten_pb_start), taps(W, K, d, natten_pb_start)
        attn = attn + rpb.double()[:, pr[:, None, :, None], pc[None, :, None, :]]
    return attn.reshape(B, heads, H, W, K * K)


def test_the_bias_rule_is_the_offset_of_the_key():
    """NATTEN's get_pb_start(i) + u is K-1 + (key row - i) / d, for every n from K*d up."""
    for K in (3, 5, 7):
        for d in (1, 2, 3, 4):
            for n in range(K * d, K * d + 2 * d + 2):
                rows, bias = taps(n, K, d, natten_start), taps(n, K, d, natten_pb_start)
                offset = rows - torch.arange(n)[:, None]
                assert (offset % d == 0).all()
                assert torch.equal(bias, K - 1 + offset // d), (K, d, n)


# ---------------------------------------------------------------------------------------------
# Every backend and dtype against the reference
# ---------------------------------------------------------------------------------------------


def _backends(device):
    return available_backends(device)


def _cases():
    for device in DEVICES:
        for backend in _backends(device):
            for dtype in sorted(get_backend(backend).dtypes, key=str):
                yield pytest.param(device, backend, dtype, id=f"{device}-{backend}-{str(dtype)[6:]}")


def _inputs(B, heads, H, W, D, K, dtype, device, with_rpb=True):
    query = torch.randn(B, heads, H, W, D, device=device).to(dtype)
    key = torch.randn(B, heads, H, W, D, device=device).to(dtype)
    rpb = torch.randn(heads, 2 * K - 1, 2 * K - 1, device=device).to(dtype) if with_rpb else None
    return query, key, rpb


def check_qk(backend, B, heads, H, W, D, K, d, dtype, device, with_rpb=True):
    """na2d_qk on ``backend`` against the float64 reference: the scores and the gradients of
    query, key and rpb, computed from the same (rounded) inputs."""
    tensors = _inputs(B, heads, H, W, D, K, dtype, device, with_rpb)
    grad = torch.randn(B, heads, H, W, K * K, device=device).to(dtype)
    present = [t for t in tensors if t is not None]

    def run(fn, grad):
        def call(*leaves):
            query, key, *rest = leaves
            return fn(query, key, rest[0] if rest else None)

        return forward_backward(call, present, grad)

    out, grads = run(lambda q, k, r: na2d_qk(q, k, K, d, rpb=r, backend=backend), grad)
    ref, ref_grads = run(lambda q, k, r: reference_qk(q, k, r, K, d), grad.double())
    assert out.dtype == dtype and out.shape == (B, heads, H, W, K * K)
    tol = tolerances(backend, dtype)
    what = f"{backend} {dtype} K={K} d={d} {H}x{W}"
    for name, got, want in zip(("attn", "d_query", "d_key", "d_rpb"), (out, *grads), (ref, *ref_grads)):
        assert got.dtype == dtype, name
        # sums of up to (K + K//2)**2 terms (d_key near clamped borders), and of the whole batch and
        # image (d_rpb): absolute errors relative to the size of the values
        atol = tol["atol"] * max(1.0, want.abs().max().item())
        assert_close(got, want, dtype, f"{what}: {name}", dict(tol, atol=atol))


# K from 3 to 13 and dilation from 1 to 4; H and W at the smallest size (K * dilation) and above
GRID = [(K, d) for K in (3, 5, 7, 9, 11, 13) for d in (1, 2, 3, 4)]


@pytest.mark.parametrize("device,backend,dtype", [c for c in _cases() if c.values[1] != "triton"])
@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "norpb"])
def test_matches_the_reference(device, backend, dtype, with_rpb):
    for n, (K, d) in enumerate(GRID):
        if (dtype != torch.float32 or not with_rpb) and n % 3:
            continue  # every K and dilation in float32 with rpb; a third of them otherwise
        extra = (0, 1 + n % 4) if n % 2 else (2 + n % 3, 0)
        check_qk(backend, 2, 2, K * d + extra[0], K * d + extra[1], 3, K, d, dtype, device, with_rpb)


requires_interpreter = pytest.mark.skipif(
    "triton" not in available_backends("cpu"), reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)"
)


@requires_interpreter
@pytest.mark.parametrize(
    "variant,K,d", [("v1", 3, 1), ("v1", 7, 1), ("v1", 5, 2), ("v2dot", 3, 4), ("v2dot", 5, 2)]
)  # v2dot16 runs v1's kernels in float32
def test_triton_interpreter_matches_the_reference(variant, K, d):
    check_qk(f"triton@{variant}", 1, 2, K * d + 1, K * d + 2, 4, K, d, torch.float32, "cpu")


@pytest.mark.parametrize("backend", ["unfold", "torch"])
def test_gradcheck_float64(backend):
    q, k, r = (t.requires_grad_() for t in _inputs(1, 2, 7, 6, 2, 3, torch.float64, "cpu"))
    fn = lambda q, k, r: na2d_qk(q, k, 3, 2, rpb=r, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, r), fast_mode=True)


def _operator_backends():
    for device in DEVICES:
        for name in available_backends(device):
            if get_backend(name).backward is not None:
                yield pytest.param(device, name, id=f"{device}-{name}")


@pytest.mark.parametrize("device,name", list(_operator_backends()))
def test_opcheck_the_dots_operator(device, name):
    backend = get_backend(name)
    op = registry.dots_op(name)
    variant = backend.variant_for(2, True, False)
    # the interpreter runs Triton's kernels in eager mode only: no compiled (AOT) check there
    interpreted = name == "triton" and device == "cpu"
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if interpreted else None
    for d, clamp in ((2, True), (1, False)):
        x = torch.randn(2, 3, 7, 8, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn(2, 3, 7, 8, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
        for args in ((g, x), (g.detach().contiguous(), x.detach().contiguous())):
            if utils:
                torch.library.opcheck(op, (*args, 3, d, clamp, variant), test_utils=utils)
            else:
                torch.library.opcheck(op, (*args, 3, d, clamp, variant))


def test_every_backend_with_operators_has_its_dots_operator():
    for name in available_backends():
        if get_backend(name).backward is not None:
            assert registry.dots_op(name)._qualname == f"sgdc::{name}_dots"


class NeighborhoodAttention(torch.nn.Module):
    """NATTEN 0.17's unfused NeighborhoodAttention2D core: qk + rpb, softmax, av."""

    def __init__(self, heads=2, K=3, d=2, backend="auto"):
        super().__init__()
        self.rpb = torch.nn.Parameter(torch.randn(heads, 2 * K - 1, 2 * K - 1))
        self.K, self.d, self.backend = K, d, backend

    def forward(self, q, k, v):
        attn = na2d_qk(q, k, self.K, self.d, rpb=self.rpb, backend=self.backend).softmax(-1)
        return na2d_av(attn, v, self.K, self.d, backend=self.backend)


@pytest.mark.parametrize("backend", ["auto", "unfold"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    module = NeighborhoodAttention(backend=backend)
    q, k, v = (torch.randn(2, 2, 7, 8, 4, requires_grad=True) for _ in range(3))
    out = torch.compile(module, fullgraph=True)(q, k, v)
    expected = module(q, k, v)
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out.square().sum(), (q, k, v, module.rpb))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v, module.rpb))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_the_rpb_gradient_is_deterministic():
    q, k, r = (t.requires_grad_() for t in _inputs(2, 2, 9, 10, 4, 3, torch.float32, "cpu"))
    grads = [torch.autograd.grad(na2d_qk(q, k, 3, 3, rpb=r).sum(), r)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_autocast_runs_in_the_autocast_dtype():
    q, k, r = _inputs(1, 2, 6, 6, 4, 3, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn = na2d_qk(q, k, 3, rpb=r)
    assert attn.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# NATTEN's argument forms and what it rejects
# ---------------------------------------------------------------------------------------------


def test_natten_argument_forms_and_old_names():
    q, k, r = _inputs(2, 3, 9, 11, 5, 3, torch.float32, "cpu")
    want = na2d_qk(q, k, 3, 2, rpb=r)
    torch.testing.assert_close(na2d_qk(q, k, (3, 3), (2, 2), None, False, r), want)
    torch.testing.assert_close(natten2dqkrpb(q, k, r, 3, 2), want)
    torch.testing.assert_close(natten2dqkrpb(q, k, None, 3, 2), na2d_qk(q, k, 3, 2))
    attn = want.softmax(-1)
    torch.testing.assert_close(natten2dav(attn, k, 3, 2), na2d_av(attn, k, 3, 2))
    torch.testing.assert_close(na2d_av(attn, k, 3, 2, None, False), na2d_av(attn, k, 3, 2))


def _q(shape=(2, 3, 9, 11, 5)):
    return torch.randn(shape)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda q, k, r: na2d_qk(q, k, 4), ValueError, "kernel_size: expected an odd int greater than 1"),
        (lambda q, k, r: na2d_qk(q, k, (3, 5)), ValueError, "kernel_size: expected an int or a pair of equal ints"),
        (lambda q, k, r: na2d_qk(q, k, 3, (1, 2)), ValueError, "dilation: expected an int or a pair of equal ints"),
        (lambda q, k, r: na2d_qk(q, k, 3, is_causal=True), ValueError, "is_causal: causal neighborhoods"),
        (lambda q, k, r: na2d_qk(q, k, 3, is_causal=(False, True)), ValueError, "is_causal: causal"),
        (lambda q, k, r: na2d_qk(q, k, 3, additional_keys=k[:, :, 0]), ValueError, "additional_keys: extra tokens"),
        (lambda q, k, r: na2d_av(q, k, 3, additional_values=k), ValueError, "additional_values: extra tokens"),
        (lambda q, k, r: na2d_qk(q, k, 3, dilation=4), ValueError, r"key: input axes must be at least kernel_size \*"),
        (lambda q, k, r: na2d_qk(q[..., :4], k, 3), ValueError, r"query: expected shape \(B, heads, H, W, D\)"),
        (lambda q, k, r: na2d_qk(q[0], k, 3), ValueError, "query: expected a 5-D"),
        (lambda q, k, r: na2d_qk(q, k.double(), 3), TypeError, "query: expected key's dtype"),
        (lambda q, k, r: na2d_qk(q, k.long(), 3), TypeError, "key: expected a floating-point tensor"),
        (lambda q, k, r: na2d_qk(q, k, 3, rpb=r[:2]), ValueError, r"rpb: expected shape \(heads, 2\*kernel_size-1"),
        (lambda q, k, r: na2d_qk(q, k, 5, rpb=r), ValueError, r"rpb: expected shape .* = \(3, 9, 9\)"),
        (lambda q, k, r: na2d_qk(q, k, 3, rpb=r[0]), ValueError, "rpb: expected a 3-D"),
        (lambda q, k, r: na2d_qk(q, k, 3, rpb=r.double()), TypeError, "rpb: expected key's dtype"),
        (lambda q, k, r: na2d_qk(q, k, 3, backend="nope"), ValueError, "backend: unknown backend 'nope'"),
        (lambda q, k, r: natten2dqkrpb(q, k, r, 3, 0), ValueError, "dilation: expected a positive int"),
    ],
)
def test_rejects_what_natten_rejects_and_what_is_not_supported(call, error, match):
    q, k, r = _inputs(2, 3, 9, 11, 5, 3, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        call(q, k, r)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers' DiNAT
# ---------------------------------------------------------------------------------------------

try:
    import transformers
except ImportError:
    transformers = None


def _dinat_skip_reason():
    if transformers is None:
        return "transformers is not installed (the test extra installs 4.53.3)"
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) > (4, 53):
        return f"transformers {transformers.__version__}: its DiNAT is broken (4.53 is the last release that runs it)"
    return None


requires_good_dinat = pytest.mark.skipif(_dinat_skip_reason() is not None, reason=str(_dinat_skip_reason()))
requires_transformers = pytest.mark.skipif(transformers is None, reason=str(_dinat_skip_reason()))


def dense_neighborhood_attention(self, hidden_states, output_attentions=False):
    """transformers' NeighborhoodAttention.forward written densely in plain PyTorch: every query
    against every key, the keys outside the query's NATTEN window masked out, NATTEN's relative
    positional bias added, softmax, weighted sum of the values."""
    B, H, W, C = hidden_states.shape
    heads, D, K, d = self.num_attention_heads, self.attention_head_size, self.kernel_size, self.dilation

    def split(t):  # (B, H, W, C) -> (B, heads, H*W, D)
        return t.view(B, H * W, heads, D).transpose(1, 2)

    q = split(self.query(hidden_states)) / math.sqrt(D)
    k, v = split(self.key(hidden_states)), split(self.value(hidden_states))
    scores = q @ k.transpose(-1, -2)  # (B, heads, H*W, H*W)
    bias = torch.full((heads, H, W, H, W), float("-inf"))
    rows, cols = taps(H, K, d, natten_start), taps(W, K, d, natten_start)
    brows, bcols = taps(H, K, d, natten_pb_start), taps(W, K, d, natten_pb_start)
    for i in range(H):
        for j in range(W):
            for u in range(K):
                for w in range(K):
                    bias[:, i, j, rows[i, u], cols[j, w]] = self.rpb[:, brows[i, u], bcols[j, w]]
    probs = (scores + bias.view(heads, H * W, H * W)).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, H, W, C)
    return (out,)


def _tiny_dinat(cls, **extra):
    from transformers import DinatConfig

    torch.manual_seed(0)
    config = DinatConfig(
        image_size=32, embed_dim=16, depths=[2, 1], num_heads=[2, 4], kernel_size=3, dilations=[[1, 2], [1]],
        drop_path_rate=0.0, num_labels=3, **extra,
    )  # fmt: skip
    model = cls(config).eval()
    with torch.no_grad():  # the biases start at zero: give them values, so that a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith(".rpb"):
                p.normal_()
    return model


@requires_good_dinat
def test_dinat_runs_on_these_operators_and_matches_dense_attention(monkeypatch):
    from sgdc_kernels.compat import use_with_transformers_dinat

    use_with_transformers_dinat()
    use_with_transformers_dinat()  # a second call changes nothing
    from transformers import DinatForImageClassification
    from transformers.models.dinat import modeling_dinat

    assert importlib.util.find_spec("natten") is None and "natten" not in sys.modules
    model = _tiny_dinat(DinatForImageClassification)
    pixels = torch.randn(2, 3, 32, 32)

    def run():
        model.zero_grad()
        logits = model(pixel_values=pixels).logits
        (logits * torch.arange(1.0, 4.0)).sum().backward()
        rpbs = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(".rpb")}
        return logits.detach(), rpbs

    logits, rpbs = run()
    with monkeypatch.context() as m:
        m.setattr(modeling_dinat.NeighborhoodAttention, "forward", dense_neighborhood_attention)
        want_logits, want_rpbs = run()
    assert len(rpbs) == 3  # two layers in stage 1 (dilations 1 and 2), one in stage 2
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-4)
    for name in rpbs:
        assert rpbs[name].abs().sum() > 0, name
        torch.testing.assert_close(rpbs[name], want_rpbs[name], atol=1e-5, rtol=1e-4, msg=name)


@requires_good_dinat
def test_dinat_model_and_backbone_build_and_run():
    from sgdc_kernels.compat import use_with_transformers_dinat

    use_with_transformers_dinat()
    from transformers import DinatBackbone, DinatModel

    out = _tiny_dinat(DinatModel)(pixel_values=torch.randn(1, 3, 32, 32))
    assert out.last_hidden_state.shape == (1, 4, 4, 32)
    maps = _tiny_dinat(DinatBackbone, out_features=["stage1", "stage2"])(pixel_values=torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape) for f in maps.feature_maps] == [(1, 16, 8, 8), (1, 32, 4, 4)]


@requires_transformers
@pytest.mark.parametrize("version", ["4.54.0", "4.57.1", "5.0.0"])
def test_a_transformers_with_a_broken_dinat_is_refused(monkeypatch, version):
    from sgdc_kernels.compat import use_with_transformers_dinat

    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"transformers {version}: its DiNAT attention is broken.*4\.53"):
        use_with_transformers_dinat()
