"""Tests for train/data/augment.py (seg_transforms, cls_transforms, cls_crops, randaugment): upstream
PyTorch-Encoding augmentation in numpy/PIL.

Geometry is checked against small restatements of upstream's arithmetic written here (base.py's
``_sync_transform`` / ``_val_sync_transform``, transforms.py's ECenterCrop / ERandomCrop,
torchvision's RandomResizedCrop / RandomCrop / Resize / CenterCrop), driven by a Generator with the
same seed (draws in upstream's order) or by a scripted rng. torchvision comparisons skip when
torchvision cannot be imported.
"""

from __future__ import annotations

import math
import pickle

import ml_collections
import numpy as np
import pytest
from optional_torch import torch
from PIL import Image, ImageEnhance

from train.data import augment as A
from train.data import pipeline
from train.data.synthetic import ShapesRecognition, ShapesSegmentation

MEAN = np.asarray(A.IMAGENET_MEAN, np.float32)
STD = np.asarray(A.IMAGENET_STD, np.float32)


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def coord_mask(h, w):
    """mask[y, x] = y * w + x: every pixel names its source position."""
    return np.arange(h * w, dtype=np.int32).reshape(h, w)


def norm(image_uint8, mean=MEAN, std=STD):
    unit = image_uint8.astype(np.float32) / np.float32(255)
    return (unit - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pil_resize(image, w, h, resample=Image.Resampling.BILINEAR):
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample))


class ScriptedRng:
    """Stands in for np.random.Generator with scripted answers (only the methods the code calls)."""

    def __init__(self, random=(), integers=(), uniform=()):
        self._random, self._integers, self._uniform = list(random), list(integers), list(uniform)

    def random(self):
        return self._random.pop(0)

    def integers(self, lo, hi=None, size=None):
        value = self._integers.pop(0)
        assert lo <= value < hi, (lo, value, hi)
        return value

    def uniform(self, lo, hi):
        return self._uniform.pop(0)


def torchvision_or_skip():
    try:
        import torchvision.transforms as T
        import torchvision.transforms.functional as F  # noqa: F401
    except Exception as err:  # absent, or an extension built for another torch
        pytest.skip(f"torchvision unavailable: {err!r}")
    return T, F


# == segmentation: train =============================================================================


def upstream_sync_restated(image, mask, base, crop, seed, mask_pad=-1):
    """base.py ``_sync_transform`` restated with numpy/PIL, draws from Generator(seed)."""
    r = np.random.default_rng(seed)
    if r.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    h, w = mask.shape
    long_size = int(r.integers(int(base * 0.5), int(base * 2.0) + 1))
    if h > w:
        oh, ow = long_size, int(1.0 * w * long_size / h + 0.5)
    else:
        ow, oh = long_size, int(1.0 * h * long_size / w + 0.5)
    image = pil_resize(image, ow, oh)
    mask = np.asarray(
        Image.fromarray(np.ascontiguousarray(mask)).resize((ow, oh), Image.Resampling.NEAREST)
    )
    if min(ow, oh) < crop:
        padh, padw = max(crop - oh, 0), max(crop - ow, 0)
        image = np.pad(image, ((0, padh), (0, padw), (0, 0)))
        mask = np.pad(mask, ((0, padh), (0, padw)), constant_values=mask_pad)
    hh, ww = mask.shape
    x1 = int(r.integers(0, ww - crop + 1))
    y1 = int(r.integers(0, hh - crop + 1))
    return norm(image[y1 : y1 + crop, x1 : x1 + crop]), mask[y1 : y1 + crop, x1 : x1 + crop]


@pytest.mark.parametrize("shape", [(30, 44), (44, 30), (25, 25)])
def test_seg_train_matches_upstream_restatement(shape):
    h, w = shape
    image, mask = random_image(h, w, seed=h), coord_mask(h, w)
    t = A.UpstreamSegTrain(base_size=24, crop_size=20)
    for seed in range(12):
        out = t({"image": image, "mask": mask}, np.random.default_rng(seed))
        exp_image, exp_mask = upstream_sync_restated(image, mask, 24, 20, seed)
        assert out["image"].shape == (20, 20, 3) and out["image"].dtype == np.float32
        assert out["mask"].shape == (20, 20) and out["mask"].dtype == np.int32
        np.testing.assert_array_equal(out["image"], exp_image)
        np.testing.assert_array_equal(out["mask"], exp_mask)


def test_seg_train_long_side_range_is_inclusive():
    t = A.UpstreamSegTrain(base_size=10, crop_size=4)
    assert t.long_side_range() == (5, 20)
    longs = {
        max(p["width"], p["height"])
        for p in (t.params(6, 9, np.random.default_rng(s)) for s in range(600))
    }
    assert longs == set(range(5, 21))
    t = A.UpstreamSegTrain(
        base_size=9, crop_size=4, scale=(0.5, 2.0)
    )  # int(4.5) = 4, int(18.0) = 18
    assert t.long_side_range() == (4, 18)


def test_seg_train_scaled_size_rounds_half_up_like_upstream():
    # h > w: height is the long side; otherwise (landscape and square) the width is.
    assert A.UpstreamSegTrain.scaled_size(3, 2, 7) == (
        7,
        5,
    )  # 2*7/3 = 4.67 -> 5 (truncation gives 4)
    assert A.UpstreamSegTrain.scaled_size(2, 3, 7) == (5, 7)
    assert A.UpstreamSegTrain.scaled_size(4, 4, 9) == (9, 9)
    assert A.UpstreamSegTrain.scaled_size(4, 2, 5) == (
        5,
        3,
    )  # 2.5 -> 3 (round half up, not to even)
    for w in range(1, 13):
        for h in range(1, 13):
            for long_size in (5, 8, 13, 20):
                short = max(
                    1, math.floor(min(w, h) * long_size / max(w, h) + 0.5)
                )  # upstream: a 0 px side
                expected = (short, long_size) if h > w else (long_size, short)
                assert A.UpstreamSegTrain.scaled_size(w, h, long_size) == expected


def test_seg_train_pads_bottom_right_with_black_and_mask_pad():
    image = np.full((6, 10, 3), 255, np.uint8)  # landscape: long side is the width
    mask = np.full((6, 10), 7, np.int32)
    # no flip; long side 10 (base 10 -> [5, 20]) -> (10, 6); crop 8 pads 2 rows; x=1 of [0, 2], y=2 of [0, 0]
    rng = ScriptedRng(random=[0.9], integers=[10, 1, 0])
    out = A.UpstreamSegTrain(base_size=10, crop_size=8)({"image": image, "mask": mask}, rng)
    assert out["mask"].shape == (8, 8)
    np.testing.assert_array_equal(out["mask"][:6], 7)
    np.testing.assert_array_equal(out["mask"][6:], -1)
    np.testing.assert_allclose(
        out["image"][:6], np.broadcast_to((1 - MEAN) / STD, (6, 8, 3)), rtol=1e-6
    )
    np.testing.assert_allclose(out["image"][6:], np.broadcast_to(-MEAN / STD, (2, 8, 3)), rtol=1e-6)
    # upstream VOC: padding is background 0
    rng = ScriptedRng(
        random=[0.9], integers=[5, 0, 0]
    )  # long 5 -> (5, 3): pad 3 cols right, 5 rows below
    out = A.UpstreamSegTrain(base_size=10, crop_size=8, mask_pad=0)(
        {"image": image, "mask": mask}, rng
    )
    expected = np.zeros((8, 8), np.int32)
    expected[:3, :5] = 7
    np.testing.assert_array_equal(out["mask"], expected)
    np.testing.assert_array_equal(out["image"][:3, :5] > 0, True)
    np.testing.assert_allclose(out["image"][3:], np.broadcast_to(-MEAN / STD, (5, 8, 3)), rtol=1e-6)


def test_seg_train_flip_and_crop_offsets():
    mask = coord_mask(8, 8)
    image = random_image(8, 8)
    # flip; long side 8 (= input: no resample); crop 4 at x=3, y=1
    rng = ScriptedRng(random=[0.1], integers=[8, 3, 1])
    out = A.UpstreamSegTrain(base_size=8, crop_size=4)({"image": image, "mask": mask}, rng)
    np.testing.assert_array_equal(out["mask"], mask[:, ::-1][1:5, 3:7])
    np.testing.assert_array_equal(out["image"], norm(image[:, ::-1][1:5, 3:7]))
    # every crop stays in bounds
    t = A.UpstreamSegTrain(base_size=8, crop_size=6)
    for seed in range(50):
        p = t.params(8, 5, np.random.default_rng(seed))
        assert 0 <= p["x"] <= max(p["width"], 6) - 6 and 0 <= p["y"] <= max(p["height"], 6) - 6


def test_seg_train_determinism_and_rng_required():
    ex = {"image": random_image(20, 30), "mask": coord_mask(20, 30)}
    t = A.UpstreamSegTrain(base_size=20, crop_size=16)
    a, b = t(ex, np.random.default_rng(5)), t(ex, np.random.default_rng(5))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    others = [t(ex, np.random.default_rng(s))["mask"] for s in range(6, 10)]
    assert any(not np.array_equal(a["mask"], o) for o in others)
    with pytest.raises(ValueError, match="needs an rng"):
        t(ex, None)
    # A mask of another size (TFDS mock data) is aligned to the image first, nearest neighbour, as
    # upstream's resize to image-derived sizes does: the same output as the pre-aligned mask.
    small = coord_mask(10, 15)
    aligned = A.align_mask(small, (20, 30))
    np.testing.assert_array_equal(aligned, small.repeat(2, 0).repeat(2, 1))
    got = t({"image": ex["image"], "mask": small}, np.random.default_rng(3))
    want = t({"image": ex["image"], "mask": aligned}, np.random.default_rng(3))
    np.testing.assert_array_equal(got["mask"], want["mask"])
    with pytest.raises(ValueError, match="integer"):
        A.align_mask(np.zeros((4, 4), np.float32), (4, 4))


# == segmentation: val / testval ======================================================================


def test_seg_val_geometry_truncates_and_rounds_centre_half_to_even():
    t = A.UpstreamSegVal(crop_size=4)
    # w > h: height -> 4, width int(9*4/4) = 9; x = round(2.5) = 2 (Python round), y = 0
    assert t.geometry(height=4, width=9) == {"width": 9, "height": 4, "x": 2, "y": 0}
    assert t.geometry(height=4, width=11) == {
        "width": 11,
        "height": 4,
        "x": 4,
        "y": 0,
    }  # round(3.5) = 4
    # truncation, no +0.5: 10*4/3 = 13.33 -> 13 and 5*4/3 = 6.67 -> 6
    assert t.geometry(height=3, width=10) == {"width": 13, "height": 4, "x": 4, "y": 0}
    assert t.geometry(height=5, width=3) == {"width": 4, "height": 6, "x": 0, "y": 1}
    for h in range(1, 15):
        for w in range(1, 15):
            if w > h:
                ow, oh = int(1.0 * w * 4 / h), 4
            else:
                ow, oh = 4, int(1.0 * h * 4 / w)
            g = t.geometry(h, w)
            assert (g["width"], g["height"]) == (ow, oh)
            assert (g["x"], g["y"]) == (int(round((ow - 4) / 2.0)), int(round((oh - 4) / 2.0)))


def test_seg_val_output_matches_restatement():
    image, mask = random_image(4, 9), coord_mask(4, 9)
    out = A.UpstreamSegVal(crop_size=4)(
        {"image": image, "mask": mask}, None
    )  # no resample: exact slice
    np.testing.assert_array_equal(out["mask"], mask[:, 2:6])
    np.testing.assert_array_equal(out["image"], norm(image[:, 2:6]))
    image, mask = random_image(17, 23, seed=3), coord_mask(17, 23)
    out = A.UpstreamSegVal(crop_size=8, interpolation="bicubic")({"image": image, "mask": mask})
    ow = int(23 * 8 / 17)
    x = int(round((ow - 8) / 2.0))
    exp_image = pil_resize(image, ow, 8, Image.Resampling.BICUBIC)[:, x : x + 8]
    exp_mask = np.asarray(Image.fromarray(mask).resize((ow, 8), Image.Resampling.NEAREST))[
        :, x : x + 8
    ]
    np.testing.assert_array_equal(out["image"], norm(exp_image))
    np.testing.assert_array_equal(out["mask"], exp_mask)
    assert out["image"].dtype == np.float32 and out["mask"].dtype == np.int32


def test_seg_testval_is_full_image_normalised():
    image, mask = random_image(13, 21), coord_mask(13, 21) - 5
    out = A.UpstreamSegTestval()({"image": image, "mask": mask[..., None]})
    np.testing.assert_array_equal(out["image"], norm(image))
    np.testing.assert_array_equal(out["mask"], mask)
    assert out["image"].dtype == np.float32 and out["mask"].dtype == np.int32
    # torch's ToTensor + Normalize, channels last
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(A.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(A.IMAGENET_STD).view(
        3, 1, 1
    )
    np.testing.assert_allclose(out["image"], x.permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)


# == recognition building blocks ======================================================================


def test_ecentercrop_geometry():
    t = A.ECenterCrop(32)
    # side = 32/64 * 80 = 40 on a 100 x 80 (H x W) image: top 30, left 20
    assert t.box(height=100, width=80) == (20, 30, 60, 70)
    # fractional side 224/256 * 75 = 65.625: left = round(17.1875) = 17, top = round(4.6875) = 5,
    # right = round(82.625) = 83, bottom = round(70.625) = 71 (PIL rounds the float box)
    assert A.ECenterCrop(224).box(height=75, width=100) == (17, 5, 83, 71)
    image = random_image(75, 100)
    out = A.ECenterCrop(24)(image)
    side = 24 / 56 * 75
    top, left = int(round((75 - side) / 2)), int(round((100 - side) / 2))
    crop = image[top : int(round(top + side)), left : int(round(left + side))]
    np.testing.assert_array_equal(out, pil_resize(crop, 24, 24, Image.Resampling.BICUBIC))
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def erandom_box_restated(h, w, seed):
    """transforms.py ERandomCrop's box, restated (area [0.1, 1], aspect [3/4, 4/3], 10 attempts)."""
    r = np.random.default_rng(seed)
    min_area, max_area = 0.1 * w * h, 1.0 * w * h
    for _ in range(10):
        a = r.uniform(3 / 4, 4 / 3)
        lo = int(round(math.sqrt(min_area / a)))
        hi = int(round(math.sqrt(max_area / a)))
        if hi * a > w:
            hi = int((w + 0.5 - 1e-7) / a)
            if hi * a > w:
                hi -= 1
        hi = min(hi, h)
        lo = min(lo, hi)
        ch = int(round(r.uniform(lo, hi)))
        cw = int(round(ch * a))
        if not (min_area <= cw * ch <= max_area) or cw > w or ch > h or cw * ch < 0.1 * w * h:
            continue
        if (cw, ch) == (w, h):
            return None
        return int(r.integers(0, w - cw + 1)), int(r.integers(0, h - ch + 1)), cw, ch
    return None


def test_erandomcrop_geometry_and_fallback():
    t = A.ERandomCrop(16)
    for h, w in [(40, 60), (60, 40), (7, 9)]:
        for seed in range(40):
            box = t.box(h, w, np.random.default_rng(seed))
            assert box == erandom_box_restated(h, w, seed)
            if box is not None:
                x, y, cw, ch = box
                assert 0 <= x <= w - cw and 0 <= y <= h - ch
                assert 0.1 * h * w <= cw * ch <= h * w
    image = random_image(40, 60)
    seed = next(s for s in range(40) if erandom_box_restated(40, 60, s) is not None)
    x, y, cw, ch = erandom_box_restated(40, 60, seed)
    np.testing.assert_array_equal(
        t(image, np.random.default_rng(seed)),
        pil_resize(image[y : y + ch, x : x + cw], 16, 16, Image.Resampling.BICUBIC),
    )
    # a 1-pixel-high strip cannot hold 10% of its area at aspect [3/4, 4/3]: ECenterCrop fallback
    strip = random_image(1, 50)
    assert t.box(1, 50, np.random.default_rng(0)) is None
    np.testing.assert_array_equal(t(strip, np.random.default_rng(0)), A.ECenterCrop(16)(strip))


def test_lighting_matches_formula_and_upstream_torch():
    image01 = random_image(5, 6).astype(np.float32) / 255
    out = A.Lighting(0.1)(image01, np.random.default_rng(3))
    alpha = np.random.default_rng(3).normal(0, 0.1, 3)
    eigval = np.array([0.2175, 0.0188, 0.0045])
    eigvec = np.array(
        [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    )
    rgb = np.array([sum(eigvec[c, j] * alpha[j] * eigval[j] for j in range(3)) for c in range(3)])
    np.testing.assert_allclose(out, image01 + rgb, rtol=0, atol=1e-6)
    # upstream's torch expression on a CHW tensor
    ev, evec, a = (
        torch.tensor(eigval).float(),
        torch.tensor(eigvec).float(),
        torch.tensor(alpha).float(),
    )
    delta = (
        evec.clone().mul(a.view(1, 3).expand(3, 3)).mul(ev.view(1, 3).expand(3, 3)).sum(1).squeeze()
    )
    ref = torch.from_numpy(image01).permute(2, 0, 1).add(delta.view(3, 1, 1))
    np.testing.assert_allclose(out, ref.permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(A.Lighting(0.0)(image01, None), image01)


def test_colorjitter_params_and_pil_semantics():
    t = A.ColorJitter(0.4, 0.4, 0.4)
    orders = set()
    for seed in range(60):
        order, factors = t.params(np.random.default_rng(seed))
        assert sorted(order) == [0, 1, 2, 3]
        assert all(0.6 <= f <= 1.4 for f in factors)
        orders.add(tuple(i for i in order if i < 3))
    assert len(orders) == 6  # every order of the three adjustments occurs
    assert A.ColorJitter(0.0, 1.5, 0.0).params(np.random.default_rng(0))[1][::2] == (None, None)
    image = random_image(9, 11)
    out = t(image, np.random.default_rng(4))
    order, (b, c, s) = t.params(np.random.default_rng(4))
    pil = Image.fromarray(image)
    enhancers = {
        0: (ImageEnhance.Brightness, b),
        1: (ImageEnhance.Contrast, c),
        2: (ImageEnhance.Color, s),
    }
    for i in order:
        if i < 3:
            pil = enhancers[i][0](pil).enhance(enhancers[i][1])
    np.testing.assert_array_equal(out, np.asarray(pil))
    assert out.dtype == np.uint8 and out.shape == image.shape


def test_randomresizedcrop_and_randomcrop_geometry():
    t = A.RandomResizedCrop(8)
    for seed in range(50):
        top, left, h, w = t.box(30, 40, np.random.default_rng(seed))
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w and h > 0 and w > 0
    # torchvision's central fallback (every try too large), aspect clamped to the ratio range
    big = A.RandomResizedCrop(8, scale=(5.0, 5.0))
    assert big.box(30, 40, np.random.default_rng(0)) == (0, 0, 30, 40)
    assert big.box(10, 40, np.random.default_rng(0)) == (0, 13, 10, 13)  # w = round(10 * 4/3)
    assert big.box(40, 10, np.random.default_rng(0)) == (13, 0, 13, 10)  # h = round(10 / (3/4))
    image = random_image(6, 6)
    out = A.RandomCrop(6, padding=2)(image, np.random.default_rng(1))
    r = np.random.default_rng(1)
    top, left = int(r.integers(0, 5)), int(r.integers(0, 5))
    np.testing.assert_array_equal(
        out, np.pad(image, ((2, 2), (2, 2), (0, 0)))[top : top + 6, left : left + 6]
    )
    with pytest.raises(ValueError, match="larger than the padded image"):
        A.RandomCrop(20, padding=2)(image, np.random.default_rng(0))


def test_resize_and_centercrop_geometry():
    assert A.Resize(8).output_size(height=10, width=25) == (8, 20)
    assert A.Resize(8).output_size(height=25, width=10) == (20, 8)
    assert A.Resize(7).output_size(height=10, width=13) == (7, 9)  # 7*13/10 = 9.1 -> 9
    image = random_image(9, 12)
    np.testing.assert_array_equal(
        A.CenterCrop(4)(image), image[2:6, 4:8]
    )  # round(2.5) = 2, round(4.0)
    small = A.CenterCrop(5)(random_image(2, 3))
    assert small.shape == (5, 5, 3) and small[0].sum() == 0 and small[-1].sum() == 0


def test_torchvision_parity():
    T, F = torchvision_or_skip()
    image = random_image(37, 53, seed=7)
    pil = Image.fromarray(image)
    for size in (20, 37, 40):
        np.testing.assert_array_equal(A.Resize(size)(image), np.asarray(T.Resize(size)(pil)))
    np.testing.assert_array_equal(A.CenterCrop(30)(image), np.asarray(T.CenterCrop(30)(pil)))
    np.testing.assert_array_equal(A.CenterCrop(60)(image), np.asarray(T.CenterCrop(60)(pil)))
    out = A.MincVal(40, 32)({"image": image, "label": 1})["image"]
    ref = T.Compose(
        [T.Resize(40), T.CenterCrop(32), T.ToTensor(), T.Normalize(A.IMAGENET_MEAN, A.IMAGENET_STD)]
    )(pil)
    np.testing.assert_allclose(out, ref.permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)
    # ColorJitter: same order and factors -> the same pixels as torchvision's adjust_* on PIL
    order, (b, c, s) = A.ColorJitter(0.4, 0.4, 0.4).params(np.random.default_rng(2))
    ref_pil = pil
    for i in order:
        fn = {
            0: lambda x: F.adjust_brightness(x, b),
            1: lambda x: F.adjust_contrast(x, c),
            2: lambda x: F.adjust_saturation(x, s),
            3: lambda x: x,
        }[i]
        ref_pil = fn(ref_pil)
    np.testing.assert_array_equal(A.ColorJitter.apply(image, order, (b, c, s)), np.asarray(ref_pil))
    # RandomResizedCrop: crop + bilinear resize, and the central fallback box
    top, left, h, w = A.RandomResizedCrop(16).box(37, 53, np.random.default_rng(3))
    np.testing.assert_array_equal(
        A.RandomResizedCrop(16)(image, np.random.default_rng(3)),
        np.asarray(F.resized_crop(pil, top, left, h, w, [16, 16])),
    )
    for shape in [(30, 40), (10, 40), (40, 10)]:
        strip = Image.fromarray(random_image(*shape))
        assert A.RandomResizedCrop(8, scale=(5.0, 5.0)).box(
            *shape, np.random.default_rng(0)
        ) == T.RandomResizedCrop.get_params(strip, scale=(5.0, 5.0), ratio=(3 / 4, 4 / 3))
    # RandomCrop(32, padding=4) at a given offset
    cifar = random_image(32, 32)
    r = np.random.default_rng(9)
    top, left = int(r.integers(0, 9)), int(r.integers(0, 9))
    np.testing.assert_array_equal(
        A.RandomCrop(32, padding=4)(cifar, np.random.default_rng(9)),
        np.asarray(F.crop(F.pad(Image.fromarray(cifar), 4), top, left, 32, 32)),
    )


# == RandAugment ======================================================================================


def test_rand_augment_op_list_and_magnitudes():
    assert A.RAND_AUGMENT_OPS == (
        "AutoContrast",
        "Equalize",
        "Invert",
        "Rotate",
        "Posterize",
        "Solarize",
        "SolarizeAdd",
        "Color",
        "Contrast",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "CutoutAbs",
        "TranslateXabs",
        "TranslateYabs",
    )
    assert A.rand_augment_value("Rotate", 12) == pytest.approx(12.0)
    assert A.rand_augment_value("Color", 12) == pytest.approx(0.1 + 0.4 * 1.8)
    assert (
        A.rand_augment_value("Solarize", 30) == 256.0 and A.rand_augment_value("Solarize", 0) == 0.0
    )
    assert A.rand_augment_value("TranslateXabs", 15) == pytest.approx(50.0)
    image = random_image(24, 20)
    for name in A.RAND_AUGMENT_OPS:
        for m in (0, 30):
            out = A.rand_augment_op(image, name, m, np.random.default_rng(0))
            assert out.shape == image.shape and out.dtype == np.uint8, (name, m)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(A.rand_augment_op(image, "Invert", 12, rng), 255 - image)
    np.testing.assert_array_equal(A.rand_augment_op(image, "Posterize", 0, rng), 0)  # 0 bits
    np.testing.assert_array_equal(A.rand_augment_op(image, "Posterize", 30, rng), image & 0xF0)
    np.testing.assert_array_equal(
        A.rand_augment_op(image, "Solarize", 30, rng), image
    )  # threshold 256
    np.testing.assert_array_equal(A.rand_augment_op(image, "Solarize", 0, rng), 255 - image)
    added = np.clip(image.astype(int) + 44, 0, 255)
    np.testing.assert_array_equal(
        A.rand_augment_op(image, "SolarizeAdd", 12, rng), np.where(added < 128, added, 255 - added)
    )
    # translations by a whole number of pixels, either sign
    shifted = A.rand_augment_op(image, "TranslateXabs", 3, np.random.default_rng(0))  # 10 px
    assert np.array_equal(shifted[:, :10], image[:, 10:]) or np.array_equal(
        shifted[:, 10:], image[:, :10]
    )
    cut = A.rand_augment_op(
        np.zeros((30, 30, 3), np.uint8), "CutoutAbs", 30, np.random.default_rng(1)
    )
    ys, xs = np.nonzero(cut[..., 0])
    assert (cut[ys, xs] == (125, 123, 114)).all() and 0 < len(ys) <= 41 * 41


def test_rand_augment_sampling():
    image = random_image(16, 16)
    np.testing.assert_array_equal(A.RandAugment(0, 12)(image, None), image)
    t = A.RandAugment(2, 12)
    outs = [t(image, np.random.default_rng(s)) for s in range(30)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    np.testing.assert_array_equal(outs[3], t(image, np.random.default_rng(3)))
    unchanged = sum(np.array_equal(o, image) for o in outs)
    assert 0 < unchanged < 30  # each op is skipped with probability 1/2 on average


# == example transforms ===============================================================================

RECOGNITION_TRAIN = [
    A.ImageNetTrain(24),
    A.ImageNetTrain(24, rand_aug=(2, 12)),
    A.ImageNetTrain(24, etrans=False),
    A.CifarTrain(24),
    A.MincTrain(30, 24),
]
RECOGNITION_VAL = [A.ImageNetVal(24), A.ImageNetVal(24, etrans=False), A.MincVal(30, 24)]


@pytest.mark.parametrize("t", RECOGNITION_TRAIN, ids=lambda t: type(t).__name__)
def test_recognition_train_shapes_and_determinism(t):
    ex = {"image": random_image(40, 56), "label": 3}
    a = t(ex, np.random.default_rng(11))
    assert a["image"].shape == (24, 24, 3) and a["image"].dtype == np.float32
    assert a["label"].dtype == np.int32 and a["label"].shape == () and a["label"] == 3
    np.testing.assert_array_equal(a["image"], t(ex, np.random.default_rng(11))["image"])
    assert not np.array_equal(a["image"], t(ex, np.random.default_rng(12))["image"])
    assert pickle.loads(pickle.dumps(t)) == t
    with pytest.raises(ValueError, match="needs an rng"):
        t(ex, None)


@pytest.mark.parametrize("t", RECOGNITION_VAL, ids=lambda t: type(t).__name__)
def test_recognition_val_shapes(t):
    ex = {"image": random_image(40, 56)[..., :1], "label": 2}  # grayscale becomes RGB
    out = t(ex, None)
    assert (
        out["image"].shape == (24, 24, 3) and out["image"].dtype == np.float32 and out["label"] == 2
    )


def test_imagenet_train_pipeline_order():
    """ImageNetTrain = ERandomCrop -> flip -> ColorJitter -> Lighting -> normalise, from one rng."""
    image = random_image(40, 56)
    out = A.ImageNetTrain(24)({"image": image, "label": 0}, np.random.default_rng(8))["image"]
    r = np.random.default_rng(8)
    x = A.ERandomCrop(24)(image, r)
    if r.random() < 0.5:
        x = x[:, ::-1]
    x = A.ColorJitter(0.4, 0.4, 0.4)(x, r)
    x = A.Lighting(0.1)(x.astype(np.float32) / 255, r)
    np.testing.assert_allclose(out, (x - MEAN) / STD, rtol=0, atol=1e-6)
    val = A.ImageNetVal(24)({"image": image, "label": 0})["image"]
    np.testing.assert_array_equal(val, norm(A.ECenterCrop(24)(image)))


def test_cifar_uses_cifar_statistics():
    image = random_image(32, 32)
    out = A.CifarVal()({"image": image, "label": 0})["image"]
    np.testing.assert_array_equal(out, norm(image, A.CIFAR_MEAN, A.CIFAR_STD))
    train = A.CifarTrain()({"image": image, "label": 0}, np.random.default_rng(0))["image"]
    assert train.shape == (32, 32, 3)


# == bad arguments ====================================================================================


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: A.UpstreamSegTrain(0, 10), "base_size"),
        (lambda: A.UpstreamSegTrain(10, 2.5), "crop_size"),
        (lambda: A.UpstreamSegTrain(10, 8, scale=(2.0, 0.5)), "scale"),
        (lambda: A.UpstreamSegTrain(10, 8, scale=(0.01, 1.0)), "scale"),
        (lambda: A.UpstreamSegTrain(10, 8, mask_pad=0.5), "mask_pad"),
        (lambda: A.UpstreamSegTrain(10, 8, mean=(0.5, 0.5)), "mean"),
        (lambda: A.UpstreamSegTrain(10, 8, std=(1.0, 0.0, 1.0)), "std"),
        (lambda: A.UpstreamSegVal(8, interpolation="lanczos"), "interpolation"),
        (lambda: A.UpstreamSegVal(-1), "crop_size"),
        (lambda: A.UpstreamSegTestval(std=(1, 1)), "std"),
        (lambda: A.ECenterCrop(0), "crop_size"),
        (lambda: A.ERandomCrop(8, min_covered=0), "min_covered"),
        (lambda: A.ERandomCrop(8, area_range=(0.5, 0.1)), "area_range"),
        (lambda: A.ColorJitter(brightness=-0.1), "brightness"),
        (lambda: A.Lighting(alphastd=-1), "alphastd"),
        (lambda: A.RandAugment(n=-1), "n"),
        (lambda: A.RandAugment(n=2, m=31), "m"),
        (lambda: A.RandomCrop(32, padding=-4), "padding"),
        (lambda: A.RandomResizedCrop(8, ratio=(0, 1)), "ratio"),
        (lambda: A.ImageNetTrain(24, rand_aug=(2, 40)), "m"),
        (lambda: A.ImageNetTrain(24, rand_aug=5), "rand_aug"),
        (lambda: A.ImageNetTrain(24, jitter=-1), "jitter"),
        (lambda: A.ImageNetTrain(24, lighting=float("nan")), "lighting"),
        (lambda: A.CifarTrain(32, padding=-1), "padding"),
        (lambda: A.MincTrain(0, 24), "base_size"),
        (lambda: A.MincVal(30, 0), "crop_size"),
        (lambda: A.rand_augment_value("Blur", 3), "name"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, arg):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        build()


def test_bad_examples():
    t = A.UpstreamSegVal(8)
    with pytest.raises(ValueError, match="uint8"):
        t({"image": np.zeros((8, 8, 3), np.float32), "mask": np.zeros((8, 8), np.int32)})
    with pytest.raises(ValueError, match="integer"):
        t({"image": np.zeros((8, 8, 3), np.uint8), "mask": np.zeros((8, 8), np.float32)})


# == config dispatch ==================================================================================


def input_config(**kw):
    return ml_collections.ConfigDict(kw)


def test_transform_from_config_defaults_to_basic():
    for task, cls in (
        ("segmentation", pipeline.SegmentationTransform),
        ("recognition", pipeline.RecognitionTransform),
    ):
        for train in (True, False):
            t = pipeline.transform_from_config(
                input_config(flip=True, scale_range=(0.5, 2.0)),
                task=task,
                image_size=16,
                train=train,
            )
            assert type(t) is cls and t.train is train
    t = pipeline.transform_from_config(
        input_config(augment="basic"), task="segmentation", image_size=16, train=True
    )
    assert type(t) is pipeline.SegmentationTransform


def test_transform_from_config_upstream_recipes():
    cfg = input_config(
        augment="upstream", base_size=64, mask_pad=0, flip=False, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    train = pipeline.transform_from_config(cfg, task="segmentation", image_size=48, train=True)
    assert train == A.UpstreamSegTrain(
        64, 48, flip=False, mask_pad=0, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    val = pipeline.transform_from_config(cfg, task="segmentation", image_size=48, train=False)
    assert val == A.UpstreamSegVal(48, mean=(0.5,) * 3, std=(0.25,) * 3)
    default = pipeline.transform_from_config(
        input_config(augment="upstream"), task="segmentation", image_size=480, train=True
    )
    assert (default.base_size, default.crop_size, default.mask_pad, default.scale) == (
        520,
        480,
        -1,
        (0.5, 2.0),
    )
    assert pipeline.testval_transform(input_config()) == A.UpstreamSegTestval()

    rec = lambda **kw: pipeline.transform_from_config(
        input_config(**kw),
        task="recognition",  # noqa: E731
        image_size=224,
        train=kw.pop("train", True),
    )
    assert rec(augment="imagenet", rand_augment=(0, 0)) == A.ImageNetTrain(224, rand_aug=None)
    assert rec(
        augment="imagenet", rand_augment=(2, 12), color_jitter=0.3, lighting=0.0
    ) == A.ImageNetTrain(224, rand_aug=(2, 12), jitter=0.3, lighting=0.0)
    assert rec(augment="imagenet", train=False) == A.ImageNetVal(224)
    assert rec(augment="cifar") == A.CifarTrain(224, mean=A.CIFAR_MEAN, std=A.CIFAR_STD)
    assert rec(augment="cifar", train=False) == A.CifarVal()
    assert rec(augment="minc") == A.MincTrain(256, 224)  # base int(224 / 0.875)
    assert rec(augment="minc", base_size=300, train=False) == A.MincVal(300, 224)


def test_transform_from_config_rejects_unknown_names():
    with pytest.raises(
        ValueError, match=r"config.input.augment must be one of \['basic', 'upstream'\]"
    ):
        pipeline.transform_from_config(
            input_config(augment="imagenet"), task="segmentation", image_size=16, train=True
        )
    with pytest.raises(ValueError, match=r"\['basic', 'imagenet', 'cifar', 'minc'\]"):
        pipeline.transform_from_config(
            input_config(augment="autoaug"), task="recognition", image_size=16, train=True
        )
    with pytest.raises(ValueError, match="config.task"):
        pipeline.transform_from_config(input_config(), task="detection", image_size=16, train=True)
    with pytest.raises(ValueError, match="rand_aug"):
        pipeline.transform_from_config(
            input_config(augment="imagenet", rand_augment=(1, 2, 3)),
            task="recognition",
            image_size=16,
            train=True,
        )


# == grain workers ====================================================================================


def take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.slow
def test_batches_do_not_depend_on_worker_count():
    cases = [
        (
            ShapesSegmentation("train", num_examples=7, image_size=20, seed=1),
            A.UpstreamSegTrain(base_size=20, crop_size=16),
        ),
        (
            ShapesRecognition("train", num_examples=7, image_size=20, seed=1),
            A.ImageNetTrain(16, rand_aug=(2, 12)),
        ),
    ]
    for source, transform in cases:
        kw = dict(
            global_batch_size=4, seed=3, process_index=0, process_count=1, transform=transform
        )
        expected = take(pipeline.train_iterator(source, **kw, worker_count=0), 3)
        it = pipeline.train_iterator(source, **kw, worker_count=2)
        try:
            got = take(it, 3)
        finally:
            it.close()
        for x, y in zip(expected, got):
            assert x.keys() == y.keys()
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        assert not np.array_equal(expected[0]["image"][0], expected[1]["image"][0])
