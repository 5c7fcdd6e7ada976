"""SGD-Net, its losses, metrics and datasets. CPU-sized: resnet10t, dim 32, 64x64."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("sgdc_kernels.segmentation", exc_type=ImportError)  # needs the 'train' extra
timm = pytest.importorskip("timm")

from sgdc_kernels import available_backends  # noqa: E402
from sgdc_kernels.segmentation.data import SyntheticLesions, augment, build_datasets, find_pairs  # noqa: E402
from sgdc_kernels.segmentation.loop import build_optimizer, make_scaler, train_step  # noqa: E402
from sgdc_kernels.segmentation.losses import SegEdgeLoss, boundary_target, soft_dice_loss  # noqa: E402
from sgdc_kernels.segmentation.metrics import MetricTracker, hd95, per_image_metrics  # noqa: E402
from sgdc_kernels.segmentation.models import SGDNet  # noqa: E402

TINY = dict(backbone="resnet10t", dim=32, depth=1, guide_ch=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: one thread is faster than two contending on a small shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def square(h, w, top, left, size):
    m = torch.zeros(1, 1, h, w)
    m[..., top : top + size, left : left + size] = 1
    return m


# --------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("depth", [1, (1, 0, 1, 1)])
def test_forward_shapes_and_backward(depth):
    model = SGDNet(**dict(TINY, depth=depth), num_classes=2)
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.seg.shape == (2, 2, 64, 96) and out.edge.shape == (2, 1, 64, 96)
    (out.seg.mean() + out.edge.mean()).backward()
    blocks = model.sgdc_blocks()
    assert len(blocks) == sum([depth] if isinstance(depth, int) else depth)
    assert all(b.attn.weight.grad is not None for b in blocks)


def test_backend_reaches_every_block_and_bad_arguments_raise():
    model = SGDNet(**dict(TINY, depth=2), backend="unfold")
    assert {b.backend for b in model.sgdc_blocks()} == {"unfold"}
    model.set_backend("torch")
    assert {b.backend for b in model.sgdc_blocks()} == {"torch"}
    with pytest.raises(ValueError, match="backend"):
        SGDNet(**TINY, backend="nope")
    with pytest.raises(ValueError, match="depth"):
        SGDNet(**dict(TINY, depth=(1, 1)))


def test_autocast_bf16_and_channels_last():
    model = SGDNet(**TINY).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.seg.shape == (1, 1, 64, 64) and torch.isfinite(out.seg.float()).all()


def test_pretrained_from_local_file_only(tmp_path):
    source = timm.create_model("resnet10t", pretrained=False)  # a full model: fc keys are ignored
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    model = SGDNet(**TINY, pretrained=str(path))
    assert torch.equal(model.backbone.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        SGDNet(**TINY, pretrained=str(tmp_path / "missing.pth"))
    torch.save({"conv1.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="lacks"):
        SGDNet(**TINY, pretrained=str(tmp_path / "other.pth"))


# ---------------------------------------------------------------------------------- equivalence


def _steps(backend, device, dtype, steps=3):
    torch.manual_seed(0)
    model = SGDNet(**dict(TINY, depth=2), ls_init=1.0, backend=backend).to(device, dtype)
    optimizer = build_optimizer(model, 1e-3, 1e-4)
    loss_fn = SegEdgeLoss()
    ds = SyntheticLesions(4, 64, seed=3)
    batch = [torch.stack(t) for t in zip(*[ds[i] for i in range(4)])]
    losses = []
    for step in range(steps):
        images, masks = (t[(step % 2) * 2 : (step % 2) * 2 + 2].to(device, dtype) for t in batch)
        losses.append(
            train_step(model, images, masks, loss_fn, optimizer, make_scaler(torch.device(device), None))["loss"].item()
        )
    return losses


EQUIVALENCE = [
    ("torch", "cpu"),
    pytest.param("torch", "cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend,device", EQUIVALENCE)
def test_training_steps_match_unfold(backend, device):
    """A few training steps from one seed give the unfold oracle's losses (SGDC blocks with
    layer scale 1, so the op matters). float64 on CPU, float32 without TF32 on GPU."""
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        if backend not in available_backends("cuda"):
            pytest.skip(f"backend {backend!r} is not available here")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype, rtol = (torch.float64, 1e-7) if device == "cpu" else (torch.float32, 2e-3)
    expected = _steps("unfold", device, dtype)
    got = _steps(backend, device, dtype)
    assert expected[-1] < expected[0] * 1.5  # sane, finite training
    np.testing.assert_allclose(got, expected, rtol=rtol)


# ---------------------------------------------------------------------------------------- losses


def test_boundary_target_hand_computed():
    mask = square(7, 7, 2, 2, 3)  # 3x3 square in the middle
    edge = boundary_target(mask, radius=1)
    expected = square(7, 7, 1, 1, 5)  # dilation: 5x5; erosion: the centre pixel
    expected[..., 3, 3] = 0
    assert torch.equal(edge, expected)
    # The image border is not a boundary: a full mask has none.
    assert boundary_target(torch.ones(1, 1, 5, 5), 2).sum() == 0
    assert boundary_target(mask, 0).sum() == 0


def test_soft_dice_hand_computed():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1  # 4 of 16 pixels
    # p = 0.5 everywhere: intersection 2, |P| + |T| = 8 + 4 -> dice 4/12 -> loss 2/3
    assert soft_dice_loss(torch.zeros(1, 1, 4, 4), target).item() == pytest.approx(2 / 3, abs=1e-5)
    assert soft_dice_loss(100 * (2 * target - 1), target).item() == pytest.approx(0, abs=1e-5)
    # Empty target, background prediction: no loss; foreground prediction: full loss.
    empty = torch.zeros(1, 1, 4, 4)
    assert soft_dice_loss(torch.full((1, 1, 4, 4), -100.0), empty).item() == pytest.approx(0, abs=1e-5)
    assert soft_dice_loss(torch.full((1, 1, 4, 4), 100.0), empty).item() == pytest.approx(1, abs=1e-5)


def test_soft_dice_matches_monai():
    monai_losses = pytest.importorskip("monai.losses")
    logits = torch.randn(3, 1, 16, 16)
    target = (torch.rand(3, 1, 16, 16) > 0.6).float()
    target[1] = 0
    expected = monai_losses.DiceLoss(sigmoid=True)(logits, target)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_seg_edge_loss_terms_and_weights():
    mask = square(16, 16, 4, 4, 8)
    seg, edge = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    target = boundary_target(mask, 2)
    pos = target.sum()
    auto = SegEdgeLoss(bce_weight=2.0, dice_weight=0.5, edge_weight=3.0)(seg, edge, mask)
    assert auto["edge"] == pytest.approx(bce(edge, target, pos_weight=(256 - pos) / pos).item(), rel=1e-6)
    assert auto["loss"] == pytest.approx(
        (2 * bce(seg, mask) + 0.5 * soft_dice_loss(seg, mask) + 3 * auto["edge"]).item(), rel=1e-6
    )
    fixed = SegEdgeLoss(edge_pos_weight=1.0)(seg, edge, mask)
    assert fixed["edge"] == pytest.approx(bce(edge, target).item(), rel=1e-6)
    # Empty mask: no boundary pixels, pos_weight clamps to 1, everything finite.
    empty = SegEdgeLoss()(seg, edge, torch.zeros_like(mask))
    assert all(torch.isfinite(v) for v in empty.values())


# --------------------------------------------------------------------------------------- metrics


def test_iou_dice_hand_computed():
    pred = square(8, 8, 0, 0, 4)
    target = square(8, 8, 0, 2, 4)  # shifted by 2: intersection 8, union 24
    m = per_image_metrics(20 * (pred - 0.5), target)
    assert m["iou"].item() == pytest.approx(1 / 3)
    assert m["dice"].item() == pytest.approx(0.5)


def test_hd95_hand_computed_and_empty_masks():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[2, 2], b[2, 7] = True, True
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, a) == 0.0
    empty = np.zeros((10, 10), bool)
    assert hd95(empty, empty) == 0.0
    assert hd95(a, empty) == hd95(empty, a) == pytest.approx(math.hypot(10, 10))
    z = torch.zeros(2, 1, 10, 10)
    logits = torch.full_like(z, -5.0)
    logits[1, 0, 2, 2] = 5.0  # image 1: lesion predicted where there is none
    m = per_image_metrics(logits, z)
    assert m["iou"].tolist() == [1.0, 0.0] and m["dice"].tolist() == [1.0, 0.0]
    assert m["hd95"].tolist() == pytest.approx([0.0, math.hypot(10, 10)])


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # inside MONAI 1.5-1.6
def test_hd95_matches_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    g = torch.Generator().manual_seed(1)
    pool = torch.nn.functional.avg_pool2d
    for _ in range(5):
        a = pool(torch.rand(1, 1, 40, 48, generator=g), 5, 1, 2) > 0.5
        b = pool(torch.rand(1, 1, 40, 48, generator=g), 7, 1, 3) > 0.5
        expected = monai_metrics.compute_hausdorff_distance(
            a.float(), b.float(), include_background=True, percentile=95
        ).item()
        assert hd95(a[0, 0].numpy(), b[0, 0].numpy()) == pytest.approx(expected, abs=1e-5)


def _random_masks(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    pool = torch.nn.functional.avg_pool2d
    masks = pool(torch.rand(n, 1, h, w, generator=g), 5, 1, 2) > 0.5
    masks[0] = False  # empty masks too
    return masks


def test_hd95_equals_the_scipy_formula():
    """MONAI's HD95 equals the formula it replaced here: contours by a 4-connected erosion,
    Euclidean distance transforms, the larger of the two directed 95th percentiles."""
    from scipy.ndimage import binary_erosion, distance_transform_edt

    def formula(p, t):
        cp, ct = p & ~binary_erosion(p), t & ~binary_erosion(t)
        d_pt, d_tp = distance_transform_edt(~ct)[cp], distance_transform_edt(~cp)[ct]
        return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))

    preds, targets = _random_masks(6, 40, 48, 1).numpy(), _random_masks(6, 40, 48, 2).numpy()
    for p, t in zip(preds[1:, 0], targets[1:, 0]):
        assert hd95(p, t) == pytest.approx(formula(p, t), abs=1e-6)


def test_metrics_equal_the_counting_formulas():
    """MONAI's IoU and Dice with ignore_empty=False equal the pixel counts they replaced,
    including the empty-mask policy (both empty: 1; one empty: 0)."""
    pred, target = _random_masks(6, 24, 24, 3), _random_masks(6, 24, 24, 4)
    target[1] = False  # one empty, one not
    p, t = pred.flatten(1).double(), target.flatten(1).double()
    inter, n_p, n_t = (p * t).sum(1), p.sum(1), t.sum(1)
    union = n_p + n_t - inter
    iou = torch.where(union == 0, 1.0, inter / union.clamp_min(1)).double()
    dice = torch.where(union == 0, 1.0, 2 * inter / (n_p + n_t).clamp_min(1)).double()
    got = per_image_metrics(20 * (pred.double() - 0.5), target.double())
    assert got["iou"].tolist() == pytest.approx(iou.tolist(), abs=1e-6)
    assert got["dice"].tolist() == pytest.approx(dice.tolist(), abs=1e-6)
    assert got["iou"][0] == 1 and got["iou"][1] == 0 and got["dice"][1] == 0


def test_tracker_averages_per_image():
    tracker = MetricTracker()
    pred = torch.cat([square(8, 8, 0, 0, 4), square(8, 8, 0, 0, 4)])
    target = torch.cat([square(8, 8, 0, 0, 4), square(8, 8, 0, 2, 4)])
    tracker.update(20 * (pred - 0.5), target)
    result = tracker.compute()
    assert result["iou"] == pytest.approx((1 + 1 / 3) / 2) and result["dice"] == pytest.approx(0.75)
    assert math.isnan(MetricTracker().compute()["dice"])


# ------------------------------------------------------------------------------------------ data


def test_synthetic_dataset_is_deterministic_by_seed():
    a, b, c = SyntheticLesions(3, 64, seed=5), SyntheticLesions(3, 64, seed=5), SyntheticLesions(3, 64, seed=6)
    for i in range(3):
        (xa, ma), (xb, mb) = a[i], b[i]
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
        assert xa.shape == (3, 64, 64) and ma.shape == (1, 64, 64)
        assert set(ma.unique().tolist()) <= {0.0, 1.0} and 0.02 < ma.mean() < 0.9
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], a[1][0])
    train, val = build_datasets("synthetic", 64, seed=5, num_train=3, num_val=2)
    assert len(train) == 3 and len(val) == 2 and not torch.equal(val[0][1], SyntheticLesions(3, 64, seed=5)[0][1])


def test_augment_keeps_image_and_mask_aligned():
    mask = (torch.rand(1, 16, 16) > 0.5).float()
    image = (0.1 + 0.8 * mask).expand(3, -1, -1)  # grey: the jitter keeps foreground brighter
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        img, m = augment(image, mask)
        assert img.shape == image.shape and 0 <= img.min() and img.max() <= 1
        assert torch.equal(m, (img[:1] > (img.max() + img.min()) / 2).float())
        seen.add(tuple(m.flatten().tolist()))
    assert len(seen) > 3  # flips and rotations happen


def test_augment_draws_the_eight_flips_and_quarter_turns():
    """The geometric part is the dihedral group of the square, as the hand-written version was:
    all 8 images occur, the mask moves with the image, and nothing is resampled. Non-square
    inputs keep their shape (no quarter turns)."""
    mask = torch.zeros(1, 5, 5)
    mask[0, 0, :2] = 1  # an asymmetric mark: each of the 8 transforms gives another mask
    mask[0, 1, 0] = 1
    group = {
        tuple(t.flatten().tolist()) for k in range(4) for t in (mask.rot90(k, (1, 2)), mask.rot90(k, (1, 2)).flip(-1))
    }
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        img, m = augment(mask.expand(3, -1, -1), mask)
        seen.add(tuple(m.flatten().tolist()))
        assert torch.equal(m.expand(3, -1, -1) > 0.5, img > img.max() / 2)
    assert seen == group
    img, m = augment(torch.rand(3, 4, 6), torch.zeros(1, 4, 6))
    assert img.shape == (3, 4, 6) and m.shape == (1, 4, 6)


def _write(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_layouts_isic_and_ph2(tmp_path):
    rgb = np.full((20, 30, 3), 200, np.uint8)
    lesion = np.zeros((20, 30), np.uint8)
    lesion[5:15, 10:20] = 255
    isic = tmp_path / "isic"
    for i in range(5):
        _write(isic / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg", rgb)
        _write(isic / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{i:07d}_segmentation.png", lesion)
    _write(isic / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000009.jpg", rgb)  # no mask: skipped
    pairs = find_pairs(isic)
    assert [p[0].stem for p in pairs] == [f"ISIC_{i:07d}" for i in range(5)]
    assert all(m.stem == f"{i.stem}_segmentation" for i, m in pairs)
    train, val = build_datasets(str(isic), image_size=32, seed=0, val_fraction=0.4)
    assert len(train) == 3 and len(val) == 2
    image, mask = val[0]
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert mask.mean().item() == pytest.approx((16 * 11) / (32 * 32), abs=0.05)

    ph2 = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    for name in ("IMD002", "IMD003"):
        _write(ph2 / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp", rgb)
        _write(ph2 / name / f"{name}_lesion" / f"{name}_lesion.bmp", lesion)
        _write(ph2 / name / f"{name}_roi" / f"{name}_R1_Label4.bmp", lesion)
    assert [(i.name, m.name) for i, m in find_pairs(tmp_path / "PH2Dataset")] == [
        ("IMD002.bmp", "IMD002_lesion.bmp"),
        ("IMD003.bmp", "IMD003_lesion.bmp"),
    ]

    split = tmp_path / "split"
    for sub, n in (("train", 2), ("val", 1)):
        for i in range(n):
            _write(split / sub / "images" / f"{sub}{i}.png", rgb)
            _write(split / sub / "masks" / f"{sub}{i}.png", lesion)
    train, val = build_datasets(str(split), image_size=16)
    assert len(train) == 2 and len(val) == 1
