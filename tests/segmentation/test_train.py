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
