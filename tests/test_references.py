"""Every file of the project that a comment, docstring or document names exists.

The check reads the comments and docstrings of every tracked source file (Python: comments and
triple-quoted strings; C++ and CUDA: ``//`` comments and ``#include "..."`` lines) and the whole
text of documents and scripts (``.md``, ``.sh``, ``.toml``, ``.txt``), and resolves each name that
looks like a source or document file of the project (``.py``, ``.cuh``, ``.cu``, ``.cpp``, ``.h``,
``.md``, ``.sh``, ``.toml``): relative to the citing file, to the repository root, or to ``csrc/``
(the kernels' include directory); a bare file name may sit anywhere in the repository. Names of
other projects' files are listed in ``EXTERNAL`` with what they are; generated files in
``GENERATED``. This file's own examples are not citations.
"""

import io
import os
import re
import subprocess
import tokenize

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

SELF = "tests/test_references.py"
NAME = re.compile(r"(?<![\w/.$-])((?:[\w.-]+/)*[\w-]+(?:\.[\w-]+)*\.(?:py|cuh|cu|cpp|h|md|sh|toml))(?![\w/])")
TEXT = (".py", ".cuh", ".cu", ".cpp", ".h", ".md", ".sh", ".toml", ".txt")


def _tracked() -> list[str]:
    res = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [f for f in res.stdout.split() if os.path.exists(os.path.join(ROOT, f))]


def _prose(path: str, text: str) -> list[tuple[int, str]]:
    """(line number, text) of the parts of a file that may cite files: comments and docstrings of
    code, all of a document or script."""
    if path.endswith(".py"):
        parts = []
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT or (
                tok.type == tokenize.STRING and tok.string.lstrip("rbuf").startswith('"""')
            ):
                parts += [(tok.start[0] + i, line) for i, line in enumerate(tok.string.splitlines())]
        return parts
    lines = list(enumerate(text.splitlines(), 1))
    if path.endswith((".cuh", ".cu", ".cpp", ".h")):
        return [(n, line.split("//", 1)[1]) for n, line in lines if "//" in line] + [
            (n, line) for n, line in lines if re.match(r'\s*#\s*include\s*"', line)
        ]
    return lines


def _unresolved(root: str, files: list[str]) -> list[str]:
    """``file:line: name`` for every name in ``files`` (paths relative to ``root``) that resolves to
    no tracked file."""
    tracked = set(files)
    basenames = {os.path.basename(f) for f in files}
    missing = []
    for f in files:
        if f == SELF or (not f.endswith(TEXT) and os.path.basename(f) != "run"):
            continue
        for n, line in _prose(f, open(os.path.join(root, f), errors="replace").read()):
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
    (tmp_path / "csrc" / "cuda" / "kernels.cuh").write_text(
        '#include <torch/library.h>\n#include "cuda/kernels.cuh"\n// see gone.cuh\nint kernels_cu = 0;\n'
    )
    (tmp_path / "note.md").write_text("see csrc/cuda/kernels.cuh,\nnot csrc/cuda/no_such_kernel.cuh\n")
    (tmp_path / "tool.py").write_text('"""Reads csrc/cuda/kernels.cuh."""\n\nTMP = "scratch.cu"  # writes old.cu\n')
    files = ["note.md", "csrc/cuda/kernels.cuh", "tool.py"]
    assert _unresolved(str(tmp_path), files) == [
        "note.md:2: csrc/cuda/no_such_kernel.cuh",
        "csrc/cuda/kernels.cuh:3: gone.cuh",
        "tool.py:3: old.cu",
    ]
