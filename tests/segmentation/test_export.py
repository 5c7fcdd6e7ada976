"""sgdc-export: an sgdc-train checkpoint to ONNX (checked with ONNX Runtime at two sizes and
batches) and to an AOTInductor package where the compiled CPU operators exist, and each bad input
answered in one line naming the flag, before anything is exported. CPU-sized: resnet10t, dim 16."""

import os

import pytest
import torch

pytest.importorskip("sgdc_kernels.segmentation", exc_type=ImportError)  # needs the 'train' extra

from sgdc_kernels import available_backends  # noqa: E402
from sgdc_kernels.segmentation import export  # noqa: E402
from sgdc_kernels.segmentation import train as train_cli  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_cli.main([
            "--image-size", "64", "--batch-size", "4", "--backbone", "resnet10t", "--dim", "16", "--depth", "1",
            "--guide-ch", "8", "--workers", "0", "--device", "cpu", "--no-progress", "--data", "synthetic",
            "--num-train", "4", "--num-val", "2", "--epochs", "1", "--out", str(out),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out / "best.pt"


def _usage_error(argv, capsys, monkeypatch) -> str:
    """The one error line of a run whose exporters must not be reached."""

    def no_export(*args, **kwargs):
        raise AssertionError("exported before the mistake was reported")

    monkeypatch.setattr(export, "export_onnx", no_export)
    monkeypatch.setattr(export, "export_pt2", no_export)
    with pytest.raises(SystemExit) as exc:
        export.main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sgdc-export: error: "), err
    return err


def test_each_mistake_is_one_line_naming_the_flag(checkpoint, tmp_path, capsys, monkeypatch):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    torch.save(ckpt["model"], tmp_path / "state_dict.pt")  # another model's file
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--checkpoint", tmp_path / "missing.pt"], "--checkpoint", "no such file"),
        (["--checkpoint", tmp_path / "garbage.pt"], "--checkpoint", "not a readable checkpoint"),
        (["--checkpoint", tmp_path / "state_dict.pt"], "--checkpoint", "not a checkpoint written by sgdc-train"),
        (["--out", tmp_path / "missing" / "m.onnx"], "--out", "does not exist"),
        (["--out", tmp_path], "--out", "is a folder"),
        (["--out", tmp_path / "a_file" / "m.onnx"], "--out", "does not exist"),
        (["--image-size", "100"], "--image-size", "multiples of 32"),
        (["--image-size", "16"], "--image-size", ">= 32"),
        (["--batch-size", "1"], "--batch-size", ">= 2"),
        (["--format", "tflite"], "--format", "invalid choice"),
        (["--tolerance", "0"], "--tolerance", "> 0"),
        (["--device", "cuda", "--format", "onnx"], "--device", "cuda"),
    ]
    if "cpu" not in available_backends("cpu"):
        cases.append((["--format", "pt2"], "--backend", "compiled operators"))
    cases.append((["--format", "pt2", "--backend", "torch"], "--backend", "compiled operators"))
    base = {"--checkpoint": checkpoint, "--format": "onnx", "--out": tmp_path / "m.onnx"}
    for argv, flag, why in cases:
        given = dict(base, **dict(zip(argv[::2], argv[1::2])))
        err = _usage_error([a for kv in given.items() for a in kv], capsys, monkeypatch)
        assert err.startswith((f"sgdc-export: error: {flag}", f"sgdc-export: error: argument {flag}")), (argv, err)
        assert why in err, (argv, err)
    assert not (tmp_path / "m.onnx").exists()


def _exports(checkpoint, tmp_path, capsys, fmt, *flags):
    out = tmp_path / f"sgdnet.{fmt}"
    assert export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), *flags]) == 0
    text = capsys.readouterr().out
    assert "input (2, 3, 64, 64)" in text and "matches PyTorch" in text, text
    return out, text


def test_onnx_runs_in_onnx_runtime_at_other_sizes(checkpoint, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out, text = _exports(checkpoint, tmp_path, capsys, "onnx")
    assert "input (3, 3, 96, 64)" in text  # the dynamic axes, checked by the command itself
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["seg", "edge"]
    seg, edge = session.run(None, {"images": torch.randn(1, 3, 128, 160).numpy()})
    assert seg.shape == edge.shape == (1, 1, 128, 160)


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs the compiled CPU operators (backend 'cpu')")
def test_pt2_keeps_the_compiled_operators(checkpoint, tmp_path, capsys):
    out, text = _exports(checkpoint, tmp_path, capsys, "pt2")
    assert "input (3, 3, 96, 64)" in text and "backend 'cpu'" in text, text
    compiled = torch._inductor.aoti_load_package(str(out))
    seg, edge = compiled(torch.randn(1, 3, 128, 160))
    assert seg.shape == edge.shape == (1, 1, 128, 160)
