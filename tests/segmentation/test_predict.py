"""sgdc-predict: its outputs, the reproduction of sgdc-train's validation (synthetic data and a
folder), images of any size and mode, the threshold and run flags, each bad input, and the curves
sgdc-train draws. CPU-sized: resnet10t, dim 16, 32x32."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sgdc_kernels.segmentation", exc_type=ImportError)  # needs the 'train' extra

from PIL import Image  # noqa: E402

from sgdc_kernels.segmentation import plots, predict  # noqa: E402
from sgdc_kernels.segmentation import train as train_cli  # noqa: E402
from sgdc_kernels.segmentation.data import SyntheticLesions, read_image, split_pairs, synthetic_lesion  # noqa: E402

TRAIN = [
    "--image-size", "32", "--batch-size", "4", "--backbone", "resnet10t", "--dim", "16", "--depth", "1",
    "--guide-ch", "8", "--workers", "0", "--device", "cpu", "--no-progress", "--lr", "3e-3",
]  # fmt: skip
RUN = ["--workers", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_run")
    argv = [*TRAIN, "--data", "synthetic", "--num-train", "16", "--num-val", "6", "--epochs", "2", "--out", str(out)]
    train_cli.main(argv)
    return out


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _lesions(n, seed=1):
    """n synthetic (image, mask) pairs as 8-bit arrays (48, 48, 3) and (48, 48)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        image, mask = synthetic_lesion(48, g)
        yield (image * 255).round().byte().permute(1, 2, 0).numpy(), (mask[0] * 255).byte().numpy()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A folder in the images/ + masks/ layout, of images of several sizes and aspect ratios, and
    a one-epoch run on it."""
    root = tmp_path_factory.mktemp("lesions")
    sizes = [(40, 56), (48, 48), (64, 36), (33, 47)]  # (height, width)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(_lesions(10)):
        h, w = sizes[i % len(sizes)]
        Image.fromarray(image).resize((w, h), Image.BILINEAR).save(root / "images" / f"lesion{i:02d}.png")
        Image.fromarray(mask).resize((w, h), Image.NEAREST).save(root / "masks" / f"lesion{i:02d}.png")
    out = tmp_path_factory.mktemp("folder_run")
    train_cli.main([*TRAIN, "--data", str(root), "--val-fraction", "0.4", "--batch-size", "3", "--epochs", "1",
                    "--out", str(out)])  # fmt: skip
    return root, out


def _csv(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _last_validation(run):
    return json.loads((run / "metrics.json").read_text())["epochs"][-1]


def _png(path):
    with Image.open(path) as im:
        im.load()
        return im.mode, im.size, np.asarray(im)


def _dice(pred, true):
    inter, total = (pred & true).sum(), pred.sum() + true.sum()
    return 1.0 if total == 0 else 2.0 * inter / total


# ------------------------------------------------------------------------------------- outputs


def test_the_validation_split_reproduces_the_last_validation_of_metrics_json(synthetic_run, tmp_path, capsys):
    out = tmp_path / "pred"
    assert predict.main([*RUN, "--checkpoint", str(synthetic_run / "last.pt"), "--data", "synthetic",
                         "--out", str(out)]) == 0  # fmt: skip
    stdout = capsys.readouterr().out
    rows = _csv(out)
    assert [r["name"] for r in rows] == [f"val_{i:04d}" for i in range(6)]
    last = _last_validation(synthetic_run)
    for key in ("iou", "dice", "hd95"):
        mean = math.fsum(float(r[key]) for r in rows) / len(rows)
        assert mean == pytest.approx(last[key], rel=1e-12, abs=1e-12), key
    # the tracker's means are validation's, bit for bit
    assert f"validation recorded in {synthetic_run / 'last.pt'} (epoch 2)" in stdout
    assert "largest difference from the means above: 0.0e+00" in stdout

    val = SyntheticLesions(6, 32, 0, offset=16)
    for i, row in enumerate(rows):
        mode, size, mask = _png(out / "masks" / f"{row['name']}.png")
        assert mode == "L" and size == (32, 32) and set(np.unique(mask)) <= {0, 255}
        true = val.raw(i)[1][0].numpy() > 0.5
        assert _dice(mask > 127, true) == pytest.approx(float(row["dice"]), abs=1e-6)  # the PNG is what was scored
        mode, size, edge = _png(out / "edges" / f"{row['name']}.png")
        assert mode == "L" and size == (32, 32)
        mode, size, over = _png(out / "overlays" / f"{row['name']}.png")
        assert mode == "RGB" and size == (32, 32)
        assert (over == plots.TRUE_COLOUR).all(-1).any()  # every synthetic image has a lesion
        if mask.any():
            assert (over == plots.PRED_COLOUR).all(-1).any()


def test_best_pt_reproduces_its_epoch(synthetic_run, tmp_path, capsys):
    best = torch.load(synthetic_run / "best.pt", map_location="cpu", weights_only=False)
    assert predict.main([*RUN, "--checkpoint", str(synthetic_run / "best.pt"), "--data", "synthetic",
                         "--out", str(tmp_path)]) == 0  # fmt: skip
    stdout = capsys.readouterr().out
    assert f"(epoch {best['epoch']})" in stdout and "largest difference from the means above: 0.0e+00" in stdout


def test_a_folder_reproduces_its_validation_with_masks_at_each_image_size(folder_run, tmp_path, capsys):
    root, run = folder_run
    out = tmp_path / "pred"
    assert predict.main([*RUN, "--checkpoint", str(run / "last.pt"), "--data", str(root), "--out", str(out)]) == 0
    assert "largest difference from the means above: 0.0e+00" in capsys.readouterr().out
    val_pairs = split_pairs(root, seed=0, val_fraction=0.4)[1]
    rows = _csv(out)
    assert [r["name"] for r in rows] == [image.stem for image, _ in val_pairs]
    assert [r["image"] for r in rows] == [str(image) for image, _ in val_pairs]
    last = _last_validation(run)
    for key in ("iou", "dice", "hd95"):
        assert math.fsum(float(r[key]) for r in rows) / len(rows) == pytest.approx(last[key], rel=1e-12, abs=1e-12)
    for image, _ in val_pairs:
        with Image.open(image) as im:
            size = im.size
        for folder in ("masks", "edges", "overlays"):
            assert _png(out / folder / f"{image.stem}.png")[1] == size, (folder, image)
    # --split train and all: the other images, and every one
    assert predict.main([*RUN, "--checkpoint", str(run / "last.pt"), "--data", str(root), "--split", "all",
                         "--out", str(tmp_path / "all")]) == 0  # fmt: skip
    assert len(_csv(tmp_path / "all")) == 10
    assert "validation recorded" not in capsys.readouterr().out  # not the validation split


def test_images_of_any_size_and_mode(synthetic_run, tmp_path):
    image, _ = next(_lesions(1))
    gray = np.asarray(Image.fromarray(image).convert("L"))
    folder = tmp_path / "photos"
    _save(folder / "rgb.jpg", image)
    _save(folder / "gray.png", gray[:30])  # 48 wide, 30 high
    _save(folder / "rgba.png", np.dstack([image, np.full(image.shape[:2], 128, np.uint8)]))
    _save(folder / "wide16.png", gray.astype(np.uint16) * 257)  # 16-bit grayscale
    Image.fromarray(image).convert("P").resize((70, 20)).save(folder / "palette.png")
    Image.fromarray(image).resize((21, 90)).save(folder / "tall.tif")
    assert Image.open(folder / "wide16.png").mode == "I;16"
    assert np.array_equal(
        np.asarray(read_image(folder / "wide16.png"))[:30], np.asarray(read_image(folder / "gray.png"))
    )

    out = tmp_path / "pred"
    assert predict.main([*RUN, "--checkpoint", str(synthetic_run / "best.pt"), "--data", str(folder),
                         "--out", str(out)]) == 0  # fmt: skip
    assert not (out / "metrics.csv").exists()  # no masks, no metrics
    for path in folder.iterdir():
        with Image.open(path) as im:
            size = im.size
        assert _png(out / "masks" / f"{path.stem}.png")[1] == size
        assert _png(out / "overlays" / f"{path.stem}.png")[:2] == ("RGB", size)
    # one image, and its prediction is the one it got in the folder
    assert predict.main([*RUN, "--checkpoint", str(synthetic_run / "best.pt"), "--data", str(folder / "tall.tif"),
                         "--out", str(tmp_path / "one")]) == 0  # fmt: skip
    assert np.array_equal(_png(tmp_path / "one" / "masks" / "tall.png")[2], _png(out / "masks" / "tall.png")[2])


def test_threshold_and_the_run_flags(synthetic_run, tmp_path):
    ckpt = str(synthetic_run / "last.pt")
    masks = {}
    for threshold in ("0.2", "0.5", "0.8"):
        out = tmp_path / threshold
        assert predict.main([*RUN, "--checkpoint", ckpt, "--data", "synthetic", "--threshold", threshold,
                             "--out", str(out)]) == 0  # fmt: skip
        masks[threshold] = np.stack([_png(out / "masks" / f"val_{i:04d}.png")[2] > 127 for i in range(6)])
        val = SyntheticLesions(6, 32, 0, offset=16)
        for i, row in enumerate(_csv(out)):  # the metrics score the mask of this threshold
            assert _dice(masks[threshold][i], val.raw(i)[1][0].numpy() > 0.5) == pytest.approx(float(row["dice"]))
    assert (masks["0.2"] >= masks["0.5"]).all() and (masks["0.5"] >= masks["0.8"]).all()
    assert masks["0.2"].sum() > masks["0.8"].sum()
    # batch size, backend, autocast and channels_last as in sgdc-train
    out = tmp_path / "flags"
    argv = ["--batch-size", "5", "--backend", "unfold", "--amp", "bf16", "--channels-last", "--split", "train"]
    assert predict.main([*RUN, *argv, "--checkpoint", ckpt, "--data", "synthetic", "--out", str(out)]) == 0
    assert len(_csv(out)) == 16 and len(list((out / "masks").iterdir())) == 16


# ---------------------------------------------------------------------------------- bad input


def _usage_error(argv, capsys, monkeypatch, before_model=True) -> str:
    """Run the CLI with a model builder that must not be reached unless ``before_model`` is False;
    return the one error line."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the mistake was reported")

    if before_model:
        monkeypatch.setattr(predict, "build_model", no_model)
    with pytest.raises(SystemExit) as exc:
        predict.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sgdc-predict: error: "), err
    return err


def _mistakes(tmp_path, run):
    from sgdc_kernels import available_backends

    last = run / "last.pt"
    (tmp_path / "garbage.pt").write_bytes(os.urandom(2000))
    (tmp_path / "truncated.pt").write_bytes(last.read_bytes()[:5000])
    import timm

    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "resnet.pt")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["model_config"]["widths"] = [16, 32]  # a model flag this version does not know
    torch.save(ckpt, tmp_path / "newer.pt")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("")
    image, mask = next(_lesions(1))
    _save(tmp_path / "photo.png", image)
    _save(tmp_path / "unpaired" / "images" / "a.png", image)
    _save(tmp_path / "unpaired" / "masks" / "a.png", mask)
    _save(tmp_path / "unpaired" / "masks" / "b.png", mask)  # no image b
    _save(tmp_path / "photos" / "a.png", image)
    cases = [
        (["--checkpoint", tmp_path / "missing.pt"], "--checkpoint", "no such file"),
        (["--checkpoint", tmp_path / "garbage.pt"], "--checkpoint", "not a readable checkpoint"),
        (["--checkpoint", tmp_path / "truncated.pt"], "--checkpoint", "not a readable checkpoint"),
        (["--checkpoint", tmp_path / "resnet.pt"], "--checkpoint", "not a checkpoint written by sgdc-train"),
        (["--checkpoint", tmp_path / "newer.pt"], "--checkpoint", "(unknown here: widths; missing: none)"),
        (["--data", tmp_path / "missing"], "--data", "no such file or folder"),
        (["--data", tmp_path / "text.png"], "--data", "not a readable image"),
        (["--data", tmp_path / "empty.png"], "--data", "not a readable image"),
        (["--data", tmp_path / "no_images"], "--data", "no images"),
        (
            ["--data", tmp_path / "unpaired"],
            "--data",
            f"the mask {tmp_path / 'unpaired' / 'masks' / 'b.png'} pairs with no image",
        ),
        (["--out", tmp_path / "a_file"], "--out", "not a folder"),
        (["--out", tmp_path / "a_file" / "sub"], "--out", "is a file"),
        (["--data", tmp_path / "photo.png", "--split", "val"], "--split", "one image"),
        (["--data", tmp_path / "photos", "--split", "train"], "--split", "without masks"),
        (["--threshold", "1"], "--threshold", "probability"),
        (["--batch-size", "0"], "--batch-size", ">= 1"),
        (["--data", "synthetic", "--split", "test"], "--split", "invalid choice"),
    ]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "--device", "no CUDA GPU")]
    if "cuda" not in available_backends("cpu"):
        cases += [(["--backend", "cuda"], "--backend", "cuda")]
    return cases


def test_each_mistake_is_one_line_naming_the_flag_before_the_model(synthetic_run, tmp_path, capsys, monkeypatch):
    base = {"--checkpoint": synthetic_run / "last.pt", "--data": "synthetic", "--out": tmp_path / "out"}
    for argv, flag, why in _mistakes(tmp_path, synthetic_run):
        given = dict(base, **dict(zip(argv[::2], argv[1::2])))
        err = _usage_error([*RUN, *(str(a) for kv in given.items() for a in kv)], capsys, monkeypatch)
        assert err.startswith(tuple(f"sgdc-predict: error: {a}{flag}" for a in ("", "argument "))), (argv, err)
        assert why in err, (argv, err)
        assert not (tmp_path / "out").exists(), argv  # nothing written


def test_weights_of_another_version_are_named(synthetic_run, tmp_path, capsys, monkeypatch):
    ckpt = torch.load(synthetic_run / "best.pt", map_location="cpu", weights_only=False)
    key = next(k for k in ckpt["model"] if k.startswith("seg_head"))
    ckpt["model"][key.replace("seg_head", "mask_head")] = ckpt["model"].pop(key)
    ckpt["version"] = "0.0.1"
    torch.save(ckpt, tmp_path / "old.pt")
    argv = [*RUN, "--checkpoint", str(tmp_path / "old.pt"), "--data", "synthetic", "--out", str(tmp_path / "out")]
    err = _usage_error(argv, capsys, monkeypatch, before_model=False)
    assert "--checkpoint" in err and "its weights do not fit" in err and "written by sgdc-kernels 0.0.1" in err
    assert f"1 missing, first {key!r}" in err and not (tmp_path / "out").exists()


def test_a_bad_image_in_a_folder_is_reported_and_skipped(synthetic_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    for i, (image, _) in enumerate(_lesions(4)):
        _save(folder / f"{i}.png", image)
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "2.png").write_bytes((folder / "2.png").read_bytes()[:200])  # truncated: its header reads
    out = tmp_path / "pred"
    status = predict.main([*RUN, "--checkpoint", str(synthetic_run / "last.pt"), "--data", str(folder),
                           "--batch-size", "4", "--out", str(out)])  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0:2] for line in err[:2]] == [["sgdc-predict", " skipped " + str(folder / n)] for n in
                                                          ("1.png", "2.png")]  # fmt: skip
    assert err[-1] == "sgdc-predict: 2 of 4 images skipped (unreadable, see above)"
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["0.png", "3.png"]


def test_console_script_and_module_report_a_mistake_without_traceback(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "sgdc-predict")
    assert os.path.exists(script), "the sgdc-predict console script is installed with the package"
    argv = ["--checkpoint", str(tmp_path / "missing.pt"), "--data", "synthetic", "--out", str(tmp_path / "out")]
    for cmd in ([script], [sys.executable, "-m", "sgdc_kernels.segmentation.predict"]):
        proc = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"sgdc-predict: error: --checkpoint {tmp_path / 'missing.pt'}: no such file (give sgdc-train's best.pt "
            "or last.pt) (see --help)"
        ]


def test_every_flag_has_help():
    flags = [a for a in predict.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 18 and all(a.help for a in flags)


# ------------------------------------------------------------------------------------- curves


def test_sgdc_train_draws_its_curves(synthetic_run):
    mode, size, _ = _png(synthetic_run / "curves.png")
    assert mode == "RGBA" and size[0] > 400


def test_sgdc_train_without_matplotlib_warns_once_and_trains(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if matplotlib were not installed
    argv = [
        *TRAIN,
        "--data",
        "synthetic",
        "--num-train",
        "4",
        "--num-val",
        "2",
        "--epochs",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert len(train_cli.main(argv)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sgdc-train: warning: no curves.png: matplotlib is not installed")
    assert 'pip install -e ".[train]"' in err[0]
    assert (tmp_path / "metrics.json").exists() and not (tmp_path / "curves.png").exists()


def test_a_drawing_failure_warns_once_and_never_raises(tmp_path, capsys, monkeypatch):
    def broken(history, path):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "plot_curves", broken)
    curves = plots.Curves(tmp_path / "curves.png")
    for _ in range(3):
        curves.draw([{"epoch": 1}])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "RuntimeError: no fonts" in err[0] and err[0].startswith("sgdc-train: warning:")


def test_contours():
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[1:5, 2:6] = True
    ring = mask.clone()
    ring[2:4, 3:5] = False
    assert torch.equal(plots.contour(mask), ring)
    assert torch.equal(plots.contour(torch.ones(4, 4, dtype=torch.bool)), torch.zeros(4, 4, dtype=torch.bool))
    assert plots.contour(mask, radius=1).sum() > ring.sum()
    image = torch.zeros(6, 7, 3, dtype=torch.uint8)
    out = plots.overlay(image, mask, ~mask)
    assert (out[ring] == torch.tensor(plots.PRED_COLOUR, dtype=torch.uint8)).all()
