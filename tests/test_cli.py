"""The command-line entry points run on a CPU-only machine: info and the benchmark."""

import json
import os
import subprocess
import sys

import sgdc_kernels
from sgdc_kernels.registry import BACKEND_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_reports_versions_and_every_backend():
    out = subprocess.run([sys.executable, "-m", "sgdc_kernels.info"], capture_output=True, text=True, check=True).stdout
    assert f"sgdc-kernels {sgdc_kernels.__version__}" in out
    assert "torch" in out and "triton" in out and "extension" in out
    for name in BACKEND_NAMES:
        assert f"  {name} " in out
    assert "unavailable" in out or "cuda" in sgdc_kernels.available_backends()


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--device", "cpu", "--shapes", "1x8x9x7x2x3",
           "--warmup-time", "0", "--time", "0", "--min-iters", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "x unfold" in proc.stdout
    data = json.loads(out.read_text())
    rows = {r["backend"]: r for r in data["results"]}
    assert {"unfold", "torch"} <= set(rows)
    for r in rows.values():
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_extra_mb"] is not None
    assert rows["unfold"]["fwd_speedup"] == 1.0


def test_auto_backend_in_a_fresh_process():
    # "auto" must load what it resolves to, also when it is the process's first call
    code = (
        "import torch, sgdc_kernels\n"
        "x = torch.randn(1, 4, 3, 3)\n"
        "out = sgdc_kernels.sgdc_conv(x, torch.randn(1, 18, 3, 3), kernel_size=3, num_heads=2)\n"
        "assert out.shape == x.shape\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
