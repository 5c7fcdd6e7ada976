"""bench/run.py (with bench/cases.py and bench/timing.py): time-based measurements with their spread,
aligned rows printed once, --threads, kernel variants through the backend name, the backends left
out and why, one clear line for a bad --backends, and the figure of --plot (bench/plot.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run.py")
SHAPE = "1x4x5x6x2x3"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sgdc_bench_run_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(bench, tmp_path, *args):
    out = tmp_path / "bench.json"
    fast = ["--device", "cpu", "--shapes", SHAPE, "--warmup-time", "0", "--time", "0", "--min-iters", "3"]
    assert bench.main([*fast, "--no-memory", "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_summary_and_spread(bench):
    stats = bench.timing.summarize([4.0, 1.0, 2.0, 3.0, 5.0])
    assert stats == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert bench.timing.spread(stats) == pytest.approx(2 / 3)
    assert bench.timing.summarize([7.0])["q1"] == 7.0


def test_measurements_run_by_time_with_an_iteration_floor(bench):
    calls = []
    timing = bench.timing
    stats = timing.measure(lambda: calls.append(1), "cpu", timing.Timing(0.0, 0.05, 5))
    assert stats["n"] >= 5 and len(calls) >= stats["n"] + 1  # the first call is never timed
    assert timing.measure(lambda: None, "cpu", timing.Timing(0.0, 0.0, 4))["n"] == 4


def test_rows_are_printed_once_aligned_with_their_spread(bench, tmp_path, capsys):
    data = _run(bench, tmp_path, "--backends", "unfold,torch")
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith(("shape", "---", SHAPE))]
    assert [line.split()[3] for line in table[2:]] == ["unfold", "torch"]  # each row once
    assert "iqr %" in table[0]
    assert len({len(line) for line in table}) == 1  # one width: the columns line up
    for row in data["results"]:
        for key in ("fwd", "fwdbwd"):
            assert (
                row[f"{key}_min_ms"]
                <= row[f"{key}_q1_ms"]
                <= row[f"{key}_ms"]
                <= row[f"{key}_q3_ms"]
                <= row[f"{key}_max_ms"]
            )
            assert row[f"{key}_n"] >= 3


def test_a_large_spread_is_flagged(bench, tmp_path, capsys, monkeypatch):
    noisy = {"median": 10.0, "q1": 5.0, "q3": 20.0, "min": 1.0, "max": 50.0, "n": 5}
    monkeypatch.setattr(bench.timing, "measure", lambda step, device, timing: dict(noisy))
    _run(bench, tmp_path, "--backends", "torch")
    err = capsys.readouterr().err
    assert "the interquartile range exceeds 10% of the median in 2 measurements" in err
    assert f"{SHAPE} float32 nchw torch fwd+bwd: 150%" in err


def test_interleaved_rows_are_timed_together(bench, tmp_path, capsys):
    data = _run(bench, tmp_path, "--backends", "unfold,torch,torch.compile(shift)", "--interleave")
    rows = {r["backend"]: r for r in data["results"]}
    assert list(rows) == ["unfold", "torch", "torch.compile(shift)"]
    for r in rows.values():  # as many rounds for every row, with the roofline of the copy bandwidth
        assert r["fwd_n"] == r["fwdbwd_n"] == rows["unfold"]["fwd_n"] >= 3 and r["fwd_roofline_pct"] > 0
    assert data["meta"]["copy_bandwidth_GBps"] > 0 and rows["torch"]["fwdbwd_speedup"] > 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda", "--interleave"] if torch.cuda.is_available() else ["--time", "-1"])


def test_threads(bench, tmp_path):
    before = torch.get_num_threads()
    try:
        assert _run(bench, tmp_path, "--backends", "torch", "--threads", "1")["meta"]["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_variants_are_timed_one_row_each_through_the_backend_name(bench, tmp_path, fake_variants):
    data = _run(bench, tmp_path, "--backends", "unfold,torch@all")
    assert [r["backend"] for r in data["results"]] == ["unfold", "torch@v1", "torch@v2", "torch@v3"]
    assert [r.get("variant") for r in data["results"]] == [None, "v1", "v2", "v3"]
    assert set(fake_variants.seen) == {"v1", "v2", "v3"}
    fake_variants.seen.clear()
    _run(bench, tmp_path, "--backends", "torch@v2")
    assert set(fake_variants.seen) == {"v2"}
    fake_variants.seen.clear()
    _run(bench, tmp_path, "--backends", "torch")  # no variant named: the default one runs
    assert set(fake_variants.seen) == {"v1"}


def test_a_variant_that_cannot_run_the_case_is_skipped_with_the_reason(
    bench, tmp_path, capsys, monkeypatch, fake_variants
):
    # na2d_av's clamped windows and raw weights: v3 runs sgdc_conv's configuration only
    monkeypatch.setitem(bench.cases.OVERLOCK_SHAPES, "overlock-tiny", (1, 2, 5, 6, 3, 3))
    data = _run(bench, tmp_path, "--shapes", "overlock-tiny", "--backends", "torch@all")
    rows = {r["backend"]: r for r in data["results"]}
    assert set(fake_variants.seen) == {"v1", "v2"}  # v3 never called
    assert "skipped" not in rows["torch@v1"] and rows["torch@v2"]["fwd_ms"] > 0
    reason = rows["torch@v3"]["skipped"]
    assert reason.startswith("'torch@v3' runs only sgdc_conv's configuration") and "use 'torch' or one of" in reason
    assert "fwd_ms" not in rows["torch@v3"] and "error" not in rows["torch@v3"]
    lines = [line for line in capsys.readouterr().out.splitlines() if "torch@v3" in line]
    assert len(lines) == 1 and lines[0].endswith(f"torch@v3  skipped: {reason}")


def test_the_backends_left_out_are_named_with_the_reason(bench, tmp_path, capsys):
    from sgdc_kernels import registry

    data = _run(bench, tmp_path, "--no-peer")  # no --backends: every backend that runs on the CPU
    out = capsys.readouterr().out.splitlines()
    timed = [r["backend"] for r in data["results"]]
    assert timed[:2] == ["unfold", "torch"] and "cuda" not in timed and "triton" not in timed
    left_out = data["meta"]["left_out"]
    assert set(left_out) | set(timed) == set(registry.BACKEND_NAMES) and not set(left_out) & set(timed)
    for name, why in left_out.items():
        assert [line for line in out if line.startswith(f"# left out: {name} ")] == [f"# left out: {name} ({why})"]
        reason = registry.unavailable_reason(name)
        assert why == reason if reason else why  # the registry's reason where the backend does not load
    named = _run(bench, tmp_path, "--backends", "torch")  # named backends: nothing is left out
    assert named["meta"]["left_out"] == {} and "left out" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec,message",
    [
        ("cdua", "--backends: unknown backend 'cdua'; expected one of unfold, torch, triton, cuda, cpu"),
        ("torch@v9", "--backends: unknown variant 'v9' of 'torch'; expected 'all' or one of v1, v2, v3"),
        ("unfold@v1", "--backends: 'unfold' has no kernel variants; use 'unfold' without '@v1'"),
    ],
)
def test_a_bad_backend_is_one_line(bench, tmp_path, capsys, fake_variants, spec, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--backends", spec, "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message) and "Traceback" not in "\n".join(err)


def test_a_bad_backend_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--backends", "cdua"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "run.py: error: --backends: unknown backend 'cdua'; expected one of unfold, torch, triton, cuda, cpu"
    )


# ------------------------------------------------------------------------------------------------
# OverLoCK's na2d_av calls
# ------------------------------------------------------------------------------------------------


def test_overlock_shapes_follow_the_models(bench):
    # (B, heads, H, W, head_dim, K) at a 512x512 input: stage 3 at 1/16, stage 4 at 1/32, each block
    # with 2*sub_num_heads heads and half of its width per na2d_av call
    shapes = bench.cases.OVERLOCK_SHAPES
    assert shapes["overlock-t-s3-k13"] == (8, 8, 32, 32, 16, 13)  # 256 wide, sub_num_heads 4
    assert shapes["overlock-t-s4-k7"] == (8, 16, 16, 16, 16, 7)  # 512 wide, sub_num_heads 8
    assert shapes["overlock-xt-s4-k5"] == (8, 12, 16, 16, 14, 5)  # 336 wide, sub_num_heads 6
    cases = bench.cases.parse_shapes("overlock")
    assert len(cases) == len({c.dims for c in cases}) == 6  # xt and t share stage 3
    assert "the same call as overlock-t-s3-k13" in cases[1].describe()
    fwd, fwdbwd = bench.cases.NA2DCase("x", (8, 8, 32, 32, 16, 13)).roofline_bytes(torch.bfloat16)
    pixels = 8 * 8 * 32 * 32
    assert fwd == (169 + 2 * 16) * pixels * 2  # attn and value read, out written
    assert fwdbwd - fwd == (2 * 169 + 3 * 16) * pixels * 2  # attn, value, dout read; dattn, dvalue written


def test_overlock_rows_time_na2d_av_against_unfold(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    fast = ["--warmup-time", "0", "--time", "0", "--min-iters", "2"]
    args = ["--device", "cpu", "--shapes", "overlock-xt-s4-k5", "--backends", "torch,unfold", *fast]
    assert bench.main([*args, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "# overlock-xt-s4-k5: na2d_av, attn (8, 12, 16, 16, 25), value (8, 12, 16, 16, 14)" in stdout
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["unfold", "torch"]
    for r in rows.values():
        assert (r["shape"], r["op"], r["layout"]) == ("overlock-xt-s4-k5", "na2d_av", "natten")
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_extra_mb"] is not None
    assert rows["unfold"]["fwdbwd_speedup"] == 1.0 and rows["torch"]["fwdbwd_speedup"] > 0


def test_the_compiled_unfold_peer_runs_for_na2d_av(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.cases.OVERLOCK_SHAPES, "overlock-tiny", (1, 2, 5, 6, 3, 3))
    # the later --shapes replaces _run's
    data = _run(
        bench, tmp_path, "--shapes", "overlock-tiny", "--backends", "unfold,torch.compile(unfold),torch.compile(shift)"
    )
    rows = {r["backend"]: r for r in data["results"]}
    assert rows["torch.compile(unfold)"]["fwdbwd_ms"] > 0 and "error" not in rows["torch.compile(unfold)"]
    assert rows["torch.compile(shift)"]["error"] == "torch.compile(shift) times sgdc_conv shapes only"


# ------------------------------------------------------------------------------------------------
# DiNAT's attention: na2d_qk + softmax + na2d_av
# ------------------------------------------------------------------------------------------------


def test_dinat_shapes_follow_dinat_mini(bench):
    # (B, heads, H, W, head_dim, K, dilation) at a 224x224 input: stage s at 56 / 2**(s-1), the
    # largest dilation of the stage
    shapes = bench.cases.DINAT_SHAPES
    assert shapes["dinat-mini-s1"] == (8, 2, 56, 56, 32, 7, 8)
    assert shapes["dinat-mini-s4"] == (8, 16, 7, 7, 32, 7, 1)
    assert [c.label for c in bench.cases.parse_shapes("dinat")] == list(shapes)
    try:
        from transformers import DinatConfig
    except ImportError:
        return
    config = DinatConfig()  # DiNAT-Mini's
    for s, (heads, dilations) in enumerate(zip(config.num_heads, config.dilations), start=1):
        B, G, H, W, D, K, d = shapes[f"dinat-mini-s{s}"]
        assert (G, D, K, d) == (heads, config.embed_dim * 2 ** (s - 1) // heads, config.kernel_size, max(dilations))
        assert H == W == 224 // config.patch_size // 2 ** (s - 1)


def test_dinat_rows_time_the_attention_against_unfold(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bench.cases.DINAT_SHAPES, "dinat-tiny", (1, 2, 6, 7, 4, 3, 2))
    data = _run(bench, tmp_path, "--shapes", "dinat-tiny", "--backends", "unfold,torch,torch.compile(unfold)")
    assert "# dinat-tiny: na2d_qk (rpb) + softmax + na2d_av, query/key/value (1, 2, 6, 7, 4)" in capsys.readouterr().out
    rows = {r["backend"]: r for r in data["results"]}
    assert list(rows) == ["unfold", "torch", "torch.compile(unfold)"]
    for r in rows.values():
        assert (r["shape"], r["op"], r["layout"]) == ("dinat-tiny", "na2d_qk+softmax+na2d_av", "natten")
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and "error" not in r


def test_a_bad_shape_is_one_line(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--shapes", "overlock-q", "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--shapes: shape 'overlock-q': expected BxCxHxWxGxK, e.g. 8x256x128x128x4x7, 'overlock', 'dinat' or" in err
    assert "overlock-t-s3-k13" in err and "dinat-mini-s1" in err


# ------------------------------------------------------------------------------------------------
# --plot
# ------------------------------------------------------------------------------------------------


def test_plot_draws_time_speedup_and_roofline(bench, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "figs" / "bench.png"
    data = _run(bench, tmp_path, "--backends", "unfold,torch", "--plot", str(png))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400
    plot = sys.modules["plot"]  # bench/plot.py, imported by run.py
    titles = plot.plot_results(data["results"], data["meta"], str(tmp_path / "cpu.svg"))
    assert titles == [f"{p}: {t}" for p in ("forward", "forward + backward") for t in
                      ("median time, ms (log scale)", "speedup over unfold", "% of roofline")]  # fmt: skip
    no_roofline = [{k: v for k, v in r.items() if "roofline" not in k} for r in data["results"]]
    titles = plot.plot_results(no_roofline, data["meta"], str(tmp_path / "no_roofline.svg"))
    assert "forward: % of roofline" not in titles
    gpu_rows = [dict(r, fwd_roofline_pct=40.0, fwdbwd_roofline_pct=55.0) for r in data["results"]]
    gpu_rows.append({"shape": SHAPE, "dtype": "float32", "layout": "nchw", "backend": "cuda", "error": "OOM"})
    titles = plot.plot_results(gpu_rows, data["meta"], str(tmp_path / "gpu.png"))
    assert "forward: % of roofline" in titles and "forward + backward: % of roofline" in titles


def test_plot_without_matplotlib_is_one_line_before_measuring(bench, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if matplotlib were not installed
    monkeypatch.setattr(bench, "run_all", None)  # never reached
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--out", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # "<prog>: error: ...", prog being run.py from the command line
    assert err[0].split(": error: ")[1].startswith(f"--plot {tmp_path / 'x.png'}: matplotlib is not installed")
    assert "pip install matplotlib" in err[0]
