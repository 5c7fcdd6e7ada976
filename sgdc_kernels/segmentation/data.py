"""Datasets for SGD-Net: skin-lesion folders (ISIC, PH2) and a built-in synthetic lesion set.

Every dataset yields ``(image, mask)``: image float32 (3, S, S), ImageNet-normalized; mask float32
(1, S, S) in {0, 1}. Images are read with Pillow (``read_image``, ``read_mask``: 8 bits, 16-bit
images scaled) and resized by ``image_tensor`` and ``mask_tensor``, which sgdc-predict uses too;
augmentation and normalization are torchvision.transforms.v2.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

Tensor = torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# A file whose stem ends so is a mask of the image with the rest of the stem:
# ISIC "ISIC_0000000_segmentation.png" / "_Segmentation.png", PH2 "IMD002_lesion.bmp", "x_mask.png".
MASK_SUFFIX = re.compile(r"^(?P<key>.+?)[_-](segmentation|lesion|mask|gt)$", re.IGNORECASE)
# A file under a folder named so (relative to the root) is a mask with the image's stem:
# "masks/", "ISIC2018_Task1_Training_GroundTruth/", "labels/".
MASK_DIR = re.compile(r"mask|groundtruth|ground_truth|label|annotation", re.IGNORECASE)
SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "test")}


class RandomRot90(v2.Transform):
    """Rotate the image and its mask together by k * 90 degrees, k uniform in 0..3 (k in {0, 2} for
    non-square inputs, which a quarter turn would reshape). Exact: ``torch.rot90``, no resampling."""

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        k = int(torch.randint(4, ())) if h == w else 2 * int(torch.randint(2, ()))
        return {"k": k}

    def transform(self, inpt, params: dict):
        if params["k"] == 0:
            return inpt
        out = inpt.rot90(params["k"], (-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


# Paired image/mask augmentation (torchvision.transforms.v2 applies the geometric transforms to both
# and the colour jitter to the image only): random flips, quarter turns, and brightness, contrast
# and saturation within +-10%.
AUGMENT = v2.Compose(
    [
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        RandomRot90(),
        v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
    ]
)
NORMALIZE = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def augment(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """A random flip/rotation of an image in [0, 1] (3, H, W) and its mask (1, H, W), and a light
    colour jitter of the image; draws from torch's global RNG (seeded per DataLoader worker)."""
    image, mask = AUGMENT(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return image.as_subclass(Tensor).contiguous(), mask.as_subclass(Tensor).contiguous()


def normalize(image: Tensor) -> Tensor:
    """ImageNet normalization of an image in [0, 1] (the timm backbones' statistics)."""
    return NORMALIZE(image)


# ---------------------------------------------------------------------------------------------
# Synthetic lesions
# ---------------------------------------------------------------------------------------------


def _smooth_noise(size: int, cells: int, g: torch.Generator, channels: int = 1) -> Tensor:
    """Smooth random field in [0, 1]: a (cells x cells) grid of uniform noise, bicubically upsampled."""
    grid = torch.rand(1, channels, cells, cells, generator=g)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def synthetic_lesion(size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """One synthetic dermoscopy-like image in [0, 1] (3, size, size) and its mask (1, size, size).

    An irregular blob (a radius with random harmonics, 2 to 7 lobes) at a random place and scale,
    a textured brown lesion on a textured skin background, a soft rim, sometimes a few dark hairs,
    and pixel noise.
    """

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    lin = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    cx, cy = u(-0.3, 0.3), u(-0.3, 0.3)
    radius = u(0.25, 0.6)
    dx, dy = xx - cx, yy - cy
    dist = torch.sqrt(dx * dx + dy * dy)
    theta = torch.atan2(dy, dx)
    boundary = torch.ones_like(theta)
    for k in range(2, 8):
        boundary = boundary + u(0.0, 0.35 / math.sqrt(k)) * torch.cos(k * theta + u(0.0, 2 * math.pi))
    boundary = radius * boundary.clamp_min(0.3)
    # Lumpy edge: perturb the boundary radius by a smooth field too.
    boundary = boundary * (1.0 + 0.15 * (_smooth_noise(size, 6, g)[0] - 0.5))
    signed = boundary - dist  # > 0 inside
    mask = (signed > 0).float()
    alpha = torch.sigmoid(signed / u(0.008, 0.03))

    skin = torch.tensor([u(0.75, 0.95), u(0.55, 0.75), u(0.45, 0.65)]).view(3, 1, 1)
    skin = skin * (0.9 + 0.2 * _smooth_noise(size, 8, g))
    lesion = torch.tensor([u(0.25, 0.6), u(0.12, 0.4), u(0.08, 0.3)]).view(3, 1, 1)
    texture = 0.6 + 0.8 * _smooth_noise(size, 16, g) * (0.8 + 0.2 * _smooth_noise(size, 5, g, channels=3))
    lesion = lesion * texture
    # Darker globules inside the lesion.
    globules = (_smooth_noise(size, max(4, size // 6), g) > u(0.7, 0.85)).float()
    lesion = lesion * (1.0 - 0.4 * globules)
    image = skin * (1.0 - alpha) + lesion * alpha
    # Hairs: dark thin curves across the image.
    for _ in range(int(u(0, 1) < 0.4) * int(u(1, 5))):
        x0, y0, ang, bend = u(-1, 1), u(-1, 1), u(0, math.pi), u(-1.5, 1.5)
        nx, ny = -math.sin(ang), math.cos(ang)
        t = (xx - x0) * math.cos(ang) + (yy - y0) * math.sin(ang)
        off = (xx - x0) * nx + (yy - y0) * ny - bend * t * t * 0.3
        hair = torch.exp(-((off / u(0.004, 0.012)) ** 2))
        image = image * (1.0 - 0.7 * hair)
    image = image + u(0.01, 0.05) * torch.randn(3, size, size, generator=g)
    return image.clamp(0.0, 1.0), mask[None]


class SyntheticLesions(Dataset):
    """``length`` synthetic lesion images, item i a pure function of (seed, offset + i): the same
    on every run, worker and rank. Use disjoint offsets for train and validation sets."""

    def __init__(self, length: int, image_size: int = 256, seed: int = 0, offset: int = 0, train: bool = False):
        self.length, self.image_size, self.seed, self.offset, self.train = length, image_size, seed, offset, train

    def __len__(self) -> int:
        return self.length

    def raw(self, index: int) -> tuple[Tensor, Tensor]:
        """Item ``index`` before augmentation and normalization: image in [0, 1] (3, S, S), mask."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.offset + index) % (2**63))
        return synthetic_lesion(self.image_size, g)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.raw(index)
        if self.train:
            image, mask = augment(image, mask)
        return normalize(image), mask


# ---------------------------------------------------------------------------------------------
# Folders: ISIC and PH2 layouts
# ---------------------------------------------------------------------------------------------


def scan_folder(root: str | os.PathLike) -> tuple[dict[str, Path], dict[str, Path]]:
    """The image files under ``root`` (any nesting), as ({key: image}, {key: mask}): a file is a
    mask if its stem ends in a mask suffix (its key is the rest of the stem) or if it lies under a
    mask folder (its key is its stem); every other file is an image, keyed by its stem. See
    :func:`find_pairs` for the layouts; two images or two masks with one key raise ValueError."""
    root = Path(root)
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        m = MASK_SUFFIX.match(path.stem)
        rel_dirs = path.relative_to(root).parts[:-1]
        if m:
            key, table = m.group("key"), masks
        elif any(MASK_DIR.search(d) for d in rel_dirs):
            key, table = path.stem, masks
        else:
            key, table = path.stem, images
        if key in table:
            raise ValueError(f"data: two files for {key!r}: {table[key]} and {path}")
        table[key] = path
    return images, masks


def find_pairs(root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) pairs under ``root``, matched by stem, sorted by stem.

    Recognised (any nesting):
    - ISIC 2016-2018: ``ISIC_0000000.jpg`` with ``ISIC_0000000_segmentation.png`` (or
      ``_Segmentation.png``), in the same or separate folders;
    - PH2: ``IMD002/IMD002_Dermoscopic_Image/IMD002.bmp`` with ``IMD002/IMD002_lesion/IMD002_lesion.bmp``;
    - generic: ``images/x.png`` with ``masks/x.png`` (a mask folder named mask*, *groundtruth*,
      label*, annotation*), or ``x.png`` with ``x_mask.png``.
    Images without a mask are skipped; keys with two images or two masks raise.
    """
    images, masks = scan_folder(root)
    return [(images[k], masks[k]) for k in sorted(images) if k in masks]


# Pillow modes of more than 8 bits per pixel, which convert("RGB") and convert("L") clip at 255
# instead of scaling: 16-bit grayscale (PNG, TIFF), 32-bit integers, 32-bit floats.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_8bit(im):
    """An image of a mode in _WIDE_MODES as 8-bit grayscale ("L"): integers scaled from the 16-bit
    range (values above 65535 clip), floats from [0, 1] if none exceeds 1, else from the 16-bit
    range."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    full = 1.0 if im.mode == "F" and a.size and np.nanmax(a) <= 1.0 else 65535.0
    a = np.nan_to_num(a) * (255.0 / full)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str | os.PathLike):
    """The image file at ``path`` as an 8-bit RGB Pillow image: grayscale and palette images are
    expanded, an alpha channel is dropped, 16-bit and float images are scaled to 8 bits."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in _WIDE_MODES:
            im = _to_8bit(im)
        return im.convert("RGB")


def read_mask(path: str | os.PathLike):
    """The mask file at ``path`` as an 8-bit grayscale Pillow image (16-bit masks scaled to 8 bits);
    a pixel > 127 is lesion."""
    from PIL import Image

    with Image.open(path) as mk:
        mk.load()
        if mk.mode in _WIDE_MODES:
            return _to_8bit(mk)
        return mk.convert("L")


def image_tensor(im, size: int) -> Tensor:
    """An 8-bit RGB Pillow image resized (bilinear) to size x size: float32 (3, size, size) in [0, 1]."""
    from PIL import Image

    im = im.resize((size, size), Image.BILINEAR)
    image = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return image.permute(2, 0, 1).float() / 255.0


def mask_tensor(mk, size: int) -> Tensor:
    """An 8-bit grayscale Pillow mask resized (nearest) to size x size: float32 (1, size, size) in {0, 1}."""
    from PIL import Image

    mk = mk.resize((size, size), Image.NEAREST)
    mask = torch.frombuffer(bytearray(mk.tobytes()), dtype=torch.uint8).view(1, size, size)
    return (mask > 127).float()


def _load_pair(image_path: Path, mask_path: Path, size: int) -> tuple[Tensor, Tensor]:
    return image_tensor(read_image(image_path), size), mask_tensor(read_mask(mask_path), size)


class LesionFolder(Dataset):
    """Images and binary masks from ``pairs`` (see :func:`find_pairs`), resized to
    image_size x image_size, augmented when ``train``."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], image_size: int = 256, train: bool = False):
        self.pairs, self.image_size, self.train = list(pairs), image_size, train

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = _load_pair(*self.pairs[index], self.image_size)
        if self.train:
            image, mask = augment(image, mask)
        return normalize(image), mask


def _split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIRS[split]:
        for candidate in (root / name, root / name.capitalize()):
            if candidate.is_dir():
                return candidate
    return None


def split_folders(root: str | os.PathLike) -> dict[str, Path] | None:
    """{"train": folder, "val": folder} where ``root`` has both a train/ and a val/ (or
    validation/, test/) subfolder; None where it has not (its pairs are then split by
    :func:`split_pairs`)."""
    root = Path(root)
    train_dir, val_dir = _split_dir(root, "train"), _split_dir(root, "val")
    if train_dir is None or val_dir is None:
        return None
    return {"train": train_dir, "val": val_dir}


def split_pairs(
    root: str | os.PathLike, seed: int = 0, val_fraction: float = 0.2
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """The (train, val) image/mask pairs of a folder, as ``sgdc-train --data`` splits them: the
    pairs of its train/ and val/ subfolders where it has both, otherwise its pairs split by a
    seeded permutation, val_fraction of them (at least 1, not all) for validation. Raises
    ValueError where either split is empty."""
    root = Path(root)
    folders = split_folders(root)
    if folders is not None:
        train_pairs, val_pairs = find_pairs(folders["train"]), find_pairs(folders["val"])
    else:
        pairs = find_pairs(root)
        if len(pairs) < 2:
            raise ValueError(f"--data: found {len(pairs)} image/mask pairs under {root}; need at least 2")
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = min(max(1, round(val_fraction * len(pairs))), len(pairs) - 1)
        val_pairs = [pairs[i] for i in sorted(order[:n_val])]
        train_pairs = [pairs[i] for i in sorted(order[n_val:])]
    for name, pairs in (("training", train_pairs), ("validation", val_pairs)):
        if not pairs:
            raise ValueError(
                f"--data: no {name} image/mask pairs found under {root} (see sgdc_kernels.segmentation.data.find_pairs)"
            )
    return train_pairs, val_pairs


def build_datasets(
    data: str,
    image_size: int = 256,
    seed: int = 0,
    num_train: int = 512,
    num_val: int = 64,
    val_fraction: float = 0.2,
) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for ``--data``: "synthetic" (num_train + num_val generated images),
    or a folder, split by :func:`split_pairs`."""
    if data == "synthetic":
        return (
            SyntheticLesions(num_train, image_size, seed, offset=0, train=True),
            SyntheticLesions(num_val, image_size, seed, offset=num_train, train=False),
        )
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data: expected 'synthetic' or a folder, got {data!r} (not a folder)")
    train_pairs, val_pairs = split_pairs(root, seed, val_fraction)
    return LesionFolder(train_pairs, image_size, train=True), LesionFolder(val_pairs, image_size, train=False)
