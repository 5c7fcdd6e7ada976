"""The registry: one clear error for a mistyped backend everywhere, kernel variants, and a module
graph without an import circle."""

import ast
import os
import subprocess
import sys

import pytest
import torch

from sgdc_kernels import SGDC, SGE, get_backend, info, registry, sgdc_conv, unavailable_reason, window_conv
from sgdc_kernels.custom_ops import FLOATING_ALL, Backend
from sgdc_kernels.reference import unfold_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sgdc_kernels")
UNKNOWN = "backend: unknown backend 'cdua'; expected 'auto' or one of unfold, torch, triton, cuda, cpu"


@pytest.mark.parametrize(
    "call",
    [
        lambda: sgdc_conv(torch.zeros(1, 2, 3, 3), torch.zeros(1, 9, 3, 3), kernel_size=3, num_heads=1, backend="cdua"),
        lambda: SGDC(dim=8, backend="cdua"),
        lambda: unavailable_reason("cdua"),
        lambda: get_backend("cdua"),
    ],
    ids=["sgdc_conv", "SGDC", "unavailable_reason", "get_backend"],
)
def test_a_mistyped_backend_is_the_same_value_error_everywhere(call):
    with pytest.raises(ValueError, match="backend: unknown backend 'cdua'; expected"):
        call()


def test_sgdc_conv_names_auto_among_the_choices():
    with pytest.raises(ValueError) as exc:
        sgdc_conv(torch.zeros(1, 2, 3, 3), torch.zeros(1, 9, 3, 3), kernel_size=3, num_heads=1, backend="cdua")
    assert str(exc.value) == UNKNOWN


def test_sgdc_checks_its_backend_when_built_but_availability_when_run():
    block = SGDC(dim=8, num_heads=2, kernel_size=3, backend="cuda")  # may move to a GPU later
    assert block.backend == "cuda"
    with pytest.raises(TypeError, match="backend: expected a str"):
        SGDC(dim=8, backend=None)


def test_sge_takes_no_backend():
    with pytest.raises(TypeError):
        SGE(s4_in=8, s1_in=8, mid=8, guide_ch=4, bottleneck=8, backend="torch")


# ------------------------------------------------------------------------------------------------
# Kernel variants, with a fake backend (no GPU needed)
# ------------------------------------------------------------------------------------------------


def test_the_default_variant_must_run_every_configuration():
    with pytest.raises(ValueError, match="the default variant must run every configuration"):
        Backend("x", unfold_forward, None, frozenset({"cpu"}), FLOATING_ALL, "x", ("a", "b"), frozenset({"a"}))
    with pytest.raises(ValueError, match="default_only names unknown variants"):
        Backend("x", unfold_forward, None, frozenset({"cpu"}), FLOATING_ALL, "x", ("a",), frozenset({"z"}))


def test_a_call_carries_its_variant_to_the_backend(fake_variants):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(1, 9, 5, 5)
    for spec, want in (("torch", "v1"), ("torch@v2", "v2"), ("torch@v3", "v3"), ("auto", "v1")):
        sgdc_conv(x, w, kernel_size=3, num_heads=1, backend=spec)
        assert fake_variants.seen[-1] == want, spec
    # two variants in one process, call after call, without any global switch
    sgdc_conv(x, w, kernel_size=3, num_heads=1, backend="torch@v2")
    sgdc_conv(x, w, kernel_size=3, num_heads=1, backend="torch@v1")
    assert fake_variants.seen[-2:] == ["v2", "v1"]


def test_a_variant_that_cannot_run_a_configuration_raises(fake_variants):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(1, 9, 6, 6)
    with pytest.raises(
        ValueError, match=r"backend: 'torch@v3' runs only sgdc_conv's configuration .* torch@v1, torch@v2"
    ):
        window_conv(x, w, kernel_size=3, border="clamp", backend="torch@v3")
    window_conv(x, w, kernel_size=3, border="clamp", backend="torch")
    assert fake_variants.seen[-1] == "v1"
    assert fake_variants.backend.variant_for(1, True, True) == "v1"
    with pytest.raises(ValueError, match="names every variant"):
        sgdc_conv(x, w, kernel_size=3, num_heads=1, backend="torch@all")


def test_parse_and_expand_variants(fake_variants):
    assert registry.parse_backend("torch@v2") == ("torch", "v2")
    assert registry.parse_backend("torch") == ("torch", None)
    assert registry.expand_variants("torch@all") == ["torch@v1", "torch@v2", "torch@v3"]
    with pytest.raises(ValueError, match="backend: unknown variant 'v9' of 'torch'; expected 'all' or one of v1, v2"):
        registry.parse_backend("torch@v9")
    with pytest.raises(ValueError, match="backend: 'unfold' has no kernel variants"):
        registry.parse_backend("unfold@v1")
    with pytest.raises(ValueError, match="backend: unknown backend 'cdua'"):
        registry.parse_backend("cdua@v1")
    with pytest.raises(ValueError, match="backend: unknown variant 'v9' of 'torch'"):
        sgdc_conv(torch.zeros(1, 2, 3, 3), torch.zeros(1, 9, 3, 3), kernel_size=3, num_heads=1, backend="torch@v9")


def test_info_lists_the_variants(fake_variants):
    assert (
        "variants v1, v2, v3 (backend='torch@<variant>'; default v1; v3 run sgdc_conv's configuration only)"
        in info.report()
    )


def test_the_variant_is_part_of_the_compiled_graph(fake_variants):
    """Two variants in one compiled function: each call keeps its own."""
    x, w = torch.randn(1, 2, 5, 5), torch.randn(1, 9, 5, 5)

    def two(x, w):
        a = sgdc_conv(x, w, kernel_size=3, num_heads=1, backend="torch@v2")
        return a + sgdc_conv(x, w, kernel_size=3, num_heads=1, backend="torch@v3")

    torch.compile(two, fullgraph=True, backend="eager")(x, w)
    assert fake_variants.seen[-2:] == ["v2", "v3"]


# ------------------------------------------------------------------------------------------------
# No import circle
# ------------------------------------------------------------------------------------------------


def _imports(path: str) -> set[str]:
    """Modules of the package that ``path`` imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            targets = [node.module] if node.module else [a.name for a in node.names]
            for t in targets:
                found.add(
                    t.split(".")[0] if os.path.exists(os.path.join(PACKAGE, t.split(".")[0] + ".py")) else "__init__"
                )
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sgdc_kernels."):
            found.add(node.module.split(".")[1])
    return found


def test_the_module_graph_has_no_cycle():
    modules = {f[:-3]: _imports(os.path.join(PACKAGE, f)) for f in os.listdir(PACKAGE) if f.endswith(".py")}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) == "done" or m not in modules:
            return
        state[m] = "open"
        for dep in sorted(modules[m]):
            visit(dep, path + [m])
        state[m] = "done"

    for m in sorted(modules):
        visit(m, [])
    assert modules["custom_ops"] == set(), "custom_ops.py must import nothing else from the package"
    assert "registry" not in modules["reference"] | modules["_extension"]


def test_importing_the_wiring_loads_no_backend():
    code = (
        "import sys, sgdc_kernels.custom_ops\n"
        "backends = ('sgdc_kernels.reference', 'sgdc_kernels._extension', 'sgdc_kernels.triton_ops')\n"
        "loaded = [m for m in backends if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
