"""The training CLI: a small synthetic CPU run, exact resume, and DDP with gloo."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("sgdc_kernels.segmentation", exc_type=ImportError)  # needs the 'train' extra

TINY = [
    "--data", "synthetic", "--image-size", "64", "--num-train", "16", "--num-val", "8",
    "--batch-size", "4", "--backbone", "resnet10t", "--dim", "32", "--depth", "1", "--guide-ch", "8",
    "--workers", "0", "--device", "cpu",
]  # fmt: skip


def _run(args, *, launcher=(), timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, *launcher, "-m", "sgdc_kernels.segmentation.train", *TINY, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _records(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    out = tmp_path_factory.mktemp("run3")
    proc = _run(["--epochs", "3", "--save-every", "1", "--out", str(out), "--lr", "2e-3"])
    return out, proc


def test_cli_trains_loss_falls_and_writes_metrics(run3):
    out, proc = run3
    metrics = _records(out)
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for e in epochs:
        for key in ("iou", "dice", "hd95", "train_loss", "val_loss"):
            assert math.isfinite(e[key]), (key, e)
        assert 0 <= e["iou"] <= e["dice"] <= 1 and e["hd95"] >= 0
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert metrics["config"]["world_size"] == 1
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    assert "epoch 3:" in proc.stdout and "Dice" in proc.stdout


def test_resume_continues_exactly(run3, tmp_path):
    """Restarting from the epoch-1 checkpoint replays epochs 2 and 3 bit for bit (model,
    optimizer, scheduler and RNG states all restored), and keeps the epoch-1 history."""
    out, _ = run3
    proc = _run(["--epochs", "3", "--out", str(tmp_path), "--lr", "2e-3", "--resume", str(out / "epoch_001.pt")])
    assert "resumed from" in proc.stdout and "epoch 1:" not in proc.stdout
    expected, got = _records(out)["epochs"], _records(tmp_path)["epochs"]
    assert [e["epoch"] for e in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        for key in ("train_loss", "val_loss", "iou", "dice", "hd95", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (key, a, b)
    # --resume auto on a finished run trains nothing more.
    again = _run(["--epochs", "3", "--out", str(tmp_path), "--lr", "2e-3", "--resume", "auto"])
    assert "epoch 3:" not in again.stdout and len(_records(tmp_path)["epochs"]) == 3


def test_resume_refuses_another_model(run3, tmp_path):
    out, _ = run3
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sgdc_kernels.segmentation.train", *TINY, "--dim", "48", "--epochs", "2",
           "--out", str(tmp_path), "--resume", str(out / "last.pt")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "trained with" in proc.stderr


def test_ddp_two_processes_gloo(tmp_path):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run(["--epochs", "2", "--out", str(tmp_path), "--no-progress"], launcher=launcher)
    metrics = _records(tmp_path)
    assert metrics["config"]["world_size"] == 2
    assert metrics["config"]["steps_per_epoch"] == 2  # 16 images / (2 ranks x batch 4)
    epochs = metrics["epochs"]
    assert len(epochs) == 2 and all(math.isfinite(e[k]) for e in epochs for k in ("iou", "dice", "hd95"))
    assert (tmp_path / "last.pt").exists()


def test_train_step_benchmark_runs_on_cpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(device="cpu", backends=["torch"], image_size=64, batch_size=1, backbone="resnet10t",
                     dim=32, depth=1, warmup=0, iters=1)  # fmt: skip
    assert [r["backend"] for r in rows] == ["unfold", "torch"]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows)
    assert rows[1]["speedup_vs_unfold"] > 0
    assert all(r["peak_mem_gb"] >= 0 for r in rows)  # peak RSS growth over one step on the CPU (may be 0)
    assert "unfold" in bench.format_table(rows)


# ------------------------------------------------------------------------------------ CLI usage

from sgdc_kernels import available_backends  # noqa: E402
from sgdc_kernels.segmentation import loop  # noqa: E402
from sgdc_kernels.segmentation import train as train_cli  # noqa: E402


def test_every_flag_has_help_and_a_shown_default():
    parser = train_cli.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 35
    for action in flags:
        assert action.help, action.option_strings
    text = parser.format_help()
    assert text.count("(default:") == len(flags)


def _usage_error(argv, capsys, monkeypatch, before_model=True) -> str:
    """Run the CLI in this process, with a model builder that must not be reached unless
    ``before_model`` is False; return the error line."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the mistake was reported")

    if before_model:
        monkeypatch.setattr(loop, "build_model", no_model)
    with pytest.raises(SystemExit) as exc:
        train_cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sgdc-train: error: "), err
    return err


def _mistakes(tmp_path):
    import torch

    from sgdc_kernels import available_backends

    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--data", str(tmp_path / "missing")], "--data"),
        (["--data", str(tmp_path / "empty")], "--data"),  # a folder without image/mask pairs
        (["--backend", "nope"], "--backend"),
        (["--num-heads", "3"], "--num-heads"),  # dim 32
        (["--kernel-size", "4"], "--kernel-size"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--edge-pos-weight", "many"], "--edge-pos-weight"),
        (["--backbone", "no_such_net"], "--backbone"),
        (["--pretrained", str(tmp_path / "missing.pth")], "--pretrained"),
        (["--resume", str(tmp_path / "missing.pt")], "--resume"),
        (["--resume", str(tmp_path / "a_file")], "--resume"),  # not a checkpoint
        (["--out", str(tmp_path / "a_file")], "--out"),
    ]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "--device")]
    if "cuda" not in available_backends("cpu"):
        cases += [(["--backend", "cuda"], "--backend")]
    return cases


def test_mistakes_give_one_line_naming_the_flag_before_the_model(tmp_path, capsys, monkeypatch):
    for argv, flag in _mistakes(tmp_path):
        err = _usage_error([*TINY, "--out", str(tmp_path / "run"), *argv], capsys, monkeypatch)
        assert flag in err, (argv, err)


def test_backbone_without_the_strides_is_named(tmp_path, capsys, monkeypatch):
    # Only building the backbone tells its feature strides; still one line naming the flag.
    argv = [*TINY, "--out", str(tmp_path), "--backbone", "vit_tiny_patch16_224"]
    err = _usage_error(argv, capsys, monkeypatch, before_model=False)
    assert "--backbone vit_tiny_patch16_224" in err and "strides" in err


def test_console_script_reports_a_mistake_without_traceback(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "sgdc-train")
    assert os.path.exists(script), "the sgdc-train console script is installed with the package"
    proc = subprocess.run([script, "--data", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"sgdc-train: error: --data {tmp_path / 'missing'}: no such folder (expected 'synthetic' or a folder of "
        "images and masks) (see --help)"
    ]


def test_run_records_the_backend_it_used(run3):
    out, proc = run3
    config = _records(out)["config"]
    # auto on a CPU: the fused CPU kernels where the extension has them, else the torch backend
    on_cpu = "cpu" if "cpu" in available_backends("cpu") else "torch"
    assert config["backend_requested"] == "auto" and config["backend"] == on_cpu
    assert f"backend={on_cpu}" in proc.stdout


def test_best_pt_holds_weights_only_and_says_so(run3, tmp_path, capsys, monkeypatch):
    out, _ = run3
    best = torch_load(out / "best.pt")
    assert set(best) == {"model", "model_config", "args", "version", "epoch", "metrics"}  # no optimizer, no RNG
    err = _usage_error(
        [*TINY, "--epochs", "3", "--out", str(tmp_path), "--resume", str(out / "best.pt")], capsys, monkeypatch
    )
    assert "--resume" in err and "weights only" in err and "last.pt" in err


def test_resume_needs_the_same_epochs(run3, tmp_path, capsys, monkeypatch):
    out, _ = run3
    err = _usage_error(
        [*TINY, "--epochs", "5", "--out", str(tmp_path), "--resume", str(out / "last.pt")], capsys, monkeypatch
    )
    assert "--epochs 5" in err and "--epochs 3" in err


def test_rerunning_a_finished_run_has_nothing_to_do(run3, capsys, monkeypatch):
    out, _ = run3
    before = (out / "last.pt").stat().st_mtime_ns
    monkeypatch.setattr(loop, "build_model", None)  # not reached
    history = train_cli.main([*TINY, "--epochs", "3", "--out", str(out), "--lr", "2e-3"])  # --resume auto
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "last.pt").stat().st_mtime_ns == before


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def test_warmup_cosine_schedule_equals_the_closed_form():
    """SequentialLR(LinearLR, CosineAnnealingLR) gives, step for step, the factor the hand-written
    LambdaLR gave: (step + 1) / warmup during warm-up, then 0.5 (1 + cos(pi progress))."""
    import torch

    def closed_form(step, total, warmup):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    for total, warmup in [(40, 4), (10, 1), (5, 5), (7, 2)]:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        scheduler = loop.warmup_cosine_schedule(optimizer, total, warmup)
        for step in range(total + 1):
            assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * closed_form(step, total, warmup), abs=1e-15)
            optimizer.step()
            scheduler.step()


def test_train_extra_missing_gives_a_clear_import_error():
    code = (
        "import sys\n"
        "sys.modules['monai'] = None\n"  # as if the 'train' extra were not installed
        "import sgdc_kernels\n"  # the operator library does not need it
        "try:\n"
        "    import sgdc_kernels.segmentation\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "(monai missing)" in out and 'pip install "sgdc-kernels[train]"' in out
