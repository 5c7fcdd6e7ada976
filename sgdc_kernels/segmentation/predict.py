"""The command line that runs a trained SGD-Net on images, ``sgdc-predict`` (the same as
``python -m sgdc_kernels.segmentation.predict``):

    sgdc-predict --checkpoint runs/cpu/last.pt --data synthetic --out runs/cpu/predict
    sgdc-predict --checkpoint runs/isic/best.pt --data photo.jpg --out predictions
    sgdc-predict --checkpoint runs/isic/best.pt --data /data/ISIC2018 --split val --out predictions

``--checkpoint`` is sgdc-train's ``best.pt`` or ``last.pt``. ``--data`` is an image file, a folder
of images, or anything ``sgdc-train --data`` reads (``synthetic``, or a folder of images and masks
in its layouts), split as sgdc-train splits it (``--split``; the split flags default to the
checkpoint's training values). For every image it writes, at the image's own size:

- ``<out>/masks/<name>.png``: the predicted mask, 0 or 255 (probability > ``--threshold``);
- ``<out>/edges/<name>.png``: the edge head's probability, 0 to 255;
- ``<out>/overlays/<name>.png``: the image with the predicted contour in yellow and, where a mask
  is given, the true contour in blue.

With masks, it writes each image's IoU, Dice and HD95 to ``<out>/metrics.csv`` and prints their
means. They are computed as sgdc-train's validation computes them, by the same code: the image
resized to ``--image-size`` squared (bilinear) and its mask too (nearest), the same forward pass
(``loop.forward_eval``) in batches of ``--batch-size`` in the data set's order, and
``metrics.MetricTracker`` on logits > logit(``--threshold``) (logits > 0 at the default 0.5). So
``--data`` and ``--split val`` of a training run, with its last.pt, reproduce the last validation
line of its metrics.json (its best.pt: the best epoch's line), which the command prints beside
them. The PNGs are at the image's size: the logits bilinearly resized to it, then thresholded.

A mistake in the flags, a checkpoint that is not sgdc-train's or does not fit this version, an
unreadable single image, a folder without images or with masks that pair with no image, or an
output folder that cannot be written, stops with one line naming the flag (exit status 2) before
any image is predicted. An unreadable image in a folder is reported and skipped; the run goes on
and ends with exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._version import __version__
from ..registry import BACKEND_NAMES
from .checkpoints import MODEL_ARGS, load_checkpoint
from .loop import AMP_DTYPES, UsageError, build_model, forward_eval
from .train import _bounded, _one_line, _Parser, backend_used, resolve_device
from .train import build_parser as train_parser

PROG = "sgdc-predict"
SPLITS = ("train", "val", "all")
# The flags whose default is the checkpoint's training value (sgdc-train's default where the
# checkpoint does not record its flags).
FROM_CHECKPOINT = ("image_size", "num_train", "num_val", "val_fraction", "seed", "batch_size")
CSV_COLUMNS = ("name", "image", "iou", "dice", "hd95")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, except where it is None (required, or taken from the checkpoint)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability > 0 and < 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run a trained SGD-Net on images: masks, edge maps and overlays at each image's size, "
        "and per-image IoU, Dice and HD95 where masks are given "
        "(also: python -m sgdc_kernels.segmentation.predict).",
        formatter_class=_Formatter,
    )
    p.add_argument("--checkpoint", required=True, help="sgdc-train's best.pt or last.pt")
    p.add_argument(
        "--data", required=True,
        help="an image file, a folder of images, or what sgdc-train --data reads: 'synthetic' or a folder of "
        "images and masks (then metrics too)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder for masks/, edges/, overlays/ and metrics.csv")
    d = p.add_argument_group("data (--image-size and the split flags default to the checkpoint's training values)")
    d.add_argument(
        "--split", choices=SPLITS, default=None,
        help="which images of a data set ('synthetic' or a folder with masks): sgdc-train's validation split "
        "(the default), its training split (not augmented) or all; a single image or a folder of images "
        "without masks is predicted whole",
    )  # fmt: skip
    d.add_argument("--image-size", type=_bounded(int, 32), help="images are resized to this square size for the model")
    d.add_argument("--num-train", type=_bounded(int, 1), help="synthetic training images")
    d.add_argument("--num-val", type=_bounded(int, 1), help="synthetic validation images")
    d.add_argument(
        "--val-fraction", type=_bounded(float, 0.0, 1.0, low_open=True),
        help="folder without train/ and val/ subfolders: the share of its images used for validation",
    )  # fmt: skip
    d.add_argument("--seed", type=int, help="seed of the synthetic data and of a folder's split")
    d.add_argument("--workers", type=_bounded(int, 0), default=2, help="DataLoader workers reading the images")
    r = p.add_argument_group("run")
    r.add_argument(
        "--threshold", type=_probability, default=0.5, help="a pixel is lesion where its probability is above this"
    )
    r.add_argument("--batch-size", type=_bounded(int, 1), help="images per forward (default: the checkpoint's)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="'auto': cuda if available")
    r.add_argument(
        "--backend", default="auto", choices=("auto", *BACKEND_NAMES),
        help="sgdc_conv backend; 'auto' picks the fastest available for --device",
    )  # fmt: skip
    r.add_argument(
        "--amp",
        choices=tuple(AMP_DTYPES),
        default="none",
        help="autocast dtype (the training's reproduces its validation)",
    )
    r.add_argument("--channels-last", action="store_true", help="channels_last model and images")
    r.add_argument(
        "--threads", type=_bounded(int, 0), default=0, help="torch CPU threads; 0 keeps the default"
    )  # fmt: skip
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------------------------
# The checks: checkpoint, output folder, data, model
# ---------------------------------------------------------------------------------------------


def _written_by(ckpt: dict) -> str:
    version = ckpt.get("version")
    return f"sgdc-kernels {version}" if version else "a version of sgdc-kernels that records no version"


def read_checkpoint(path: str) -> dict:
    """The checkpoint at ``path``, checked to be sgdc-train's and to hold this version's model
    flags; raises UsageError naming --checkpoint."""
    flag = f"--checkpoint {path}"
    if not Path(path).is_file():
        raise UsageError(f"{flag}: no such file (give sgdc-train's best.pt or last.pt)")
    try:
        ckpt = load_checkpoint(path)
    except Exception as exc:
        raise UsageError(f"{flag}: not a readable checkpoint ({type(exc).__name__}: {_one_line(exc)})") from None
    if not (
        isinstance(ckpt, dict) and isinstance(ckpt.get("model_config"), dict) and isinstance(ckpt.get("model"), dict)
    ):
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            held = f"a state dict of {len(ckpt)} tensors, first {next(iter(ckpt))!r}"
        elif isinstance(ckpt, dict):
            held = f"a dict with keys {sorted(map(str, ckpt))[:6]}"
        else:
            held = f"a {type(ckpt).__name__}"
        raise UsageError(
            f"{flag}: not a checkpoint written by sgdc-train (it holds {held}); give its best.pt or last.pt"
        )
    config = ckpt["model_config"]
    if set(config) != set(MODEL_ARGS):
        raise UsageError(
            f"{flag}: its model flags are not those of sgdc-kernels {__version__} (unknown here: "
            f"{', '.join(sorted(set(config) - set(MODEL_ARGS))) or 'none'}; missing: "
            f"{', '.join(sorted(set(MODEL_ARGS) - set(config))) or 'none'}); it was written by {_written_by(ckpt)}: "
            "predict with that version"
        )
    return ckpt


def check_out(out: str) -> None:
    """--out exists as a folder, or can be made under its nearest existing parent."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if not path.exists() and parent is not None and not parent.is_dir():
        raise UsageError(f"--out {out}: cannot be made: {parent} is a file, not a folder")


def make_out(out: str) -> dict[str, Path]:
    """Create --out's masks/, edges/ and overlays/ and try a write there; {name: folder}."""
    dirs = {name: Path(out) / name for name in ("masks", "edges", "overlays")}
    try:
        for folder in dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        probe = Path(out) / f".{PROG}-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or _one_line(exc)})") from None
    return dirs


def _unique(names: list[str]) -> list[str]:
    """``names`` with later duplicates suffixed _2, _3, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


class Inputs(Dataset):
    """The images to predict, in order. An item is ("synthetic", name, label, dataset, index) or
    ("file", name, label, image path, mask path or None), its label saying where it comes from;
    ``__getitem__`` reads one and returns a dict: "name", "source" (the label) and either "error"
    (why it cannot be read) or "image" (normalized, for the model), "mask" (at the model's size, or
    None), "original" (the 8-bit RGB image at its own size, (H, W, 3)) and "true" (the boolean mask
    at that size, or None)."""

    def __init__(self, items: list[tuple], image_size: int, has_masks: bool, what: str):
        self.items, self.image_size, self.has_masks, self.what = items, image_size, has_masks, what

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        kind, name, label, source, extra = self.items[index]
        try:
            item = self._read_synthetic(source, extra) if kind == "synthetic" else self._read_file(source, extra)
        except Exception as exc:  # an unreadable file: reported and skipped by the caller
            return {"name": name, "source": label, "error": f"{type(exc).__name__}: {_one_line(exc)}"}
        return dict(item, name=name, source=label)

    @staticmethod
    def _read_synthetic(dataset, index: int) -> dict:
        from .data import normalize

        image, mask = dataset.raw(index)
        original = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
        return {"image": normalize(image), "mask": mask, "original": original, "true": mask[0] > 0.5}

    def _read_file(self, image_path: Path, mask_path: Path | None) -> dict:
        from .data import image_tensor, mask_tensor, normalize, read_image, read_mask

        im = read_image(image_path)
        if im.width == 0 or im.height == 0:
            raise ValueError("the image is empty (0 pixels)")
        original = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
        item = {"image": normalize(image_tensor(im, self.image_size)), "mask": None, "original": original, "true": None}
        if mask_path is not None:
            mk = read_mask(mask_path)
            item["mask"] = mask_tensor(mk, self.image_size)
            true = torch.frombuffer(bytearray(mk.tobytes()), dtype=torch.uint8).view(mk.height, mk.width)
            if true.shape != original.shape[:2]:  # drawn on the image: resized to it
                true = F.interpolate(true[None, None], size=original.shape[:2], mode="nearest")[0, 0]
            item["true"] = true > 127
        return item


def _defaults(args: argparse.Namespace, ckpt: dict) -> dict:
    """The checkpoint's training flags (sgdc-train's defaults for those it does not record), and
    FROM_CHECKPOINT's flags filled in ``args`` from them where not given."""
    trainer = train_parser()
    recorded = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    train_args = {a.dest: recorded.get(a.dest, a.default) for a in trainer._actions if a.dest != "help"}
    for key in FROM_CHECKPOINT:
        if getattr(args, key) is None:
            setattr(args, key, train_args[key])
    return train_args


def find_inputs(args: argparse.Namespace) -> tuple[Inputs, list[str]]:
    """The images --data names, as an Inputs, and notes to print; raises UsageError naming --data
    or --split where they name no images."""
    from .data import (
        IMAGE_EXTENSIONS,
        SyntheticLesions,
        find_pairs,
        read_image,
        scan_folder,
        split_folders,
        split_pairs,
    )

    data, split, size = args.data, args.split, args.image_size
    if data == "synthetic":
        split = split or "val"
        sets = {
            "train": SyntheticLesions(args.num_train, size, args.seed, offset=0),
            "val": SyntheticLesions(args.num_val, size, args.seed, offset=args.num_train),
        }
        items = [
            ("synthetic", f"{name}_{i:04d}", f"synthetic {name} image {i}", ds, i)
            for name, ds in sets.items()
            if split in (name, "all")
            for i in range(len(ds))
        ]
        what = f"the synthetic data set's {'images' if split == 'all' else split + ' split'} (seed {args.seed})"
        return Inputs(items, size, True, what), []
    path = Path(data)
    if not path.exists():
        raise UsageError(
            f"--data {data}: no such file or folder (expected an image, a folder of images or 'synthetic')"
        )
    if path.is_file():
        if split is not None:
            raise UsageError(f"--split {split}: --data {data} is one image, not a data set with splits")
        try:
            im = read_image(path)
        except Exception as exc:
            raise UsageError(f"--data {data}: not a readable image ({type(exc).__name__}: {_one_line(exc)})") from None
        if im.width == 0 or im.height == 0:
            raise UsageError(f"--data {data}: the image is empty (0 pixels)")
        return Inputs([("file", path.stem, str(path), path, None)], size, False, f"the image {data}"), []

    folders = split_folders(path)
    scanned = list(folders.values()) if folders else [path]
    found = []
    try:
        for folder in scanned:
            found.append(scan_folder(folder))
    except ValueError as exc:
        raise UsageError(f"--data {data}: {_one_line(exc).removeprefix('data: ')}") from None
    if not any(masks for _, masks in found):  # a folder of images
        if folders:  # train/ and val/ without masks: every image under the folder
            try:
                found = [scan_folder(path)]
            except ValueError as exc:
                raise UsageError(f"--data {data}: {_one_line(exc).removeprefix('data: ')}") from None
        images = found[0][0]
        if not images:
            raise UsageError(f"--data {data}: no images in this folder or below ({', '.join(IMAGE_EXTENSIONS)})")
        if split not in (None, "all"):
            raise UsageError(
                f"--split {split}: --data {data} holds images without masks, not a data set with splits "
                "(leave --split out to predict them all)"
            )
        items = [("file", key, str(images[key]), images[key], None) for key in sorted(images)]
        return Inputs(items, size, False, f"the {len(items)} images under {data}"), []

    notes = []
    for folder, (images, masks) in zip(scanned, found):
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise UsageError(
                f"--data {data}: the mask {masks[orphans[0]]} pairs with no image ({len(orphans)} such masks; a "
                "mask pairs with the image of its stem without the _segmentation/_lesion/_mask suffix, or of its "
                "stem under a masks/ folder)"
            )
        unpaired = sorted(set(images) - set(masks))
        if unpaired:
            notes.append(
                f"{len(unpaired)} images under {folder} have no mask and are left out, as sgdc-train leaves them "
                f"out (first {images[unpaired[0]]})"
            )
    split = split or "val"
    if split == "all":
        pairs = [p for folder in scanned for p in find_pairs(folder)]
    else:
        try:
            pairs = split_pairs(path, args.seed, args.val_fraction)[split == "val"]
        except ValueError as exc:
            raise UsageError(f"--data {data}: {_one_line(exc).removeprefix('--data: ')}") from None
    names = _unique([image.stem for image, _ in pairs])
    items = [("file", name, str(image), image, mask) for name, (image, mask) in zip(names, pairs)]
    what = f"{'all the' if split == 'all' else f'the {split} split of the'} {len(items)} image/mask pairs of {data}"
    return Inputs(items, size, True, what), notes


def load_model(args: argparse.Namespace, ckpt: dict, backend: str, device: torch.device):
    """SGD-Net built from the checkpoint's model flags, with its weights, on ``device`` in eval
    mode; raises UsageError naming --checkpoint where the weights do not fit it."""
    flag = f"--checkpoint {args.checkpoint}"
    config = argparse.Namespace(**ckpt["model_config"], pretrained=None)
    try:
        model = build_model(config, backend)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(
            f"{flag}: its model ({ckpt['model_config']}) cannot be built here ({_one_line(exc)}); it was written by "
            f"{_written_by(ckpt)}"
        ) from None
    own, theirs = model.state_dict(), ckpt["model"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    reshaped = [
        k for k in own if k in theirs and (not isinstance(theirs[k], torch.Tensor) or theirs[k].shape != own[k].shape)
    ]
    if missing or unexpected or reshaped:
        what = [f"{len(ks)} {name}, first {ks[0]!r}" for ks, name in
                ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if ks]  # fmt: skip
        raise UsageError(
            f"{flag}: its weights do not fit SGD-Net as sgdc-kernels {__version__} builds it from their model flags "
            f"({'; '.join(what)}); it was written by {_written_by(ckpt)}: predict with that version"
        )
    model.load_state_dict(theirs)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _save_png(array: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array.cpu().numpy()).save(path)


def write_outputs(item: dict, seg: torch.Tensor, edge: torch.Tensor, cut: float, dirs: dict[str, Path]) -> None:
    """The mask, edge map and overlay of one image, from its (1, S, S) seg and edge logits, at the
    image's size."""
    from .plots import overlay

    h, w = item["original"].shape[:2]
    if seg.shape[-2:] != (h, w):
        both = F.interpolate(torch.stack([seg, edge]), size=(h, w), mode="bilinear", align_corners=False)
        seg, edge = both[0], both[1]
    pred = (seg[0] > cut).cpu()
    name = item["name"] + ".png"
    _save_png(pred.to(torch.uint8) * 255, dirs["masks"] / name)
    _save_png((edge[0].sigmoid() * 255).round().to(torch.uint8), dirs["edges"] / name)
    _save_png(overlay(item["original"], pred, item["true"]), dirs["overlays"] / name)


def recorded_validation(ckpt: dict) -> dict | None:
    """The validation record of the checkpoint's epoch: the last of last.pt's history, or best.pt's
    metrics."""
    if isinstance(ckpt.get("history"), list) and ckpt["history"]:
        return ckpt["history"][-1]
    return ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else None


def is_training_validation(args: argparse.Namespace, train_args: dict, ckpt: dict) -> bool:
    """Whether this run predicts the validation split of the checkpoint's training run, as its
    validation did (so its means should equal the checkpoint's validation record)."""
    if "args" not in ckpt or args.split not in (None, "val") or args.threshold != 0.5:
        return False
    same = ["image_size"] + (["num_train", "num_val", "seed"] if args.data == "synthetic" else ["seed", "val_fraction"])
    if any(getattr(args, k) != train_args[k] for k in same):
        return False
    if args.data == "synthetic" or train_args["data"] == "synthetic":
        return args.data == train_args["data"]
    return os.path.realpath(args.data) == os.path.realpath(train_args["data"])


def prepare(args: argparse.Namespace) -> dict:
    """Every check, in the order of their cost; what the run needs."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)")
    ckpt = read_checkpoint(args.checkpoint)
    train_args = _defaults(args, ckpt)
    check_out(args.out)
    inputs, notes = find_inputs(args)
    device = resolve_device(args.device)
    backend = backend_used(args, device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = load_model(args, ckpt, backend, device)
    dirs = make_out(args.out)
    return dict(ckpt=ckpt, train_args=train_args, inputs=inputs, notes=notes, device=device, backend=backend,
                model=model, dirs=dirs)  # fmt: skip


class Writer:
    """The outputs of a run, written image by image as they are predicted: the PNGs, and one line
    of metrics.csv each (flushed) where masks are given, so an interrupted run keeps what it wrote."""

    def __init__(self, args: argparse.Namespace, dirs: dict[str, Path], has_masks: bool):
        from .metrics import MetricTracker

        self.dirs, self.written = dirs, 0
        self.cut = math.log(args.threshold / (1.0 - args.threshold))  # the threshold's logit: 0.0 at 0.5
        self.tracker = MetricTracker() if has_masks else None
        self.csv_file = self.csv = None
        if has_masks:
            self.csv_file = open(Path(args.out) / "metrics.csv", "w", newline="")
            self.csv = csv.writer(self.csv_file)
            self.csv.writerow(CSV_COLUMNS)

    def add(self, items: list[dict], seg: torch.Tensor, edge: torch.Tensor) -> None:
        """The outputs of a batch of readable ``items`` from its float32 seg and edge logits."""
        values = None
        if self.tracker is not None:
            # validation's metrics binarize logits > 0: shifted by the threshold's logit (not at 0.5)
            logits = seg if self.cut == 0.0 else seg - self.cut
            values = self.tracker.update(logits, torch.stack([item["mask"] for item in items]))
        for j, item in enumerate(items):
            write_outputs(item, seg[j], edge[j], self.cut, self.dirs)
            if values is not None:
                self.csv.writerow([item["name"], item["source"], *(repr(float(values[k][j])) for k in CSV_COLUMNS[2:])])
                self.csv_file.flush()
            self.written += 1

    def close(self) -> None:
        if self.csv_file is not None:
            self.csv_file.close()


@torch.no_grad()
def run(args: argparse.Namespace, ckpt: dict, train_args: dict, inputs: Inputs, notes: list[str], device, backend,
        model, dirs) -> int:  # fmt: skip
    """Predict every image of ``inputs``; returns the exit status: 0, or 1 where images were skipped."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    config = ckpt["model_config"]
    print(
        f"SGD-Net {config['backbone']} dim={config['dim']} depth={config['depth']} from {args.checkpoint} (epoch "
        f"{ckpt.get('epoch', '?')}), backend={backend} on {device}: {inputs.what}, at {args.image_size}x"
        f"{args.image_size}",
        flush=True,
    )
    for note in notes:
        print(f"note: {note}", flush=True)
    loader = DataLoader(
        inputs, batch_size=args.batch_size, num_workers=args.workers, collate_fn=list,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    writer = Writer(args, dirs, inputs.has_masks)
    skipped = []
    bar = tqdm(total=len(inputs), unit="image", desc="predict", dynamic_ncols=True, disable=args.no_progress)
    try:
        for batch in loader:
            for item in batch:
                if "error" in item:
                    skipped.append(item["source"])
                    tqdm.write(f"{PROG}: skipped {item['source']}: {item['error']}", file=sys.stderr)
            good = [item for item in batch if "error" not in item]
            if good:
                out = forward_eval(model, torch.stack([i["image"] for i in good]), device, args.amp, args.channels_last)
                writer.add(good, out.seg.float(), out.edge.float())
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    print(f"wrote the masks, edge maps and overlays of {writer.written} images to {args.out}", flush=True)
    if writer.tracker is not None and writer.tracker.count:
        report_means(args, ckpt, train_args, writer.tracker, compare=not skipped)
    if skipped:
        print(f"{PROG}: {len(skipped)} of {len(inputs)} images skipped (unreadable, see above)", file=sys.stderr)
        return 1
    return 0


def report_means(args: argparse.Namespace, ckpt: dict, train_args: dict, tracker, compare: bool) -> None:
    """Print the means of the per-image metrics and, where this run repeats the checkpoint's
    validation (``compare`` and is_training_validation), the validation it records beside them."""
    means = tracker.compute()
    print(
        f"mean of {tracker.count} images: IoU {means['iou']:.4f}, Dice {means['dice']:.4f}, HD95 "
        f"{means['hd95']:.2f} px (per image: {Path(args.out) / 'metrics.csv'})",
        flush=True,
    )
    record = recorded_validation(ckpt)
    if record is not None and compare and is_training_validation(args, train_args, ckpt):
        diff = max(abs(means[k] - record[k]) for k in ("iou", "dice", "hd95"))
        print(
            f"validation recorded in {args.checkpoint} (epoch {record.get('epoch', ckpt.get('epoch'))}): IoU "
            f"{record['iou']:.4f}, Dice {record['dice']:.4f}, HD95 {record['hd95']:.2f} px; largest "
            f"difference from the means above: {diff:.1e}",
            flush=True,
        )


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0, or 1 where unreadable images were skipped). A mistake
    in the arguments exits with status 2 and one line naming the flag, before any image is read
    by the model."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prepared = prepare(args)
    except UsageError as exc:
        parser.error(str(exc))
    return run(args, **prepared)


def cli() -> None:
    """Console-script entry point (``sgdc-predict``)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
