"""Every command in the README's bash blocks, run as written from the repository root (where the
quick start leaves a user), or skipped for a stated reason. A command this file does not know
fails the test, so a new README command comes with its check. The README's Python blocks run too,
in order, as one program (later blocks use the names earlier ones define)."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the small run of the benchmark: the same script and defaults, one tiny shape, no timing budget
BENCH_SMALL = ["--shapes", "1x8x9x7x2x3", "--warmup-time", "0", "--time", "0", "--min-iters", "2", "--no-memory"]
EXAMPLE_SMALL = {"examples/contmix_block.py": ["--size", "16", "--repeats", "1"]}
# docs/make_figures.sh (the README's figures) on a smaller run: the same commands, these flags appended
FIGURE_SCRIPT = "docs/make_figures.sh"
FIGURES_SMALL = "--num-train 16 --num-val 4 --batch-size 8 --epochs 1"
SKIPPED = {
    "pip": "CI runs the quick start's install itself (.ci/run), in a fresh environment",
    "pytest": "this is the test suite",
    "torchrun": "DDP needs several processes; tests/segmentation/test_train.py runs DDP with gloo",
    "cmake": "tests/test_cmake.py builds csrc/ with CMake (minutes of nvcc)",
}


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in block.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in line.split("&&")]
    return commands


def _python(args: list[str]) -> list[str]:
    return [sys.executable if a == "python" else a for a in args]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_python(args), cwd=ROOT, capture_output=True, text=True, timeout=300)


_HELP: dict[str, subprocess.CompletedProcess] = {}  # module -> its --help run, once per module


def _extension_line(cwd: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "sgdc_kernels.info"], cwd=cwd, capture_output=True, text=True, check=True
    )
    return next(line for line in out.stdout.splitlines() if line.startswith("extension"))


# ids: the command, cut to pytest's 100 characters (a longer one would be named command<N>, which -k
# cannot select by its words)
@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: c if len(c) <= 100 else c[:97] + "...")
def test_readme_command_from_the_repository_root(command, tmp_path):
    args = shlex.split(command)
    if args[0] in SKIPPED:
        pytest.skip(SKIPPED[args[0]])
    assert args[0] in ("python", "bash"), f"README command not covered by tests/test_readme.py: {command}"
    if args[1:] == ["-m", "sgdc_kernels.info"]:
        proc = _run(args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"loaded from {os.path.realpath(os.path.join(ROOT, 'sgdc_kernels'))} (source checkout" in proc.stdout
        # the root sees what the installed package has: the same extension as from anywhere else
        assert _extension_line(ROOT) == _extension_line(str(tmp_path))
    elif args[1] == "bench/run.py":
        proc = _run(args + BENCH_SMALL + ["--out", str(tmp_path / "bench.json")])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "x unfold" in proc.stdout and (tmp_path / "bench.json").exists()
    elif args[1].startswith("examples/"):
        # as written, on a smaller problem (tests/test_examples.py checks what it prints)
        proc = _run(args + EXAMPLE_SMALL.get(args[1], []))
        assert proc.returncode == 0, proc.stderr[-2000:]
    elif args[0] == "bash" and args[1:] == [FIGURE_SCRIPT]:
        # the figure script as written, on a smaller run (fewer images, one epoch), into tmp_path
        env = dict(os.environ, PYTHON=sys.executable, RUN=str(tmp_path / "run"), FIGURES=str(tmp_path / "figures"),
                   TRAIN_FLAGS=FIGURES_SMALL, IMAGE="val_0000")  # fmt: skip
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "figures" / "overlay.png").exists() and (tmp_path / "figures" / "curves.png").exists()
    elif args[1] == "-m":
        # an application entry point (paths in its arguments are placeholders): it must import and
        # parse its arguments from the root
        if args[2] not in _HELP:
            _HELP[args[2]] = _run(args[:3] + ["--help"])
        proc = _HELP[args[2]]
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "usage:" in proc.stdout
    else:
        pytest.fail(f"README command not covered by tests/test_readme.py: {command}")


def test_the_readme_has_the_commands_this_file_checks():
    commands = readme_commands()
    assert "python -m sgdc_kernels.info" in commands
    assert any(c.startswith("python bench/run.py") for c in commands)


def test_the_figure_script_runs_the_readme_commands():
    """docs/make_figures.sh makes the README's figures by the README's commands: its sgdc-train and
    sgdc-predict lines are README commands, with its run folder runs/cpu and no flags appended."""
    commands = readme_commands()
    assert f"bash {FIGURE_SCRIPT}" in commands
    lines = open(os.path.join(ROOT, FIGURE_SCRIPT)).read().splitlines()
    runs = [line for line in lines if line.startswith('"$PYTHON" -m sgdc_kernels.segmentation.')]
    assert [r.split()[2] for r in runs] == ["sgdc_kernels.segmentation.train", "sgdc_kernels.segmentation.predict"]
    for line in runs:
        line = line.replace(" ${TRAIN_FLAGS:-}", "").replace('"$PYTHON"', "python").replace('"$RUN', '"runs/cpu')
        assert " ".join(shlex.split(line)) in commands, line


def _missing_requirement(block: str) -> str | None:
    """The package a block's first line ``# requires: <package spec>`` names, when it is not
    installed here (the test extra installs it); None otherwise."""
    m = re.match(r"# requires: ([A-Za-z0-9_.-]+)", block)
    return m.group(1) if m and importlib.util.find_spec(m.group(1)) is None else None


def test_the_readme_python_blocks_run_as_written(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    blocks = [b for b in blocks if _missing_requirement(b) is None]
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(blocks))
    # from an empty folder: the blocks name no file of the repository, and write theirs there
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
