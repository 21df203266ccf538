"""Segmentation transforms of upstream PyTorch-Encoding (``encoding/datasets/base.py``, ``BaseDataset``).

``{"image": uint8 (H, W, 3), "mask": int (H, W)}`` -> ``{"image": float32 (h, w, 3) normalised,
"mask": int32 (h, w)}``, -1 = ignore. Random draws follow upstream's order (``rng.integers(a, b + 1)``
for ``random.randint(a, b)``): upstream's distribution, not its exact stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxenc.constants import IMAGENET_MEAN, IMAGENET_STD
from jaxenc.validation import check_int, check_positive_int
from train.data.arrays import (
    RGB,
    align_mask,
    as_rgb_image,
    check_fields,
    check_interpolation,
    check_label,
    check_range,
    check_stats,
    interpolation_field,
    need_rng,
    normalise,
    resize_image,
    resize_mask,
    set_fields,
    to_unit,
)


def _image_and_mask(example: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    image = as_rgb_image(example["image"])
    return image, align_mask(example["mask"], image.shape[:2])


def _output(t, image: np.ndarray, mask: np.ndarray) -> dict:
    return {
        "image": normalise(to_unit(image), t.mean, t.std),
        "mask": np.ascontiguousarray(mask, np.int32),
    }


@dataclasses.dataclass(frozen=True)
class UpstreamSegTrain:
    """Upstream's training augmentation, ``BaseDataset._sync_transform``; output C x C, ``C = crop_size``.

    1. horizontal flip with probability 0.5 (when ``flip``);
    2. long side ``L ~ U{int(base*lo), ..., int(base*hi)}`` (``(lo, hi) = scale``, upstream (0.5, 2));
       the other side ``int(1.0 * short * L / long + 0.5)`` (``h > w``: the height is the long side,
       else the width); image resized with ``interpolation``, mask nearest;
    3. short side < C: pad bottom/right to C, the image with 0 (black), the mask with ``mask_pad``;
    4. random C x C crop at ``x ~ U{0..W-C}``, then ``y ~ U{0..H-C}``; 5. normalise.

    Deviation: upstream pads the raw mask with 0 before its per-dataset mapping (ignore for
    ADE20K/PContext/Cityscapes, background for VOC); masks here arrive mapped, hence ``mask_pad=-1``
    (``mask_pad=0`` is upstream VOC). ``interpolation``: "bilinear" (upstream's original code) or
    "bicubic" (its latest base.py).
    """

    base_size: int
    crop_size: int
    flip: bool = True
    scale: tuple[float, float] = (0.5, 2.0)
    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD
    mask_pad: int = -1
    interpolation: str = "bilinear"

    def __post_init__(self):
        where = type(self).__name__
        base = check_int(self.base_size, "base_size", where, minimum=1)
        crop = check_int(self.crop_size, "crop_size", where, minimum=1)
        scale = check_range(self.scale, "scale", where)
        if int(base * scale[0]) < 1:
            raise ValueError(
                f"{where}: scale[0] * base_size must be >= 1, got scale={self.scale!r}, "
                f"base_size={base}"
            )
        set_fields(
            self,
            base_size=base,
            crop_size=crop,
            flip=bool(self.flip),
            scale=scale,
            mask_pad=check_label(self.mask_pad, "mask_pad", where),
            **check_stats(self.mean, self.std, where),
            interpolation=check_interpolation(self.interpolation, where),
        )

    def long_side_range(self) -> tuple[int, int]:
        """The inclusive range of the random long side: ``(int(base*lo), int(base*hi))``."""
        return int(self.base_size * self.scale[0]), int(self.base_size * self.scale[1])

    @staticmethod
    def scaled_size(width: int, height: int, long_size: int) -> tuple[int, int]:
        """``(new_w, new_h)`` for long side ``long_size`` (upstream's +0.5 rounding; >= 1)."""
        if height > width:
            return max(1, int(1.0 * width * long_size / height + 0.5)), long_size
        return long_size, max(1, int(1.0 * height * long_size / width + 0.5))

    def params(self, height: int, width: int, rng: np.random.Generator) -> dict:
        """The random decisions, in upstream's order: ``{"flip", "width", "height" (after the
        rescale), "x", "y" (crop origin after padding)}``."""
        flip = bool(self.flip and rng.random() < 0.5)
        lo, hi = self.long_side_range()
        long_size = int(rng.integers(lo, hi + 1))
        ow, oh = self.scaled_size(width, height, long_size)
        padded_w, padded_h = max(ow, self.crop_size), max(oh, self.crop_size)
        x = int(rng.integers(0, padded_w - self.crop_size + 1))
        y = int(rng.integers(0, padded_h - self.crop_size + 1))
        return {"flip": flip, "width": ow, "height": oh, "x": x, "y": y}

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        need_rng(type(self).__name__, rng)
        image, mask = _image_and_mask(example)
        p = self.params(*image.shape[:2], rng)
        if p["flip"]:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = resize_image(image, p["width"], p["height"], self.interpolation)
        mask = resize_mask(np.ascontiguousarray(mask), p["width"], p["height"])
        c = self.crop_size
        pad_h, pad_w = max(c - p["height"], 0), max(c - p["width"], 0)
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
            mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=self.mask_pad)
        x, y = p["x"], p["y"]
        return _output(self, image[y : y + c, x : x + c], mask[y : y + c, x : x + c])


@dataclasses.dataclass(frozen=True)
class UpstreamSegVal:
    """Upstream's fast validation transform, ``BaseDataset._val_sync_transform`` (mode "val");
    output C x C, ``C = crop_size``, deterministic (``rng`` ignored).

    1. short side -> C, the long side *truncated* as upstream (``w > h``: ``new_w = int(w * C / h)``,
       else ``new_h = int(h * C / w)``; no +0.5 here), image with ``interpolation``, mask nearest;
    2. centre crop at ``x = int(round((new_w - C) / 2.))``, same for ``y`` (Python's round);
    3. normalise.
    """

    crop_size: int
    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        set_fields(self, **check_stats(self.mean, self.std, type(self).__name__))
        check_fields(self, crop_size=check_positive_int, interpolation=interpolation_field)

    def geometry(self, height: int, width: int) -> dict:
        """``{"width", "height" (after the resize), "x", "y" (crop origin)}``."""
        c = self.crop_size
        if width > height:
            oh, ow = c, max(c, int(1.0 * width * c / height))
        else:
            ow, oh = c, max(c, int(1.0 * height * c / width))
        return {
            "width": ow,
            "height": oh,
            "x": int(round((ow - c) / 2.0)),
            "y": int(round((oh - c) / 2.0)),
        }

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image, mask = _image_and_mask(example)
        g = self.geometry(*image.shape[:2])
        image = resize_image(image, g["width"], g["height"], self.interpolation)
        mask = resize_mask(mask, g["width"], g["height"])
        c, x, y = self.crop_size, g["x"], g["y"]
        return _output(self, image[y : y + c, x : x + c], mask[y : y + c, x : x + c])


@dataclasses.dataclass(frozen=True)
class UpstreamSegTestval:
    """Upstream's mode "testval": the full image (normalised) and mask, no resize, for the
    multi-scale evaluator; variable size, so applied per image, not batched. Deterministic."""

    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD

    def __post_init__(self):
        set_fields(self, **check_stats(self.mean, self.std, type(self).__name__))

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        return _output(self, *_image_and_mask(example))
