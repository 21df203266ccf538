"""jaxenc's "basic" transforms: random rescale, flip and pad/crop to a square, for both tasks.

The default recipe's augmentation (``config.input.augment = "basic"``); upstream's recipes use
``seg_transforms`` / ``cls_transforms`` instead. Frozen dataclasses called as
``transform(example, rng)``, like every transform of ``train.data.augment``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxenc.constants import IMAGENET_MEAN, IMAGENET_STD
from jaxenc.validation import check_positive_int
from train.data.arrays import (
    IGNORE_INDEX,
    as_rgb_image,
    integer_mask,
    normalise_uint8,
    resize_image,
    resize_mask,
)

__all__ = [
    "RecognitionTransform",
    "SegmentationTransform",
    "recognition_transform",
    "segmentation_transform",
]


def _as_mask(mask: Any) -> np.ndarray:
    return integer_mask(mask).astype(np.int32)


def _check_transform_args(name, image_size, scale_range, mean, std):
    check_positive_int(image_size, "image_size", name)
    if scale_range is not None:
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(
                f"{name}: scale_range must be None or (lo, hi) with 0 < lo <= hi, got {scale_range!r}"
            )
    for arg, value in (("mean", mean), ("std", std)):
        if np.shape(value) != (3,):
            raise ValueError(f"{name}: {arg} must have 3 values (RGB), got {value!r}")
    if np.any(np.asarray(std) <= 0):
        raise ValueError(f"{name}: std must be positive, got {std!r}")


def _scale_range(scale_range) -> tuple[float, float] | None:
    """None when there is no rescale: None or (1, 1) (a config cannot hold None in a tuple field)."""
    if scale_range is None or tuple(float(s) for s in scale_range) == (1.0, 1.0):
        return None
    return tuple(float(s) for s in scale_range)


@dataclasses.dataclass(frozen=True)
class _ImageTransform:
    """Shared geometry and normalisation; see ``segmentation_transform`` for the semantics."""

    train: bool
    image_size: int
    flip: bool = True
    scale_range: tuple[float, float] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def _normalise(self, image: np.ndarray) -> np.ndarray:
        return normalise_uint8(image, self.mean, self.std)

    def _geometry(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator | None
    ):
        """Returns (normalised float32 image (S, S, 3), int32 mask (S, S) or None)."""
        size = self.image_size
        if not self.train:
            image = resize_image(image, size, size, "bilinear")
            return self._normalise(image), None if mask is None else resize_mask(mask, size, size)
        if rng is None:
            raise ValueError(
                f"{type(self).__name__}(train=True) needs an rng: apply it with grain's random_map "
                "(or call it with a np.random.Generator)"
            )
        scaled = size
        if self.scale_range is not None:
            scaled = max(1, int(round(size * rng.uniform(*self.scale_range))))
        image = self._normalise(resize_image(image, scaled, scaled, "bilinear"))
        if mask is not None:
            mask = resize_mask(mask, scaled, scaled)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        if scaled < size:
            # Random placement on an S x S canvas (normalised 0 = the mean colour; mask = ignore).
            top, left = rng.integers(0, size - scaled + 1, 2)
            canvas = np.zeros((size, size, 3), np.float32)
            canvas[top : top + scaled, left : left + scaled] = image
            image = canvas
            if mask is not None:
                padded = np.full((size, size), IGNORE_INDEX, np.int32)
                padded[top : top + scaled, left : left + scaled] = mask
                mask = padded
        elif scaled > size:
            top, left = rng.integers(0, scaled - size + 1, 2)
            image = image[top : top + size, left : left + size]
            mask = None if mask is None else mask[top : top + size, left : left + size]
        image = np.ascontiguousarray(image, np.float32)
        return image, None if mask is None else np.ascontiguousarray(mask, np.int32)


@dataclasses.dataclass(frozen=True)
class SegmentationTransform(_ImageTransform):
    """``(example, rng) -> {"image": float32 (S, S, 3), "mask": int32 (S, S)}``; see ``segmentation_transform``."""

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image, mask = self._geometry(as_rgb_image(example["image"]), _as_mask(example["mask"]), rng)
        return {"image": image, "mask": mask}


@dataclasses.dataclass(frozen=True)
class RecognitionTransform(_ImageTransform):
    """``(example, rng) -> {"image": float32 (S, S, 3), "label": int32 ()}``; see ``recognition_transform``."""

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image, _ = self._geometry(as_rgb_image(example["image"]), None, rng)
        return {"image": image, "label": np.asarray(example["label"], np.int32)}


def _transform_factory(cls: type, name: str, doc: str):
    """The keyword-only factory ``name`` of ``cls``: checks the arguments (errors name ``name``),
    then builds ``cls`` from them as plain Python values."""

    def factory(
        *,
        train: bool,
        image_size: int,
        flip: bool = True,
        scale_range: tuple[float, float] | None = None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        _check_transform_args(name, image_size, scale_range, mean, std)
        return cls(
            bool(train),
            int(image_size),
            bool(flip),
            _scale_range(scale_range),
            tuple(float(m) for m in mean),
            tuple(float(s) for s in std),
        )

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__annotations__["return"] = cls.__name__
    return factory


segmentation_transform = _transform_factory(
    SegmentationTransform,
    "segmentation_transform",
    """Image + mask transform: ``example {"image": uint8 (H, W, 3), "mask": int (H, W[, 1])}`` ->
    ``{"image": float32 (S, S, 3) normalised, "mask": int32 (S, S)}`` with ``S = image_size``.

    train=True (needs the rng): image and mask are resized to ``round(S * s)`` square,
    ``s ~ U(scale_range)`` (``s = 1`` when scale_range is None or (1, 1); image bilinear, mask nearest), flipped
    horizontally with probability 1/2 when ``flip``, then placed at a random offset on an S x S canvas
    (padding: image 0 after normalisation, mask -1 = ignore) or randomly cropped to S.
    train=False: resized to S x S only if needed; rng is ignored (may be None).
    Image and mask are resized independently, so they need not share a size on input.
    """,
)

recognition_transform = _transform_factory(
    RecognitionTransform,
    "recognition_transform",
    """Image + label transform: ``{"image": uint8 (H, W, 3|1), "label": int}`` ->
    ``{"image": float32 (S, S, 3) normalised, "label": int32 ()}``; the image geometry is exactly
    that of ``segmentation_transform`` (random rescale, flip, pad/crop in train; resize in eval).""",
)
