"""Recognition transforms of upstream PyTorch-Encoding (``encoding/transforms/get_transform.py``).

Example transforms ``{"image": uint8 (H, W, 3), "label": int}`` -> ``{"image": float32 (crop, crop,
3) normalised, "label": int32 ()}`` for ImageNet, CIFAR-10 and MINC-2500, and their colour blocks
(``ColorJitter`` on uint8, ``Lighting`` on float [0, 1]); the crops are in ``cls_crops``.
Deviation: ImageNet training keeps the Lighting step that upstream's latest version comments out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import ImageEnhance

from jaxenc.constants import IMAGENET_MEAN, IMAGENET_STD
from jaxenc.validation import check_int
from train.data import cls_crops as crops
from train.data.arrays import (
    RGB,
    as_rgb_image,
    check_nonneg_float,
    check_stats,
    label_of,
    need_rng,
    normalise,
    random_flip,
    set_fields,
    to_pil,
    to_unit,
)
from train.data.randaugment import RandAugment

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

# ImageNet RGB PCA eigenvalues and eigenvectors (columns), upstream get_transform.py's ``_imagenet_pca``.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
# fmt: off
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))
# fmt: on


@dataclasses.dataclass(frozen=True)
class ColorJitter:
    """torchvision ``ColorJitter(brightness, contrast, saturation)`` (hue 0), PIL path: factors
    ``U(max(0, 1 - v), 1 + v)`` for each non-zero ``v``, applied in the order of a random permutation
    of torchvision's 4 adjustments (hue a no-op), as PIL ``ImageEnhance.Brightness/Contrast/Color``.
    uint8 (H, W, 3) -> uint8 (H, W, 3)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4

    _ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)

    def __post_init__(self):
        where = type(self).__name__
        names = ("brightness", "contrast", "saturation")
        set_fields(self, **{k: check_nonneg_float(getattr(self, k), k, where) for k in names})

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
        pil = to_pil(image)
        for i in order:
            if i < 3 and factors[i] is not None:
                pil = cls._ENHANCERS[i](pil).enhance(factors[i])
        return np.asarray(pil)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        need_rng(type(self).__name__, rng)
        image = as_rgb_image(image)
        if self.brightness == self.contrast == self.saturation == 0:
            return image
        return self.apply(image, *self.params(rng))


@dataclasses.dataclass(frozen=True)
class Lighting:
    """AlexNet PCA lighting noise (Krizhevsky et al. 2012; upstream ``Lighting``): adds
    ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, alphastd)^3``, to a float [0, 1] image (after
    ToTensor, before Normalize; not clipped). float (H, W, 3) -> float32; ``alphastd = 0``: unchanged."""

    alphastd: float = 0.1
    eigval: tuple[float, float, float] = IMAGENET_PCA_EIGVAL
    eigvec: tuple[tuple[float, float, float], ...] = IMAGENET_PCA_EIGVEC

    def __post_init__(self):
        where = type(self).__name__
        if np.shape(self.eigval) != (3,):
            raise ValueError(f"{where}: eigval must have 3 values, got {self.eigval!r}")
        if np.shape(self.eigvec) != (3, 3):
            raise ValueError(f"{where}: eigvec must be 3x3, got {self.eigvec!r}")
        set_fields(
            self,
            alphastd=check_nonneg_float(self.alphastd, "alphastd", where),
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
        need_rng(type(self).__name__, rng)
        return image01 + self.offset(rng.normal(0.0, self.alphastd, 3))


# -- example transforms ------------------------------------------------------------------------------


def _rand_aug(value, where: str) -> tuple[int, float] | None:
    """None or a checked (n, m); n = 0 (the config's (0, 0)) means off. m = 0 is a valid magnitude
    (the ops' minimum), so only n switches RandAugment off."""
    if value is None:
        return None
    try:
        n, m = value
    except (TypeError, ValueError):
        raise ValueError(f"{where}: rand_aug must be None or (n, m), got {value!r}") from None
    RandAugment(n, m)  # validates
    return None if int(n) == 0 else (int(n), float(m))


def _sizes(t, where: str, *names: str) -> dict[str, int]:
    return {k: check_int(getattr(t, k), k, where, minimum=1) for k in names}


def _jitters(t, where: str) -> dict[str, float]:
    return {k: check_nonneg_float(getattr(t, k), k, where) for k in ("jitter", "lighting")}


class _Checked:
    """``__post_init__`` of the example transforms: checks and stores, in this order, ``mean``/``std``,
    the positive sizes named in ``_SIZES``, then what ``_more_fields(where)`` returns."""

    _SIZES: tuple[str, ...] = ("crop_size",)

    def __post_init__(self):
        where = type(self).__name__
        set_fields(
            self,
            **check_stats(self.mean, self.std, where),
            **_sizes(self, where, *self._SIZES),
            **self._more_fields(where),
        )

    def _more_fields(self, where: str) -> dict:
        return {}


def _labelled(t, image01: np.ndarray, example: Mapping[str, Any]) -> dict:
    return {"image": normalise(image01, t.mean, t.std), "label": label_of(example)}


def _flip_colour(t, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Upstream's shared tail: flip -> ColorJitter(jitter x3) -> to [0, 1] -> Lighting(lighting)."""
    image = ColorJitter(t.jitter, t.jitter, t.jitter)(random_flip(rng, image), rng)
    return Lighting(t.lighting)(to_unit(image), rng)


def _resize_centre(image: np.ndarray, base_size: int, crop_size: int) -> np.ndarray:
    return crops.CenterCrop(crop_size)(crops.Resize(base_size)(image))


@dataclasses.dataclass(frozen=True)
class ImageNetTrain(_Checked):
    """``get_transform('imagenet', rand_aug, etrans=True)``: [RandAugment(n, m)] -> ERandomCrop(crop)
    (``etrans=False``: RandomResizedCrop) -> flip -> ColorJitter -> Lighting -> normalise.
    ``rand_aug``: None or (n, m), n = 0 meaning off; ``lighting=0`` drops the Lighting step."""

    crop_size: int
    rand_aug: tuple[int, float] | None = None
    jitter: float = 0.4
    lighting: float = 0.1
    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD
    etrans: bool = True

    def _more_fields(self, where: str) -> dict:
        rand_aug = _rand_aug(self.rand_aug, where)
        return {"rand_aug": rand_aug, **_jitters(self, where), "etrans": bool(self.etrans)}

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        need_rng(type(self).__name__, rng)
        image = as_rgb_image(example["image"])
        if self.rand_aug is not None:
            image = RandAugment(*self.rand_aug)(image, rng)
        crop = (
            crops.ERandomCrop(self.crop_size)
            if self.etrans
            else crops.RandomResizedCrop(self.crop_size)
        )
        return _labelled(self, _flip_colour(self, crop(image, rng), rng), example)


@dataclasses.dataclass(frozen=True)
class ImageNetVal(_Checked):
    """ImageNet evaluation: ECenterCrop(crop) (``etrans=False``: Resize(int(crop / 0.875)) +
    CenterCrop(crop)), then normalise; deterministic."""

    crop_size: int
    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD
    etrans: bool = True

    def _more_fields(self, where: str) -> dict:
        return {"etrans": bool(self.etrans)}

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image = as_rgb_image(example["image"])
        if self.etrans:
            image = crops.ECenterCrop(self.crop_size)(image)
        else:
            image = _resize_centre(image, int(1.0 * self.crop_size / 0.875), self.crop_size)
        return _labelled(self, to_unit(image), example)


@dataclasses.dataclass(frozen=True)
class CifarTrain(_Checked):
    """CIFAR-10 training: RandomCrop(crop, padding=4) -> flip -> normalise (CIFAR statistics)."""

    crop_size: int = 32
    padding: int = 4
    mean: RGB = CIFAR_MEAN
    std: RGB = CIFAR_STD

    def _more_fields(self, where: str) -> dict:
        return {"padding": check_int(self.padding, "padding", where, minimum=0)}

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        need_rng(type(self).__name__, rng)
        image = random_flip(
            rng, crops.RandomCrop(self.crop_size, self.padding)(example["image"], rng)
        )
        return _labelled(self, to_unit(image), example)


@dataclasses.dataclass(frozen=True)
class CifarVal(_Checked):
    """CIFAR-10 evaluation: normalise only (no resize; CIFAR images are 32 x 32), (H, W) kept."""

    mean: RGB = CIFAR_MEAN
    std: RGB = CIFAR_STD

    _SIZES = ()

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        return _labelled(self, to_unit(as_rgb_image(example["image"])), example)


@dataclasses.dataclass(frozen=True)
class MincTrain(_Checked):
    """MINC-2500 training: Resize(base) (short side) -> RandomResizedCrop(crop) -> flip ->
    ColorJitter -> Lighting -> normalise."""

    base_size: int
    crop_size: int
    jitter: float = 0.4
    lighting: float = 0.1
    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD

    _SIZES = ("base_size", "crop_size")

    def _more_fields(self, where: str) -> dict:
        return _jitters(self, where)

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        need_rng(type(self).__name__, rng)
        image = crops.RandomResizedCrop(self.crop_size)(
            crops.Resize(self.base_size)(example["image"]), rng
        )
        return _labelled(self, _flip_colour(self, image, rng), example)


@dataclasses.dataclass(frozen=True)
class MincVal(_Checked):
    """MINC-2500 evaluation: Resize(base) (short side) -> CenterCrop(crop) -> normalise."""

    base_size: int
    crop_size: int
    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD

    _SIZES = ("base_size", "crop_size")

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image = _resize_centre(example["image"], self.base_size, self.crop_size)
        return _labelled(self, to_unit(image), example)
