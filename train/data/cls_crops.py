"""Crop and resize blocks of the recognition transforms: torchvision's and upstream's EfficientNet ones.

Each is ``uint8 (H, W, 3) -> uint8`` (upstream ``encoding/transforms/transforms.py``, torchvision
``transforms``); random draws follow upstream's order, rounding is Python's ``round`` (halves to even).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxenc.validation import check_int, check_positive_int
from train.data.arrays import (
    as_rgb_image,
    check_fields,
    check_nonneg_float,
    check_range,
    interpolation_field,
    need_rng,
    resize_image,
    set_fields,
)


def _square(image: np.ndarray, left: int, top: int, w: int, h: int, size: int) -> np.ndarray:
    """The (left, top, w, h) crop resized bicubic to (size, size)."""
    return resize_image(image[top : top + h, left : left + w], size, size, "bicubic")


@dataclasses.dataclass(frozen=True)
class ECenterCrop:
    """EfficientNet centre crop (upstream ``ECenterCrop``; TF ``_decode_and_center_crop``, CROP_PADDING
    32): the centred square of side ``s = crop / (crop + 32) * min(H, W)`` at the float box
    ``left = int(round((W - s) / 2.))``, rounded to integers as PIL does, resized bicubic to crop x crop."""

    crop_size: int

    def __post_init__(self):
        check_fields(self, crop_size=check_positive_int)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Integer ``(left, top, right, bottom)`` (PIL convention, right/bottom exclusive)."""
        side = float(self.crop_size) / (self.crop_size + 32) * min(width, height)
        top = int(round((height - side) / 2.0))
        left = int(round((width - side) / 2.0))
        return left, top, int(round(left + side)), int(round(top + side))

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = as_rgb_image(image)
        left, top, right, bottom = self.box(*image.shape[:2])
        w, h = max(right - left, 1), max(bottom - top, 1)
        return _square(image, left, top, w, h, self.crop_size)


@dataclasses.dataclass(frozen=True)
class ERandomCrop:
    """EfficientNet "distorted bounding box" crop (upstream ``ERandomCrop``, after TF's
    ``sample_distorted_bounding_box`` as fast-autoaugment restates it), resized bicubic to crop x crop.

    Up to ``max_attempts`` tries of aspect ``a ~ U(aspect_ratio_range)``, height ``round(U(h_min,
    h_max))`` between the heights of the min/max area at that aspect, width ``round(h * a)``; a try
    is kept when its area lies in ``area_range * H * W``, is ``>= min_covered * H * W`` and fits,
    then placed at ``x ~ U{0..W-w}``, ``y ~ U{0..H-h}``. The whole image, or no kept try, falls back
    to ``ECenterCrop``."""

    crop_size: int
    min_covered: float = 0.1
    aspect_ratio_range: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    area_range: tuple[float, float] = (0.1, 1.0)
    max_attempts: int = 10

    def __post_init__(self):
        where = type(self).__name__
        if not check_nonneg_float(self.min_covered, "min_covered", where) > 0:
            raise ValueError(f"{where}: min_covered must be > 0, got {self.min_covered!r}")
        set_fields(
            self,
            crop_size=check_int(self.crop_size, "crop_size", where, minimum=1),
            min_covered=float(self.min_covered),
            aspect_ratio_range=check_range(self.aspect_ratio_range, "aspect_ratio_range", where),
            area_range=check_range(self.area_range, "area_range", where),
            max_attempts=check_int(self.max_attempts, "max_attempts", where, minimum=1),
        )

    def box(
        self, height: int, width: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int] | None:
        """``(left, top, width, height)`` of the sampled crop, or None for the centre-crop fallback."""
        total = width * height
        min_area, max_area = self.area_range[0] * total, self.area_range[1] * total
        for _ in range(self.max_attempts):
            aspect = rng.uniform(*self.aspect_ratio_range)
            h = int(round(math.sqrt(min_area / aspect)))
            max_h = int(round(math.sqrt(max_area / aspect)))
            if max_h * aspect > width:
                max_h = int((width + 0.5 - 1e-7) / aspect)
                if max_h * aspect > width:
                    max_h -= 1
            max_h = min(max_h, height)
            h = min(h, max_h)
            h = int(round(rng.uniform(h, max_h)))
            w = int(round(h * aspect))
            area = w * h
            if area < min_area or area > max_area or w > width or h > height:
                continue
            if area < self.min_covered * total:
                continue
            if w == width and h == height:
                return None
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, w, h
        return None

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        need_rng(type(self).__name__, rng)
        image = as_rgb_image(image)
        box = self.box(*image.shape[:2], rng)
        if box is None:
            return ECenterCrop(self.crop_size)(image)
        return _square(image, *box, self.crop_size)


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` (Inception crop):
    up to 10 tries of area fraction ``U(scale)`` and log-uniform aspect ``r``, ``w = round(sqrt(A r))``,
    ``h = round(sqrt(A / r))``, kept when it fits, origin ``top ~ U{0..H-h}`` then ``left``; else a
    centre crop with the aspect clamped to ``ratio``. Resized with ``interpolation`` to size x size."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bilinear"

    def __post_init__(self):
        check_fields(
            self,
            size=check_positive_int,
            scale=check_range,
            ratio=check_range,
            interpolation=interpolation_field,
        )

    def box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` as torchvision's ``get_params``."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        need_rng(type(self).__name__, rng)
        image = as_rgb_image(image)
        top, left, h, w = self.box(*image.shape[:2], rng)
        return resize_image(
            image[top : top + h, left : left + w], self.size, self.size, self.interpolation
        )


@dataclasses.dataclass(frozen=True)
class Resize:
    """torchvision ``Resize(size)``, int size: short side -> ``size``, long side
    ``int(size * long / short)`` (truncated), bilinear by default; unchanged when already that size."""

    size: int
    interpolation: str = "bilinear"

    def __post_init__(self):
        check_fields(self, size=check_positive_int, interpolation=interpolation_field)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(new_h, new_w)``."""
        if width <= height:
            return int(self.size * height / width), self.size
        return self.size, int(self.size * width / height)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = as_rgb_image(image)
        h, w = self.output_size(*image.shape[:2])
        return resize_image(image, w, h, self.interpolation)


@dataclasses.dataclass(frozen=True)
class CenterCrop:
    """torchvision ``CenterCrop(size)``: origin ``int(round((H - size) / 2.))`` (and the width); a
    smaller image is first zero-padded as torchvision does (left/top get the floor half)."""

    size: int

    def __post_init__(self):
        check_fields(self, size=check_positive_int)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = as_rgb_image(image)
        s = self.size
        h, w = image.shape[:2]
        if h < s or w < s:
            ph, pw = max(s - h, 0), max(s - w, 0)
            image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
            h, w = image.shape[:2]
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return np.ascontiguousarray(image[top : top + s, left : left + s])


@dataclasses.dataclass(frozen=True)
class RandomCrop:
    """torchvision ``RandomCrop(size, padding)`` (CIFAR: ``RandomCrop(32, padding=4)``): zero-pad
    ``padding`` on every side, then a size x size crop at ``top ~ U{0..H'-size}``, then ``left``;
    ValueError when the padded image is smaller than ``size``."""

    size: int
    padding: int = 0

    def __post_init__(self):
        where = type(self).__name__
        set_fields(
            self,
            size=check_int(self.size, "size", where, minimum=1),
            padding=check_int(self.padding, "padding", where, minimum=0),
        )

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        need_rng(type(self).__name__, rng)
        image = as_rgb_image(image)
        p = self.padding
        if p:
            image = np.pad(image, ((p, p), (p, p), (0, 0)))
        h, w = image.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(
                f"RandomCrop: size={self.size} is larger than the padded image {(h, w)}"
            )
        top = int(rng.integers(0, h - self.size + 1))
        left = int(rng.integers(0, w - self.size + 1))
        return np.ascontiguousarray(image[top : top + self.size, left : left + self.size])
