"""Upstream-faithful data augmentation (PyTorch-Encoding), numpy/PIL only, for grain workers.

Every transform is a frozen dataclass (picklable, hashable) called as
``transform(example, rng: np.random.Generator | None) -> dict`` like those in ``pipeline``:
``random_map`` hands train transforms a per-element Generator, eval transforms get ``rng=None``.
All randomness comes from that ``rng`` (never ``random`` or numpy's global state), so the output
is a function of (example, rng state) alone: the same per seed, whatever the grain worker count.

Examples are dicts of numpy arrays: ``"image"`` uint8 (H, W, 3) (1 or 4 channels are turned into
RGB), plus ``"mask"`` integer (H, W) with -1 = ignore (segmentation) or ``"label"`` int
(recognition). Outputs: ``"image"`` float32 (h, w, 3) normalised as ``(x / 255 - mean) / std``
(torchvision ``ToTensor`` + ``Normalize``, channels last), ``"mask"`` int32 (h, w), ``"label"``
int32 ().

Segmentation (``encoding/datasets/base.py``, ``BaseDataset``):

- ``UpstreamSegTrain``  ``_sync_transform``: flip, long side ~ U{0.5 base .. 2 base}, pad, crop.
- ``UpstreamSegVal``    ``_val_sync_transform``: short side -> crop, centre crop.
- ``UpstreamSegTestval`` mode ``testval``: the full image, normalised only.

Recognition (``encoding/transforms/get_transform.py``, ``transforms.py``, ``autoaug.py``):

- building blocks on uint8 (H, W, 3) arrays: ``RandAugment``, ``ERandomCrop``, ``ECenterCrop``,
  ``RandomResizedCrop``, ``Resize``, ``CenterCrop``, ``RandomCrop``, ``ColorJitter``; on float
  [0, 1] images: ``Lighting``;
- example transforms: ``ImageNetTrain`` / ``ImageNetVal``, ``CifarTrain`` / ``CifarVal``,
  ``MincTrain`` / ``MincVal``.

Random draws are made in the order upstream makes them (with ``rng.random()`` for
``random.random()``, ``rng.integers(a, b + 1)`` for ``random.randint(a, b)``, ``rng.uniform`` for
``random.uniform``), so each transform is upstream's distribution exactly; the streams themselves
differ from Python's ``random``/torch's, so outputs are not bit-equal to an upstream run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

# AlexNet-style PCA lighting noise: ImageNet RGB eigenvalues and eigenvectors (columns), as in
# upstream get_transform.py's ``_imagenet_pca``.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
# fmt: off
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))
# fmt: on

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


# -- argument checks -------------------------------------------------------------------------------


def _positive_int(owner: str, arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {arg} must be a positive integer, got {value!r}")
    return int(value)


def _nonneg_int(owner: str, arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{owner}: {arg} must be an integer >= 0, got {value!r}")
    return int(value)


def _nonneg_float(owner: str, arg: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{owner}: {arg} must be a finite number >= 0, got {value!r}")
    return float(value)


def _range(owner: str, arg: str, value: Any, *, lower: float = 0.0) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {arg} must be a pair (lo, hi), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lower < lo <= hi:
        raise ValueError(
            f"{owner}: {arg} must be (lo, hi) with {lower:g} < lo <= hi, got {value!r}"
        )
    return lo, hi


def _stats(owner: str, mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    out = []
    for arg, value in (("mean", mean), ("std", std)):
        if np.shape(value) != (3,) or not np.all(np.isfinite(np.asarray(value, np.float64))):
            raise ValueError(f"{owner}: {arg} must have 3 finite values (RGB), got {value!r}")
        out.append(tuple(float(v) for v in value))
    if min(out[1]) <= 0:
        raise ValueError(f"{owner}: std must be positive, got {std!r}")
    return out[0], out[1]


def _interpolation(owner: str, value: Any, choices=("bilinear", "bicubic")) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: interpolation must be one of {list(choices)}, got {value!r}")
    return value


def _set(obj, **fields) -> None:
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


def _need_rng(owner: str, rng) -> None:
    if rng is None:
        raise ValueError(
            f"{owner} is a training transform and needs an rng: apply it with grain's "
            "random_map (or pass a np.random.Generator)"
        )


# -- array helpers ---------------------------------------------------------------------------------


def as_rgb_image(image: Any) -> np.ndarray:
    """uint8 (H, W, 3); grayscale (H, W[, 1]) is repeated to RGB, a 4th (alpha) channel dropped."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"example['image'] must be uint8 (H, W, 3), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(
            f"example['image'] must be (H, W, 3) (or 1/4 channels), got shape {image.shape}"
        )
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def align_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """int (H', W'[, 1]) mask -> int32 ``shape`` (H, W): nearest-neighbour resized to the image's size
    when the sizes differ. Upstream resizes the mask to sizes computed from the image
    (``mask.resize((ow, oh), NEAREST)``), so a mask of another size ends up aligned the same way;
    real datasets have matching sizes, TFDS mock data does not."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer) or min(mask.shape) < 1:
        raise ValueError(
            f"example['mask'] must be an integer (H, W) array, got {mask.dtype} {mask.shape}"
        )
    mask = np.ascontiguousarray(mask, np.int32)
    if mask.shape != tuple(shape):
        mask = resize_mask(mask, shape[1], shape[0])
    return mask


def _label(example: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(example["label"], np.int32)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image))


def resize_image(image: np.ndarray, width: int, height: int, resample: str) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3) with PIL (whose bilinear/bicubic antialias when
    downscaling, as in torchvision's PIL path and upstream); a copy when the size is unchanged."""
    if image.shape[:2] == (height, width):
        return image.copy()
    return np.asarray(_pil(image).resize((width, height), _RESAMPLE[resample]))


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """int32 (H, W) -> (height, width), PIL nearest on mode "I" (so -1 survives)."""
    if mask.shape == (height, width):
        return mask.copy()
    resized = Image.fromarray(np.ascontiguousarray(mask, np.int32)).resize(
        (width, height), Image.Resampling.NEAREST
    )
    return np.asarray(resized, np.int32)


def _to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], as torchvision ToTensor (a float32 division by 255)."""
    return image.astype(np.float32) / np.float32(255)


def _normalise(image01: np.ndarray, mean, std) -> np.ndarray:
    """float32 [0, 1] (H, W, 3) -> ``(x - mean) / std`` float32 (torchvision Normalize)."""
    out = (image01 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out, np.float32)


def _flip(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """RandomHorizontalFlip(p=0.5)."""
    return image[:, ::-1] if rng.random() < 0.5 else image


# == segmentation =================================================================================


@dataclasses.dataclass(frozen=True)
class UpstreamSegTrain:
    """Upstream's training augmentation for segmentation, ``BaseDataset._sync_transform``
    (PyTorch-Encoding ``encoding/datasets/base.py``).

    ``{"image": uint8 (H, W, 3), "mask": int (H, W)}`` -> ``{"image": float32 (C, C, 3),
    "mask": int32 (C, C)}`` with ``C = crop_size``, in upstream's order:

    1. horizontal flip with probability 0.5 (when ``flip``);
    2. long side ``L ~ U{int(base*lo), ..., int(base*hi)}`` (both ends included, upstream's
       ``random.randint``; ``(lo, hi) = scale``, upstream (0.5, 2.0)); the other side is
       ``int(1.0 * short * L / long + 0.5)`` (``h > w``: height is the long side, else the width,
       so a square image takes the width branch); image resized with ``interpolation``, mask
       nearest;
    3. if the short side < C: pad bottom/right up to C, image with 0 in uint8 pixel space (black
       before normalisation), mask with ``mask_pad``;
    4. random C x C crop, top-left ``x ~ U{0..W-C}``, ``y ~ U{0..H-C}`` (drawn in that order);
    5. ``(x / 255 - mean) / std``.

    ``mask_pad``: upstream pads the raw mask with 0 and then maps it per dataset, so padding is
    ignore for ADE20K/PContext/Cityscapes but *background* for PASCAL VOC. Our masks arrive already
    mapped to -1 = ignore, hence the default -1; ``mask_pad=0`` reproduces upstream VOC.
    ``interpolation``: "bilinear" (upstream's original code) or "bicubic" (what
    upstream's latest base.py uses for the image).
    """

    base_size: int
    crop_size: int
    flip: bool = True
    scale: tuple[float, float] = (0.5, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mask_pad: int = -1
    interpolation: str = "bilinear"

    def __post_init__(self):
        name = type(self).__name__
        base = _positive_int(name, "base_size", self.base_size)
        crop = _positive_int(name, "crop_size", self.crop_size)
        scale = _range(name, "scale", self.scale)
        if int(base * scale[0]) < 1:
            raise ValueError(
                f"{name}: scale[0] * base_size must be >= 1, got scale={self.scale!r}, "
                f"base_size={base}"
            )
        if isinstance(self.mask_pad, bool) or not isinstance(self.mask_pad, (int, np.integer)):
            raise ValueError(
                f"{name}: mask_pad must be an integer label (-1 = ignore), got {self.mask_pad!r}"
            )
        mean, std = _stats(name, self.mean, self.std)
        _set(
            self,
            base_size=base,
            crop_size=crop,
            flip=bool(self.flip),
            scale=scale,
            mean=mean,
            std=std,
            mask_pad=int(self.mask_pad),
            interpolation=_interpolation(name, self.interpolation),
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
        """The random decisions for an (height, width) input, drawn in upstream's order:
        ``{"flip", "width", "height" (after the rescale), "x", "y" (crop origin after padding)}``."""
        flip = bool(self.flip and rng.random() < 0.5)
        lo, hi = self.long_side_range()
        long_size = int(rng.integers(lo, hi + 1))
        ow, oh = self.scaled_size(width, height, long_size)
        padded_w, padded_h = max(ow, self.crop_size), max(oh, self.crop_size)
        x = int(rng.integers(0, padded_w - self.crop_size + 1))
        y = int(rng.integers(0, padded_h - self.crop_size + 1))
        return {"flip": flip, "width": ow, "height": oh, "x": x, "y": y}

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        _need_rng(type(self).__name__, rng)
        image = as_rgb_image(example["image"])
        mask = align_mask(example["mask"], image.shape[:2])
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
        image, mask = image[y : y + c, x : x + c], mask[y : y + c, x : x + c]
        return {
            "image": _normalise(_to_unit(image), self.mean, self.std),
            "mask": np.ascontiguousarray(mask, np.int32),
        }


@dataclasses.dataclass(frozen=True)
class UpstreamSegVal:
    """Upstream's fast validation transform, ``BaseDataset._val_sync_transform`` (mode "val";
    PyTorch-Encoding ``encoding/datasets/base.py``).

    ``{"image": uint8 (H, W, 3), "mask": int (H, W)}`` -> ``{"image": float32 (C, C, 3),
    "mask": int32 (C, C)}``, ``C = crop_size``, deterministic (``rng`` ignored):

    1. short side -> C keeping the aspect, the long side *truncated* as upstream's code does
       (``w > h``: ``new_w = int(1.0 * w * C / h)``; otherwise ``new_h = int(1.0 * h * C / w)``;
       unlike the train transform there is no +0.5), image with ``interpolation``, mask nearest;
    2. centre crop at ``x = int(round((new_w - C) / 2.))``, ``y = int(round((new_h - C) / 2.))``
       (Python's round: halves go to the even integer);
    3. ``(x / 255 - mean) / std``.
    """

    crop_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        name = type(self).__name__
        mean, std = _stats(name, self.mean, self.std)
        _set(
            self,
            crop_size=_positive_int(name, "crop_size", self.crop_size),
            mean=mean,
            std=std,
            interpolation=_interpolation(name, self.interpolation),
        )

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
        image = as_rgb_image(example["image"])
        mask = align_mask(example["mask"], image.shape[:2])
        g = self.geometry(*image.shape[:2])
        image = resize_image(image, g["width"], g["height"], self.interpolation)
        mask = resize_mask(mask, g["width"], g["height"])
        c, x, y = self.crop_size, g["x"], g["y"]
        return {
            "image": _normalise(_to_unit(image[y : y + c, x : x + c]), self.mean, self.std),
            "mask": np.ascontiguousarray(mask[y : y + c, x : x + c], np.int32),
        }


@dataclasses.dataclass(frozen=True)
class UpstreamSegTestval:
    """Upstream's mode "testval" (``encoding/datasets/base.py``): the full image and mask, no resize, for the
    multi-scale evaluator. ``{"image": uint8 (H, W, 3), "mask": int (H, W)}`` ->
    ``{"image": float32 (H, W, 3) normalised, "mask": int32 (H, W)}``; variable size, so it is
    applied per image rather than batched. Deterministic (``rng`` ignored)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        mean, std = _stats(type(self).__name__, self.mean, self.std)
        _set(self, mean=mean, std=std)

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image = as_rgb_image(example["image"])
        mask = align_mask(example["mask"], image.shape[:2])
        return {"image": _normalise(_to_unit(image), self.mean, self.std), "mask": mask}


# == recognition building blocks (uint8 (H, W, 3) -> uint8) =====================================


@dataclasses.dataclass(frozen=True)
class ECenterCrop:
    """EfficientNet-style centre crop (upstream ``transforms.ECenterCrop``; TF EfficientNet
    ``_decode_and_center_crop`` with CROP_PADDING = 32): a centred square of side
    ``s = crop_size / (crop_size + 32) * min(H, W)`` (a float), resized bicubic to
    ``(crop_size, crop_size)``. Upstream crops with PIL at the float box
    ``(left, top, left + s, top + s)``, ``left = int(round((W - s) / 2.))``, which PIL rounds to
    integers (Python's round). uint8 (H, W, 3) -> uint8 (crop_size, crop_size, 3)."""

    crop_size: int

    def __post_init__(self):
        _set(self, crop_size=_positive_int(type(self).__name__, "crop_size", self.crop_size))

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Integer ``(left, top, right, bottom)`` of the crop (PIL convention, right/bottom exclusive)."""
        side = float(self.crop_size) / (self.crop_size + 32) * min(width, height)
        top = int(round((height - side) / 2.0))
        left = int(round((width - side) / 2.0))
        return left, top, int(round(left + side)), int(round(top + side))

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = as_rgb_image(image)
        left, top, right, bottom = self.box(*image.shape[:2])
        right, bottom = max(right, left + 1), max(bottom, top + 1)
        return resize_image(
            image[top:bottom, left:right], self.crop_size, self.crop_size, "bicubic"
        )


@dataclasses.dataclass(frozen=True)
class ERandomCrop:
    """EfficientNet "distorted bounding box" random crop (upstream ``transforms.ERandomCrop``,
    after TF's ``sample_distorted_bounding_box`` as restated in fast-autoaugment): up to
    ``max_attempts`` tries of aspect ``a ~ U(aspect_ratio_range)``, height
    ``round(U(h_min, h_max))`` between the heights giving the min/max area at that aspect, width
    ``round(h * a)``; a try is kept when its area lies in ``area_range * H * W`` and
    ``>= min_covered * H * W`` and it fits; a kept box equal to the whole image, or no kept box,
    falls back to ``ECenterCrop``. The crop origin is ``x ~ U{0..W-w}``, ``y ~ U{0..H-h}``; the crop
    is resized bicubic to ``(crop_size, crop_size)``. uint8 (H, W, 3) -> uint8 (crop_size, crop_size, 3).
    Rounding is Python's ``round`` (halves to even), as upstream."""

    crop_size: int
    min_covered: float = 0.1
    aspect_ratio_range: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    area_range: tuple[float, float] = (0.1, 1.0)
    max_attempts: int = 10

    def __post_init__(self):
        name = type(self).__name__
        if not _nonneg_float(name, "min_covered", self.min_covered) > 0:
            raise ValueError(f"{name}: min_covered must be > 0, got {self.min_covered!r}")
        _set(
            self,
            crop_size=_positive_int(name, "crop_size", self.crop_size),
            min_covered=float(self.min_covered),
            aspect_ratio_range=_range(name, "aspect_ratio_range", self.aspect_ratio_range),
            area_range=_range(name, "area_range", self.area_range),
            max_attempts=_positive_int(name, "max_attempts", self.max_attempts),
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
        _need_rng(type(self).__name__, rng)
        image = as_rgb_image(image)
        box = self.box(*image.shape[:2], rng)
        if box is None:
            return ECenterCrop(self.crop_size)(image)
        x, y, w, h = box
        return resize_image(image[y : y + h, x : x + w], self.crop_size, self.crop_size, "bicubic")


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` (Inception crop;
    upstream's non-etrans ImageNet and MINC train crop): up to 10 tries of area fraction
    ``U(scale)`` and log-uniform aspect, ``w = round(sqrt(A * r))``, ``h = round(sqrt(A / r))``,
    kept when ``0 < w <= W`` and ``0 < h <= H``, origin ``top ~ U{0..H-h}`` then
    ``left ~ U{0..W-w}``; otherwise a centre crop with the aspect clamped to ``ratio``. The crop is
    resized (``interpolation``, default bilinear) to ``(size, size)``.
    uint8 (H, W, 3) -> uint8 (size, size, 3)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bilinear"

    def __post_init__(self):
        name = type(self).__name__
        _set(
            self,
            size=_positive_int(name, "size", self.size),
            scale=_range(name, "scale", self.scale),
            ratio=_range(name, "ratio", self.ratio),
            interpolation=_interpolation(name, self.interpolation),
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
        _need_rng(type(self).__name__, rng)
        image = as_rgb_image(image)
        top, left, h, w = self.box(*image.shape[:2], rng)
        return resize_image(
            image[top : top + h, left : left + w], self.size, self.size, self.interpolation
        )


@dataclasses.dataclass(frozen=True)
class Resize:
    """torchvision ``Resize(size)`` with an int size: the short side becomes ``size``, the long
    side ``int(size * long / short)`` (truncated), bilinear by default; unchanged when already
    that size. uint8 (H, W, 3) -> uint8."""

    size: int
    interpolation: str = "bilinear"

    def __post_init__(self):
        name = type(self).__name__
        _set(
            self,
            size=_positive_int(name, "size", self.size),
            interpolation=_interpolation(name, self.interpolation),
        )

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
    """torchvision ``CenterCrop(size)``: origin ``int(round((H - size) / 2.))``, same for the width;
    an image smaller than ``size`` is first zero-padded as torchvision does (left/top get the
    floor half). uint8 (H, W, 3) -> uint8 (size, size, 3)."""

    size: int

    def __post_init__(self):
        _set(self, size=_positive_int(type(self).__name__, "size", self.size))

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
    ``padding`` pixels on every side, then a ``size x size`` crop at ``top ~ U{0..H'-size}``,
    ``left ~ U{0..W'-size}`` (drawn in that order). uint8 (H, W, 3) -> uint8 (size, size, 3);
    ValueError when the padded image is smaller than ``size``."""

    size: int
    padding: int = 0

    def __post_init__(self):
        name = type(self).__name__
        _set(
            self,
            size=_positive_int(name, "size", self.size),
            padding=_nonneg_int(name, "padding", self.padding),
        )

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _need_rng(type(self).__name__, rng)
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


@dataclasses.dataclass(frozen=True)
class ColorJitter:
    """torchvision ``ColorJitter(brightness, contrast, saturation)`` (hue 0), PIL path: factors
    ``U(max(0, 1 - v), 1 + v)`` for each non-zero ``v``, applied in a random order (torchvision
    draws a permutation of its 4 adjustments, hue being a no-op here, then the factors in the order
    brightness, contrast, saturation). Brightness/contrast/saturation are PIL
    ``ImageEnhance.Brightness/Contrast/Color`` as torchvision's ``adjust_*`` on PIL images.
    uint8 (H, W, 3) -> uint8 (H, W, 3)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4

    _ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)

    def __post_init__(self):
        name = type(self).__name__
        _set(
            self,
            **{
                k: _nonneg_float(name, k, getattr(self, k))
                for k in ("brightness", "contrast", "saturation")
            },
        )

    def params(self, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[float | None, ...]]:
        """``(order, factors)``: a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
        and the three factors (None when that jitter is 0)."""
        order = tuple(int(i) for i in rng.permutation(4))
        factors = tuple(
            None if v == 0 else float(rng.uniform(max(0.0, 1.0 - v), 1.0 + v))
            for v in (self.brightness, self.contrast, self.saturation)
        )
        return order, factors

    @classmethod
    def apply(cls, image: np.ndarray, order, factors) -> np.ndarray:
        """Applies the adjustments in ``order`` with ``factors`` (see ``params``)."""
        pil = _pil(image)
        for i in order:
            if i < 3 and factors[i] is not None:
                pil = cls._ENHANCERS[i](pil).enhance(factors[i])
        return np.asarray(pil)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _need_rng(type(self).__name__, rng)
        image = as_rgb_image(image)
        if self.brightness == self.contrast == self.saturation == 0:
            return image
        return self.apply(image, *self.params(rng))


@dataclasses.dataclass(frozen=True)
class Lighting:
    """AlexNet-style PCA lighting noise (Krizhevsky et al. 2012; upstream ``Lighting``): draws
    ``alpha ~ N(0, alphastd)^3`` and adds ``eigvec @ (alpha * eigval)`` to the RGB channels.
    Applied to a float [0, 1] image (after ToTensor, before Normalize; not clipped).
    float (H, W, 3) -> float32 (H, W, 3); ``alphastd = 0`` returns the image unchanged."""

    alphastd: float = 0.1
    eigval: tuple[float, float, float] = IMAGENET_PCA_EIGVAL
    eigvec: tuple[tuple[float, float, float], ...] = IMAGENET_PCA_EIGVEC

    def __post_init__(self):
        name = type(self).__name__
        if np.shape(self.eigval) != (3,):
            raise ValueError(f"{name}: eigval must have 3 values, got {self.eigval!r}")
        if np.shape(self.eigvec) != (3, 3):
            raise ValueError(f"{name}: eigvec must be 3x3, got {self.eigvec!r}")
        _set(
            self,
            alphastd=_nonneg_float(name, "alphastd", self.alphastd),
            eigval=tuple(float(v) for v in self.eigval),
            eigvec=tuple(tuple(float(v) for v in row) for row in self.eigvec),
        )

    def offset(self, alpha) -> np.ndarray:
        """float32 (3,) RGB offset for ``alpha`` (3,): ``eigvec @ (alpha * eigval)``."""
        alpha = np.asarray(alpha, np.float32)
        return (
            np.asarray(self.eigvec, np.float32) * (alpha * np.asarray(self.eigval, np.float32))
        ).sum(1)

    def __call__(self, image01: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image01 = np.asarray(image01, np.float32)
        if self.alphastd == 0:
            return image01
        _need_rng(type(self).__name__, rng)
        return image01 + self.offset(rng.normal(0.0, self.alphastd, 3))


# -- RandAugment -------------------------------------------------------------------------------------


def _signed(rng: np.random.Generator, v: float) -> float:
    """Upstream's random mirror: ``-v`` when ``random.random() > 0.5``."""
    return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, coeffs) -> Image.Image:
    return img.transform(
        img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC
    )


def _posterize(img: Image.Image, v: float) -> Image.Image:
    # int(v) bits kept; upstream's range (0, 4) reaches 0 bits (m < 7.5), which old PIL turned
    # into a black image and current PIL rejects, so the bit mask is applied here directly.
    bits = int(v)
    keep = (~(2 ** (8 - bits) - 1)) & 0xFF
    return Image.fromarray(np.asarray(img) & np.uint8(keep))


def _solarize_add(img: Image.Image, v: float) -> Image.Image:
    added = np.clip(np.asarray(img).astype(np.int64) + v, 0, 255).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(added), 128)


def _cutout(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    # Upstream draws the centre with np.random.uniform(w), i.e. uniform(low=w, high=1.0): a point
    # in [1, w] (and [1, h]); restated as low + (high - low) * U[0, 1).
    w, h = img.size
    cx = w + (1.0 - w) * rng.random()
    cy = h + (1.0 - h) * rng.random()
    x0, y0 = int(max(0, cx - v / 2.0)), int(max(0, cy - v / 2.0))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (125, 123, 114))
    return img


# name -> (function(img, value, rng), min, max). Upstream ``rand_augment_list()``: 16 ops.
_RAND_AUGMENT = {
    "AutoContrast": (lambda img, v, rng: ImageOps.autocontrast(img), 0.0, 1.0),
    "Equalize": (lambda img, v, rng: ImageOps.equalize(img), 0.0, 1.0),
    "Invert": (lambda img, v, rng: ImageOps.invert(img), 0.0, 1.0),
    "Rotate": (lambda img, v, rng: img.rotate(_signed(rng, v)), 0.0, 30.0),
    "Posterize": (lambda img, v, rng: _posterize(img, v), 0.0, 4.0),
    "Solarize": (lambda img, v, rng: ImageOps.solarize(img, v), 0.0, 256.0),
    "SolarizeAdd": (lambda img, v, rng: _solarize_add(img, v), 0.0, 110.0),
    "Color": (lambda img, v, rng: ImageEnhance.Color(img).enhance(v), 0.1, 1.9),
    "Contrast": (lambda img, v, rng: ImageEnhance.Contrast(img).enhance(v), 0.1, 1.9),
    "Brightness": (lambda img, v, rng: ImageEnhance.Brightness(img).enhance(v), 0.1, 1.9),
    "Sharpness": (lambda img, v, rng: ImageEnhance.Sharpness(img).enhance(v), 0.1, 1.9),
    "ShearX": (lambda img, v, rng: _affine(img, (1, _signed(rng, v), 0, 0, 1, 0)), 0.0, 0.3),
    "ShearY": (lambda img, v, rng: _affine(img, (1, 0, 0, _signed(rng, v), 1, 0)), 0.0, 0.3),
    "CutoutAbs": (_cutout, 0.0, 40.0),
    "TranslateXabs": (
        lambda img, v, rng: _affine(img, (1, 0, _signed(rng, v), 0, 1, 0)),
        0.0,
        100.0,
    ),
    "TranslateYabs": (
        lambda img, v, rng: _affine(img, (1, 0, 0, 0, 1, _signed(rng, v))),
        0.0,
        100.0,
    ),
}
RAND_AUGMENT_OPS: tuple[str, ...] = tuple(_RAND_AUGMENT)


def rand_augment_value(name: str, m: float) -> float:
    """Upstream's magnitude rule: ``m / 30 * (max - min) + min`` for op ``name``."""
    if name not in _RAND_AUGMENT:
        raise ValueError(
            f"rand_augment_value: name must be one of {list(RAND_AUGMENT_OPS)}, got {name!r}"
        )
    _, lo, hi = _RAND_AUGMENT[name]
    return float(m) / 30.0 * (hi - lo) + lo


def rand_augment_op(image: np.ndarray, name: str, m: float, rng: np.random.Generator) -> np.ndarray:
    """Applies RandAugment op ``name`` at magnitude ``m`` (0..30) to uint8 (H, W, 3); the random
    sign (Rotate, Shear*, Translate*abs) and the cutout position come from ``rng``.
    Rotate is PIL nearest, shears/translations bicubic, fills black (cutout grey (125, 123, 114))."""
    if name not in _RAND_AUGMENT:
        raise ValueError(
            f"rand_augment_op: name must be one of {list(RAND_AUGMENT_OPS)}, got {name!r}"
        )
    fn = _RAND_AUGMENT[name][0]
    return np.asarray(fn(_pil(as_rgb_image(image)), rand_augment_value(name, m), rng))


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """RandAugment (Cubuk et al. 2020, arXiv:1909.13719) as upstream ``autoaug.RandAugment(n, m)``:
    ``n`` ops drawn with replacement from the 16 of ``RAND_AUGMENT_OPS`` (all drawn first); each is
    skipped when ``U(0,1) > U(0.2, 0.8)`` (so applied with a random probability in [0.2, 0.8]),
    else applied at value ``m / 30 * (max - min) + min``. ``n = 0`` is the identity.
    uint8 (H, W, 3) -> uint8 (H, W, 3)."""

    n: int = 2
    m: float = 12

    def __post_init__(self):
        name = type(self).__name__
        m = _nonneg_float(name, "m", self.m)
        if m > 30:
            raise ValueError(f"{name}: m must be in [0, 30], got {self.m!r}")
        _set(self, n=_nonneg_int(name, "n", self.n), m=m)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = as_rgb_image(image)
        if self.n == 0:
            return image
        _need_rng(type(self).__name__, rng)
        picks = rng.integers(0, len(RAND_AUGMENT_OPS), self.n)
        img = _pil(image)
        for i in picks:
            if rng.random() > rng.uniform(0.2, 0.8):
                continue
            name = RAND_AUGMENT_OPS[int(i)]
            img = _RAND_AUGMENT[name][0](img, rand_augment_value(name, self.m), rng)
        return np.asarray(img)


# == recognition example transforms ================================================================


def _rand_aug(owner: str, value) -> tuple[int, float] | None:
    """None or a validated (n, m); n = 0 (the config's (0, 0)) means off, hence None. m = 0 is a
    valid magnitude (the ops' minimum), so only n switches RandAugment off."""
    if value is None:
        return None
    try:
        n, m = value
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: rand_aug must be None or (n, m), got {value!r}") from None
    RandAugment(n, m)  # validates
    return None if int(n) == 0 else (int(n), float(m))


@dataclasses.dataclass(frozen=True)
class ImageNetTrain:
    """Upstream ImageNet training transform (``get_transform('imagenet', rand_aug=..., etrans=True)``,
    ``encoding/transforms``): [RandAugment(n, m)] -> ERandomCrop(crop) (``etrans=False``: RandomResizedCrop) ->
    horizontal flip -> ColorJitter(jitter x3) -> to [0, 1] -> Lighting(lighting) -> normalise.
    ``{"image": uint8 (H, W, 3), "label": int}`` -> ``{"image": float32 (crop, crop, 3),
    "label": int32 ()}``. ``rand_aug``: None or (n, m), n = 0 meaning off.
    Upstream's latest get_transform has the ImageNet Lighting line commented out (an earlier
    version and MINC keep it); jaxenc keeps it, hence the default 0.1: ``lighting=0`` drops it."""

    crop_size: int
    rand_aug: tuple[int, float] | None = None
    jitter: float = 0.4
    lighting: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    etrans: bool = True

    def __post_init__(self):
        name = type(self).__name__
        mean, std = _stats(name, self.mean, self.std)
        _set(
            self,
            crop_size=_positive_int(name, "crop_size", self.crop_size),
            rand_aug=_rand_aug(name, self.rand_aug),
            jitter=_nonneg_float(name, "jitter", self.jitter),
            lighting=_nonneg_float(name, "lighting", self.lighting),
            mean=mean,
            std=std,
            etrans=bool(self.etrans),
        )

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        _need_rng(type(self).__name__, rng)
        image = as_rgb_image(example["image"])
        if self.rand_aug is not None:
            image = RandAugment(*self.rand_aug)(image, rng)
        crop = ERandomCrop(self.crop_size) if self.etrans else RandomResizedCrop(self.crop_size)
        image = _flip(rng, crop(image, rng))
        image = ColorJitter(self.jitter, self.jitter, self.jitter)(image, rng)
        image01 = Lighting(self.lighting)(_to_unit(image), rng)
        return {"image": _normalise(image01, self.mean, self.std), "label": _label(example)}


@dataclasses.dataclass(frozen=True)
class ImageNetVal:
    """Upstream ImageNet evaluation transform: ECenterCrop(crop) (``etrans=False``:
    Resize(int(crop / 0.875)) + CenterCrop(crop)), then normalise; deterministic.
    ``{"image": uint8 (H, W, 3), "label": int}`` -> ``{"image": float32 (crop, crop, 3), "label": int32 ()}``."""

    crop_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    etrans: bool = True

    def __post_init__(self):
        name = type(self).__name__
        mean, std = _stats(name, self.mean, self.std)
        _set(
            self,
            crop_size=_positive_int(name, "crop_size", self.crop_size),
            mean=mean,
            std=std,
            etrans=bool(self.etrans),
        )

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image = as_rgb_image(example["image"])
        if self.etrans:
            image = ECenterCrop(self.crop_size)(image)
        else:
            image = CenterCrop(self.crop_size)(Resize(int(1.0 * self.crop_size / 0.875))(image))
        return {"image": _normalise(_to_unit(image), self.mean, self.std), "label": _label(example)}


@dataclasses.dataclass(frozen=True)
class CifarTrain:
    """Upstream CIFAR-10 training transform: RandomCrop(crop, padding=4) -> horizontal flip ->
    normalise with the CIFAR statistics. ``{"image": uint8 (H, W, 3), "label": int}`` ->
    ``{"image": float32 (crop, crop, 3), "label": int32 ()}``."""

    crop_size: int = 32
    padding: int = 4
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD

    def __post_init__(self):
        name = type(self).__name__
        mean, std = _stats(name, self.mean, self.std)
        _set(
            self,
            crop_size=_positive_int(name, "crop_size", self.crop_size),
            padding=_nonneg_int(name, "padding", self.padding),
            mean=mean,
            std=std,
        )

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        _need_rng(type(self).__name__, rng)
        image = _flip(rng, RandomCrop(self.crop_size, self.padding)(example["image"], rng))
        return {"image": _normalise(_to_unit(image), self.mean, self.std), "label": _label(example)}


@dataclasses.dataclass(frozen=True)
class CifarVal:
    """Upstream CIFAR-10 evaluation transform: normalise only (no resize; CIFAR images are
    32 x 32). ``{"image": uint8 (H, W, 3), "label": int}`` -> ``{"image": float32 (H, W, 3), "label": int32 ()}``."""

    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD

    def __post_init__(self):
        mean, std = _stats(type(self).__name__, self.mean, self.std)
        _set(self, mean=mean, std=std)

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        return {
            "image": _normalise(_to_unit(as_rgb_image(example["image"])), self.mean, self.std),
            "label": _label(example),
        }


@dataclasses.dataclass(frozen=True)
class MincTrain:
    """Upstream MINC-2500 training transform: Resize(base) (short side) -> RandomResizedCrop(crop)
    -> horizontal flip -> ColorJitter(jitter x3) -> to [0, 1] -> Lighting(lighting) -> normalise.
    ``{"image": uint8 (H, W, 3), "label": int}`` -> ``{"image": float32 (crop, crop, 3), "label": int32 ()}``."""

    base_size: int
    crop_size: int
    jitter: float = 0.4
    lighting: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        name = type(self).__name__
        mean, std = _stats(name, self.mean, self.std)
        _set(
            self,
            base_size=_positive_int(name, "base_size", self.base_size),
            crop_size=_positive_int(name, "crop_size", self.crop_size),
            jitter=_nonneg_float(name, "jitter", self.jitter),
            lighting=_nonneg_float(name, "lighting", self.lighting),
            mean=mean,
            std=std,
        )

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        _need_rng(type(self).__name__, rng)
        image = RandomResizedCrop(self.crop_size)(Resize(self.base_size)(example["image"]), rng)
        image = ColorJitter(self.jitter, self.jitter, self.jitter)(_flip(rng, image), rng)
        image01 = Lighting(self.lighting)(_to_unit(image), rng)
        return {"image": _normalise(image01, self.mean, self.std), "label": _label(example)}


@dataclasses.dataclass(frozen=True)
class MincVal:
    """Upstream MINC-2500 evaluation transform: Resize(base) (short side) -> CenterCrop(crop) ->
    normalise. ``{"image": uint8 (H, W, 3), "label": int}`` ->
    ``{"image": float32 (crop, crop, 3), "label": int32 ()}``."""

    base_size: int
    crop_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        name = type(self).__name__
        mean, std = _stats(name, self.mean, self.std)
        _set(
            self,
            base_size=_positive_int(name, "base_size", self.base_size),
            crop_size=_positive_int(name, "crop_size", self.crop_size),
            mean=mean,
            std=std,
        )

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image = CenterCrop(self.crop_size)(Resize(self.base_size)(example["image"]))
        return {"image": _normalise(_to_unit(image), self.mean, self.std), "label": _label(example)}
