"""The scripts in examples/ run as a user runs them, and report what they claim."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "examples", name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_contmix_block_matches_the_definition_and_times_both_paths():
    proc = _example("contmix_block.py", "--backend", "torch", "--size", "16", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "x (2, 64, 16, 16) -> out (2, 64, 16, 16)" in out
    error = float(re.search(r"match the float64 definition \(largest difference (\S+)\)", out).group(1))
    assert error < 1e-4
    for backend in ("torch", "unfold"):
        assert re.search(rf"forward\+backward of the block, backend {backend}: \d+\.\d+ ms", out), out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backend", "cdua"], "argument --backend: invalid choice: 'cdua'"),
        (["--size", "9"], "--size: the large kernel (13) needs a feature map of at least 13 pixels"),
    ],
)
def test_contmix_block_bad_arguments_are_one_line(args, message):
    proc = _example("contmix_block.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr


def test_train_loop_runs():
    proc = _example("train_loop.py", "--backend", "torch", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"step +1 +loss \d", proc.stdout), proc.stdout
