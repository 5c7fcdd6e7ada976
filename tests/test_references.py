"""Every file of the project that a comment, docstring or document names exists.

The check reads every tracked text file and resolves each name that looks like a source or
document file of the project (``.py``, ``.cuh``, ``.cu``, ``.cpp``, ``.h``, ``.md``, ``.sh``,
``.toml``): relative to the citing file, to the repository root, or to ``csrc/`` (the kernels'
include directory); a bare file name may sit anywhere in the repository. Names of other projects'
files are listed in ``EXTERNAL`` with what they are; ``#include <...>`` lines and generated files
are not the project's sources.
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Files of other projects that the documentation names on purpose.
EXTERNAL = {
    "overlock.py": "OverLoCK's model file (the README's na2d_av example)",
    "modeling_dinat.py": "Hugging Face transformers' DiNAT model",
    "Python.h": "CPython's C API header",
    "c10/util/Half.h": "torch's C++ header, which the CUDA emulation test looks for",
    "Half.h": "the same header, as a path component",
}
# Files that a build or a command writes (not tracked).
GENERATED = {"sgdc_kernels/_build_config.py", "_build_config.py"}

NAME = re.compile(r"(?<![\w/.$-])((?:[\w.-]+/)*[\w-]+(?:\.[\w-]+)*\.(?:py|cuh|cu|cpp|h|md|sh|toml))(?![\w/])")
TEXT = (".py", ".cuh", ".cu", ".cpp", ".h", ".md", ".sh", ".toml", ".txt")


def _tracked() -> list[str]:
    res = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [f for f in res.stdout.split() if os.path.exists(os.path.join(ROOT, f))]


def _unresolved(root: str, files: list[str]) -> list[str]:
    """``file:line: name`` for every name in ``files`` (paths relative to ``root``) that resolves to
    no tracked file."""
    tracked = set(files)
    basenames = {os.path.basename(f) for f in files}
    missing = []
    for f in files:
        if not f.endswith(TEXT) and os.path.basename(f) != "run":
            continue
        for n, line in enumerate(open(os.path.join(root, f), errors="replace").read().splitlines(), 1):
            if re.match(r"\s*#\s*include\s*<", line):
                continue
            for m in NAME.finditer(line):
                ref = m.group(1)
                if ref in EXTERNAL or ref in GENERATED:
                    continue
                bases = ("", os.path.dirname(f), "csrc")
                if any(os.path.normpath(os.path.join(b, ref)) in tracked for b in bases):
                    continue
                if "/" not in ref and ref in basenames:
                    continue
                missing.append(f"{f}:{n}: {ref}")
    return missing


def test_every_cited_file_exists():
    missing = _unresolved(ROOT, _tracked())
    assert not missing, "files named in comments or docs that do not exist:\n" + "\n".join(missing)


def test_the_check_reports_a_missing_file_with_its_place(tmp_path):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "kernels.cuh").write_text('#include <torch/library.h>\n#include "cuda/kernels.cuh"\n')
    (tmp_path / "note.md").write_text("see csrc/cuda/kernels.cuh,\nnot csrc/cuda/no_such_kernel.cuh\n")
    files = ["note.md", "csrc/cuda/kernels.cuh"]
    assert _unresolved(str(tmp_path), files) == ["note.md:2: csrc/cuda/no_such_kernel.cuh"]
