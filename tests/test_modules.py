"""SGDC, SGE and LayerNorm2d: checkpoint compatibility with the released modules and equivalence.

`ReleasedSGDC` and `ReleasedSGE` below transcribe the authors' released modules literally, the way
their code is written (F.unfold, dense Sobel convolutions, plain sqrt), with only the crash of its
einops pattern (`(hgt*wdt)` for `(hgt wdt)`) fixed. Their state dicts must load strictly into the
package's modules and give the same outputs.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdc_kernels import SGDC, SGE, LayerNorm2d, modules, sgdc_conv
from sgdc_kernels.modules import SOBEL_X, SOBEL_Y
from sgdc_kernels.testing import check_tensors


class ReleasedLayerNorm2d(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ReleasedSGDC(nn.Module):
    def __init__(self, dim, guide_ch=16, num_heads=4, kernel_size=7, mlp_ratio=4.0, ls_init=1e-6):
        super().__init__()
        self.dim, self.heads, self.k = dim, num_heads, kernel_size
        self.proj_guidance = nn.Conv2d(guide_ch, dim, 1)
        self.attn = nn.Conv2d(dim, 2 * dim + num_heads * kernel_size**2, 1)
        self.norm1 = ReleasedLayerNorm2d(dim)
        self.norm2 = ReleasedLayerNorm2d(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.ls1 = nn.Parameter(ls_init * torch.ones(dim))
        self.ls2 = nn.Parameter(ls_init * torch.ones(dim))

    def forward(self, x, g):
        B, C, H, W = x.shape
        g = self.proj_guidance(F.interpolate(g, size=(H, W), mode="bilinear", align_corners=False))
        a1, a2, k = torch.split(self.attn(x + g), [self.dim, self.dim, self.heads * self.k**2], dim=1)
        x1 = self.dwconv(x * torch.sigmoid(a1))
        # rearrange(..., "b (g c kk) (hgt wdt) -> ...") with the fixed pattern
        cols = F.unfold(self.norm1(x), self.k, padding=self.k // 2)
        cols = cols.view(B, self.heads, C // self.heads, self.k**2, H * W)
        w = k.reshape(B, self.heads, self.k**2, H * W).softmax(dim=2)
        x2 = (cols * w.unsqueeze(2)).sum(3).view(B, C, H, W) * torch.sigmoid(a2)
        x = x + self.ls1.unsqueeze(-1).unsqueeze(-1) * (x1 + x2)
        return x + self.ls2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x))


def _conv_bn_relu(cin, cout, k=1):
    m = nn.Module()
    m.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    m.bn = nn.BatchNorm2d(cout)
    m.forward = lambda x: F.relu(m.bn(m.conv(x)))
    return m


class ReleasedRefiner(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.refine = nn.Sequential(
            nn.Conv2d(c, c // r, 1, bias=False), nn.BatchNorm2d(c // r), nn.ReLU(),
            nn.Conv2d(c // r, c // r, 3, padding=1, bias=False), nn.BatchNorm2d(c // r), nn.ReLU(),
            nn.Conv2d(c // r, c, 1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x):
        return F.relu(x + self.refine(x))


class ReleasedSGE(nn.Module):
    def __init__(self, s4_in=2048, s1_in=256, mid=256, guide_ch=16, bottleneck=256, reduction_ratio=4):
        super().__init__()
        self.s4_proj = _conv_bn_relu(s4_in, bottleneck)
        self.s1_proj = _conv_bn_relu(s1_in, bottleneck)
        self.sobel_x = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)
        self.sobel_y = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)
        self.sobel_x.weight = nn.Parameter(
            torch.tensor(SOBEL_X).expand(bottleneck, bottleneck, 3, 3).clone(), requires_grad=False
        )
        self.sobel_y.weight = nn.Parameter(
            torch.tensor(SOBEL_Y).expand(bottleneck, bottleneck, 3, 3).clone(), requires_grad=False
        )
        self.refine4 = ReleasedRefiner(bottleneck, reduction_ratio)
        self.refine1 = ReleasedRefiner(bottleneck, reduction_ratio)
        self.fuse = _conv_bn_relu(2 * bottleneck, mid, 3)
        self.out_edge_map = nn.Conv2d(mid, 1, 1, bias=False)
        self.out_guidance = nn.Conv2d(mid, guide_ch, 1, bias=False)

    def apply_sobel(self, s, refiner):
        mag = torch.sqrt(self.sobel_x(s) ** 2 + self.sobel_y(s) ** 2)
        return refiner(torch.sigmoid(mag) * s)

    def forward(self, x4, x1):
        s4 = self.apply_sobel(self.s4_proj(x4), self.refine4)
        s1 = self.apply_sobel(self.s1_proj(x1), self.refine1)
        s4 = F.interpolate(s4, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        f = self.fuse(torch.cat([s4, s1], 1))
        return self.out_edge_map(f), self.out_guidance(f)


def _randomize(module):
    """Non-trivial weights everywhere (BN statistics included), so the comparison means something."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 0.2) + (1.0 if name.endswith("ls1") else 0))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module


@pytest.mark.parametrize("backend", ["torch", "unfold"])
def test_sgdc_loads_released_checkpoint_and_matches(backend):
    dim, guide_ch, G, K = 16, 8, 4, 5
    released = _randomize(ReleasedSGDC(dim, guide_ch, G, K, mlp_ratio=2.0))
    ours = SGDC(dim, guide_ch, G, K, mlp_ratio=2.0, backend=backend)
    state = released.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, dim, 9, 10)
    g = torch.randn(2, guide_ch, 5, 5)
    torch.testing.assert_close(ours(x, g), released(x, g), atol=1e-5, rtol=1e-5)


def test_sgde_loads_released_checkpoint_and_matches():
    kw = dict(s4_in=24, s1_in=12, mid=16, guide_ch=8, bottleneck=16, reduction_ratio=4)
    released = _randomize(ReleasedSGE(**kw)).eval()
    ours = SGE(**kw).eval()
    state = released.state_dict()
    assert set(state) == set(ours.state_dict())
    assert "sobel_x.weight" in state and state["sobel_x.weight"].shape == (16, 16, 3, 3)
    ours.load_state_dict(state, strict=True)
    x4, x1 = torch.randn(2, 24, 3, 4), torch.randn(2, 12, 12, 16)
    for a, b in zip(ours(x4, x1), released(x4, x1)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sge_rejects_non_uniform_sobel_weights():
    sge = SGE(s4_in=8, s1_in=8, mid=8, guide_ch=4, bottleneck=8)
    state = sge.state_dict()
    state["sobel_x.weight"] = state["sobel_x.weight"].clone()
    state["sobel_x.weight"][1, 2, 0, 0] = 5.0
    with pytest.raises(ValueError, match="sobel_x.weight"):
        sge.load_state_dict(state)


@pytest.mark.parametrize("value", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sge_gradients_finite_on_constant_input(value, mode):
    sge = SGE(s4_in=8, s1_in=8, mid=8, guide_ch=4, bottleneck=8).train(mode == "train")
    x4 = torch.full((2, 8, 4, 4), value, requires_grad=True)
    x1 = torch.full((2, 8, 16, 16), value, requires_grad=True)
    edge, guide = sge(x4, x1)
    (edge.sum() + guide.sum()).backward()
    grads = [x4.grad, x1.grad] + [p.grad for p in sge.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_released_sge_gradient_is_nan_on_flat_input():
    # The flaw of the release that SGE fixes: sqrt's gradient at an exactly zero response.
    # Zero input and BN bias 1 make every projected channel exactly 1: a flat, positive response.
    kw = dict(s4_in=8, s1_in=8, mid=8, guide_ch=4, bottleneck=8)
    released, ours = ReleasedSGE(**kw).eval(), SGE(**kw).eval()
    for m in (released.s1_proj.bn, released.s4_proj.bn):
        torch.nn.init.ones_(m.bias)
    ours.load_state_dict(released.state_dict())
    for m in (released, ours):
        sum(t.sum() for t in m(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 16, 16))).backward()
    assert torch.isnan(released.s1_proj.bn.bias.grad).any()
    assert torch.isfinite(ours.s1_proj.bn.bias.grad).all()


def test_sge_sobel_identity_matches_dense_convolution():
    sge = SGE(s4_in=8, s1_in=8, mid=8, guide_ch=4, bottleneck=8)
    s = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    gx = F.conv2d(s, sge.sobel_x.weight.double(), padding=1)
    gy = F.conv2d(s, sge.sobel_y.weight.double(), padding=1)
    dense = torch.sigmoid(torch.sqrt(gx**2 + gy**2))
    sge = sge.double()
    torch.testing.assert_close(sge.sobel_gate(s).expand_as(dense), dense)


def test_sgdc_backends_agree_forward_and_backward():
    torch.manual_seed(1)
    a = _randomize(SGDC(16, 8, 4, 7, backend="unfold"))
    b = SGDC(16, 8, 4, 7, backend="torch")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 11, 9)
    g = torch.randn(2, 8, 6, 5)
    outs, grads = [], []
    for m in (a, b):
        xi = x.clone().requires_grad_()
        out = m(xi, g)
        out.square().mean().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
        m.zero_grad()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-4)


def test_layernorm2d_matches_channel_statistics():
    ln = _randomize(LayerNorm2d(6))
    ref = ReleasedLayerNorm2d(6)
    ref.load_state_dict(ln.state_dict())
    x = torch.randn(2, 6, 4, 5)
    torch.testing.assert_close(ln(x), ref(x), atol=1e-5, rtol=1e-5)


def test_sgdc_drop_path_and_channels_last():
    # ls_init=1: the op's contribution is of the order of the output (at the default 1e-6 it would
    # sit below the tolerance, and a wrong op in channels_last would pass)
    m = SGDC(8, 4, 2, 3, drop_path=0.5, ls_init=1.0, backend="torch")
    x, g = torch.randn(4, 8, 6, 6), torch.randn(4, 4, 3, 3)
    m.eval()
    torch.testing.assert_close(m(x, g), m(x, g))  # no randomness in eval
    out_cl = m(x.contiguous(memory_format=torch.channels_last), g)
    torch.testing.assert_close(out_cl, m(x, g), atol=1e-5, rtol=1e-5)
    m.train()
    torch.manual_seed(3)
    out = m(x, g)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sgdc_rejects_bad_config():
    with pytest.raises(ValueError, match="dim"):
        SGDC(10, num_heads=4)
    with pytest.raises(ValueError, match="kernel_size"):
        SGDC(8, num_heads=4, kernel_size=4)


def test_sgdc_under_autocast(monkeypatch):
    # Inside autocast, LayerNorm gives float32 and the 1x1 convolutions bfloat16: sgdc_conv must
    # run in the autocast dtype rather than reject the mix, and be as accurate there as bfloat16
    # allows: the op's own call, forward and gradients, against the float64 oracle on the very
    # bfloat16 inputs it ran on, with bfloat16's tolerances.
    calls = []

    def recording(*args, **kwargs):
        out = sgdc_conv(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(modules, "sgdc_conv", recording)
    m = SGDC(8, 4, 2, 3, ls_init=1.0, backend="torch")
    x, g = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, g)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.float(), m(x, g), atol=0.1, rtol=0.05)

    (inputs, kwargs, op_out), _ = calls  # under autocast, then in float32
    assert op_out.dtype == torch.bfloat16 and kwargs == dict(kernel_size=3, num_heads=2, backend="torch")
    inputs = [t.detach().to(torch.bfloat16) for t in inputs]
    assert torch.equal(op_out, sgdc_conv(*inputs, **kwargs))
    check_tensors("torch", inputs, 3, 2)
