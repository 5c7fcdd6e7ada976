"""ONNX export: after ``import sgdc_kernels``, ``torch.onnx.export(model, args, dynamo=True)`` of a
model that calls the package's operators gives a model of standard ONNX operators that ONNX
Runtime runs on the CPU, with the batch and image axes dynamic: one file, checked at two sizes."""

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from sgdc_kernels import SGDC, window_conv  # noqa: E402
from sgdc_kernels.compat import na2d_av  # noqa: E402
from sgdc_kernels.testing import EXPORT_CONFIGS  # noqa: E402

ATOL = RTOL = 1e-5


def _export(module, args, dynamic_shapes, path):
    program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(path))
    model = onnx.load(str(path))
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operator domains: {domains}"
    assert model.opset_import[0].version >= 18
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, *arrays):
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, dict(zip(names, (a.numpy() for a in arrays))))[0])


class WindowConv(torch.nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = config

    def forward(self, x, weights, gate):
        return window_conv(x, weights, gate, **self.config)


@pytest.mark.parametrize("config", EXPORT_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_window_conv_exports_with_dynamic_axes(config, tmp_path):
    K, G, d = config["kernel_size"], config["num_heads"], config.get("dilation", 1)
    least = K * d if config.get("border") == "clamp" else 1
    batch, h, w = torch.export.Dim("batch"), torch.export.Dim("h", min=least), torch.export.Dim("w", min=least)
    axes = {0: batch, 2: h, 3: w}

    def inputs(b, hh, ww):
        return torch.randn(b, 4, hh, ww), torch.randn(b, G * K * K, hh, ww), torch.randn(b, 4, hh, ww)

    module = WindowConv(**config)
    session = _export(module, inputs(2, 11, 13), (axes, axes, axes), tmp_path / "window_conv.onnx")
    for shape in ((2, 11, 13), (1, max(least, 7), 20)):
        args = inputs(*shape)
        torch.testing.assert_close(_run(session, *args), module(*args), atol=ATOL, rtol=RTOL)


def test_sgdc_block_exports_with_dynamic_axes(tmp_path):
    block = SGDC(dim=16, guide_ch=4, num_heads=2, kernel_size=5, ls_init=1.0).eval()
    batch, h, w = torch.export.Dim("batch"), torch.export.Dim("h", max=1024), torch.export.Dim("w", max=1024)
    dynamic = ({0: batch, 2: 2 * h, 3: 2 * w}, {0: batch, 2: h, 3: w})
    session = _export(block, (torch.randn(2, 16, 16, 16), torch.randn(2, 4, 8, 8)), dynamic, tmp_path / "sgdc.onnx")
    for b, hh, ww in ((2, 8, 8), (1, 13, 9)):
        x, guidance = torch.randn(b, 16, 2 * hh, 2 * ww), torch.randn(b, 4, hh, ww)
        with torch.no_grad():
            torch.testing.assert_close(_run(session, x, guidance), block(x, guidance), atol=ATOL, rtol=RTOL)


class NA2D(torch.nn.Module):
    def forward(self, attn, value):
        return na2d_av(attn, value, kernel_size=5, dilation=2)


def test_na2d_av_exports_with_dynamic_axes(tmp_path):
    batch, h, w = torch.export.Dim("batch"), torch.export.Dim("h", min=10), torch.export.Dim("w", min=10)
    dynamic = ({0: batch, 2: h, 3: w}, {0: batch, 2: h, 3: w})

    def inputs(b, hh, ww):
        return torch.randn(b, 2, hh, ww, 25).softmax(-1), torch.randn(b, 2, hh, ww, 8)

    session = _export(NA2D(), inputs(2, 12, 14), dynamic, tmp_path / "na2d_av.onnx")
    for shape in ((2, 12, 14), (1, 17, 10)):
        args = inputs(*shape)
        torch.testing.assert_close(_run(session, *args), NA2D()(*args), atol=ATOL, rtol=RTOL)


def test_sgdnet_exports_with_dynamic_axes(tmp_path):
    pytest.importorskip("timm")
    from sgdc_kernels.segmentation.models import SGDNet

    model = SGDNet(backbone="resnet10t", dim=32, depth=1, guide_ch=8).eval()

    class Masks(torch.nn.Module):  # the exported graph returns tensors, not the output record
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, images):
            out = self.net(images)
            return out.seg, out.edge

    batch, h, w = torch.export.Dim("batch"), torch.export.Dim("h", max=64), torch.export.Dim("w", max=64)
    module = Masks(model)
    session = _export(module, (torch.randn(2, 3, 64, 64),), ({0: batch, 2: 32 * h, 3: 32 * w},), tmp_path / "net.onnx")
    for b, hh, ww in ((1, 64, 64), (2, 96, 64)):
        images = torch.randn(b, 3, hh, ww)
        with torch.no_grad():
            torch.testing.assert_close(_run(session, images), module(images)[0], atol=1e-4, rtol=1e-4)
