"""What every transform module shares: example arrays in and out, PIL resizes, argument checks.

Images are uint8 (H, W, 3) (``as_rgb_image`` turns 1 or 4 channels into RGB), masks int32 (H, W)
with -1 = ignore. Outputs are normalised as torchvision ``ToTensor`` + ``Normalize``, channels last:
``(x / 255 - mean) / std`` in float32. Checks raise ``"{where}: {name} must be ..., got {value!r}"``
(the ``jaxenc.validation`` style) and take ``(value, name, where)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from jaxenc.validation import is_int

# The label of pixels that no loss or metric counts (padding, void).
IGNORE_INDEX = -1

RGB = tuple[float, float, float]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


# -- argument checks -------------------------------------------------------------------------------


def check_nonneg_float(value: Any, name: str, where: str) -> float:
    """``value`` as a float; ValueError unless it is a finite real number >= 0 (not a bool)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_range(value: Any, name: str, where: str, lower: float = 0.0) -> tuple[float, float]:
    """``(lo, hi)`` as floats; ValueError unless ``lower < lo <= hi``, both finite."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a pair (lo, hi), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lower < lo <= hi:
        raise ValueError(
            f"{where}: {name} must be (lo, hi) with {lower:g} < lo <= hi, got {value!r}"
        )
    return lo, hi


def check_stats(mean: Any, std: Any, where: str) -> dict[str, RGB]:
    """``{"mean": ..., "std": ...}`` as float triples (3 finite values each, std > 0)."""
    out = {}
    for name, value in (("mean", mean), ("std", std)):
        if np.shape(value) != (3,) or not np.all(np.isfinite(np.asarray(value, np.float64))):
            raise ValueError(f"{where}: {name} must have 3 finite values (RGB), got {value!r}")
        out[name] = tuple(float(v) for v in value)
    if min(out["std"]) <= 0:
        raise ValueError(f"{where}: std must be positive, got {std!r}")
    return out


def check_interpolation(value: Any, where: str, choices=("bilinear", "bicubic")) -> str:
    if value not in choices:
        raise ValueError(f"{where}: interpolation must be one of {list(choices)}, got {value!r}")
    return value


def interpolation_field(value: Any, name: str, where: str) -> str:
    """``check_interpolation`` in the ``(value, name, where)`` form that ``check_fields`` calls."""
    return check_interpolation(value, where)


def check_label(value: Any, name: str, where: str) -> int:
    """A mask label (any integer, -1 = ignore) as an int."""
    if not is_int(value):
        raise ValueError(f"{where}: {name} must be an integer label (-1 = ignore), got {value!r}")
    return int(value)


def set_fields(obj, **fields) -> None:
    """Stores the checked fields on a frozen dataclass (from its ``__post_init__``)."""
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


def check_fields(obj, **checks) -> None:
    """Checks, in the order given, then stores fields of a frozen dataclass (from its ``__post_init__``):
    ``name=check`` stores ``check(obj.name, name, where)``, ``where`` being the class name."""
    where = type(obj).__name__
    set_fields(
        obj, **{name: check(getattr(obj, name), name, where) for name, check in checks.items()}
    )


def need_rng(where: str, rng) -> None:
    if rng is None:
        raise ValueError(
            f"{where} is a training transform and needs an rng: apply it with grain's "
            "random_map (or pass a np.random.Generator)"
        )


# -- example arrays --------------------------------------------------------------------------------


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


def integer_mask(
    mask: Any,
    error: str = "example['mask'] must be an integer (H, W) array, got {dtype} {shape}",
    allow_empty: bool = True,
) -> np.ndarray:
    """An integer (H, W[, 1]) mask as an (H, W) array (its dtype kept); else ValueError with
    ``error.format(dtype=..., shape=...)``, also for an empty mask unless ``allow_empty``."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if (
        mask.ndim != 2
        or not np.issubdtype(mask.dtype, np.integer)
        or (not allow_empty and min(mask.shape) < 1)
    ):
        raise ValueError(error.format(dtype=mask.dtype, shape=mask.shape))
    return mask


def align_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """int (H', W'[, 1]) mask -> int32 ``shape`` (H, W), nearest-resized when the sizes differ.

    Upstream resizes the mask to sizes computed from the image, so a mask of another size (TFDS
    mock data) ends up aligned the same way."""
    mask = np.ascontiguousarray(integer_mask(mask, allow_empty=False), np.int32)
    if mask.shape != tuple(shape):
        mask = resize_mask(mask, shape[1], shape[0])
    return mask


def label_of(example: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(example["label"], np.int32)


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image))


def resize_image(image: np.ndarray, width: int, height: int, resample: str) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3) with PIL (antialiased when downscaling, as
    torchvision's PIL path); a copy when the size is unchanged."""
    if image.shape[:2] == (height, width):
        return image.copy()
    return np.asarray(to_pil(image).resize((width, height), _RESAMPLE[resample]))


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """int32 (H, W) -> (height, width), PIL nearest on mode "I" (so -1 survives)."""
    if mask.shape == (height, width):
        return mask.copy()
    resized = Image.fromarray(np.ascontiguousarray(mask, np.int32)).resize(
        (width, height), Image.Resampling.NEAREST
    )
    return np.asarray(resized, np.int32)


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], as torchvision ToTensor (a float32 division by 255)."""
    return image.astype(np.float32) / np.float32(255)


def normalise(image01: np.ndarray, mean, std) -> np.ndarray:
    """float32 [0, 1] (H, W, 3) -> ``(x - mean) / std`` float32 (torchvision Normalize)."""
    out = (image01 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out, np.float32)


def normalise_uint8(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (H, W, 3) -> ``(x * float32(1/255) - mean) / std`` float32: the segmentation test
    protocol's normalisation (training's ``to_unit`` divides by 255 instead; the two differ in the
    last bit for some values, so each path keeps its own)."""
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    return (image.astype(np.float32) * np.float32(1 / 255) - m) / s


def random_flip(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """RandomHorizontalFlip(p=0.5)."""
    return image[:, ::-1] if rng.random() < 0.5 else image
