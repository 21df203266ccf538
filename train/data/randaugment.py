"""RandAugment (Cubuk et al. 2020, arXiv:1909.13719) as upstream ``encoding/transforms/autoaug.py``.

uint8 (H, W, 3) -> uint8 (H, W, 3) through PIL. The 16 ops and their (min, max) values are
upstream's ``rand_augment_list()``; deviation: Posterize at 0 bits is a black image here (current
PIL rejects 0 bits, old PIL, which upstream ran on, produced black).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from jaxenc.validation import check_int
from train.data.arrays import as_rgb_image, check_nonneg_float, need_rng, set_fields, to_pil


def _signed(rng: np.random.Generator, v: float) -> float:
    """Upstream's random mirror: ``-v`` when ``random.random() > 0.5``."""
    return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, coeffs) -> Image.Image:
    return img.transform(
        img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC
    )


def _posterize(img: Image.Image, v: float) -> Image.Image:
    # The bit mask applied directly, so upstream's range (0, 4) may reach 0 bits (m < 7.5).
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


# name -> (function(img, value, rng), min, max), in upstream's order.
_OPS = {
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
RAND_AUGMENT_OPS: tuple[str, ...] = tuple(_OPS)


def _check_name(name: str, where: str) -> None:
    if name not in _OPS:
        raise ValueError(f"{where}: name must be one of {list(RAND_AUGMENT_OPS)}, got {name!r}")


def rand_augment_value(name: str, m: float) -> float:
    """Upstream's magnitude rule: ``m / 30 * (max - min) + min`` for op ``name``."""
    _check_name(name, "rand_augment_value")
    _, lo, hi = _OPS[name]
    return float(m) / 30.0 * (hi - lo) + lo


def rand_augment_op(image: np.ndarray, name: str, m: float, rng: np.random.Generator) -> np.ndarray:
    """Op ``name`` at magnitude ``m`` (0..30) on uint8 (H, W, 3); the random sign (Rotate, Shear*,
    Translate*abs) and the cutout position come from ``rng``. Rotate is PIL nearest,
    shears/translations bicubic, fills black (cutout grey (125, 123, 114))."""
    _check_name(name, "rand_augment_op")
    fn = _OPS[name][0]
    return np.asarray(fn(to_pil(as_rgb_image(image)), rand_augment_value(name, m), rng))


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """Upstream ``autoaug.RandAugment(n, m)``: ``n`` ops drawn with replacement from the 16 (all
    drawn first); each is skipped when ``U(0,1) > U(0.2, 0.8)``, else applied at
    ``rand_augment_value(op, m)``. ``n = 0`` is the identity."""

    n: int = 2
    m: float = 12

    def __post_init__(self):
        where = type(self).__name__
        m = check_nonneg_float(self.m, "m", where)
        if m > 30:
            raise ValueError(f"{where}: m must be in [0, 30], got {self.m!r}")
        set_fields(self, n=check_int(self.n, "n", where, minimum=0), m=m)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = as_rgb_image(image)
        if self.n == 0:
            return image
        need_rng(type(self).__name__, rng)
        picks = rng.integers(0, len(RAND_AUGMENT_OPS), self.n)
        img = to_pil(image)
        for i in picks:
            if rng.random() > rng.uniform(0.2, 0.8):
                continue
            name = RAND_AUGMENT_OPS[int(i)]
            img = _OPS[name][0](img, rand_augment_value(name, self.m), rng)
        return np.asarray(img)
