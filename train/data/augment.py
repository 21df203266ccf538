"""Upstream-faithful (PyTorch-Encoding) augmentation in numpy/PIL for grain workers: one import for all.

Every transform is a frozen dataclass (picklable, hashable) called as ``transform(example, rng)``
-> dict: grain's ``random_map`` hands train transforms a per-element ``np.random.Generator``, eval
transforms get ``rng=None``. All randomness comes from ``rng``, so outputs depend on (example, rng
state) only, whatever the worker count. Draws are made in upstream's order (upstream's
distribution; the streams differ from Python's ``random``/torch's, so not bit-equal to an upstream run).

Where things live: ``seg_transforms`` (segmentation train/val/testval), ``cls_transforms``
(ImageNet/CIFAR/MINC example transforms, ColorJitter, Lighting), ``cls_crops`` (crops and resizes),
``randaugment`` (the 16 ops and the policy), ``basic_transforms`` (jaxenc's default rescale/flip/crop),
``arrays`` (example arrays, resizes, checks). :func:`transform_from_config` below picks one from
``config.input``.
"""

from __future__ import annotations

from typing import Any

from jaxenc.constants import IMAGENET_MEAN, IMAGENET_STD
from train.data.arrays import IGNORE_INDEX, align_mask, as_rgb_image, resize_image, resize_mask
from train.data.basic_transforms import recognition_transform, segmentation_transform
from train.data.cls_crops import (
    CenterCrop,
    ECenterCrop,
    ERandomCrop,
    RandomCrop,
    RandomResizedCrop,
    Resize,
)
from train.data.cls_transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    CifarTrain,
    CifarVal,
    ColorJitter,
    ImageNetTrain,
    ImageNetVal,
    Lighting,
    MincTrain,
    MincVal,
)
from train.data.randaugment import (
    RAND_AUGMENT_OPS,
    RandAugment,
    rand_augment_op,
    rand_augment_value,
)
from train.data.seg_transforms import UpstreamSegTestval, UpstreamSegTrain, UpstreamSegVal

__all__ = [
    "AUGMENTS",
    "transform_from_config",
    "testval_transform",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_PCA_EIGVAL",
    "IMAGENET_PCA_EIGVEC",
    "IMAGENET_STD",
    "RAND_AUGMENT_OPS",
    "CenterCrop",
    "CifarTrain",
    "CifarVal",
    "ColorJitter",
    "ECenterCrop",
    "ERandomCrop",
    "ImageNetTrain",
    "ImageNetVal",
    "Lighting",
    "MincTrain",
    "MincVal",
    "RandAugment",
    "RandomCrop",
    "RandomResizedCrop",
    "Resize",
    "UpstreamSegTestval",
    "UpstreamSegTrain",
    "UpstreamSegVal",
    "align_mask",
    "as_rgb_image",
    "rand_augment_op",
    "rand_augment_value",
    "resize_image",
    "resize_mask",
]


AUGMENTS = {
    "segmentation": ("basic", "upstream"),
    "recognition": ("basic", "imagenet", "cifar", "minc"),
}


def transform_from_config(input_config: Any, *, task: str, image_size: int, train: bool):
    """The transform for ``task`` ("segmentation" | "recognition") from ``config.input``.

    ``config.input.augment`` picks the recipe (default "basic" when the key is absent):

    - "basic" (both tasks): ``segmentation_transform`` / ``recognition_transform`` with flip,
      scale_range, mean, std (flip and scale_range apply to training only).
    - segmentation "upstream": ``UpstreamSegTrain(base_size, image_size, flip, mask_pad,
      interpolation)`` for training, ``UpstreamSegVal(image_size)`` for evaluation.
    - recognition "imagenet": ``ImageNetTrain(image_size, rand_augment, color_jitter,
      lighting, etrans)`` / ``ImageNetVal``; "cifar": ``CifarTrain(image_size)`` /
      ``CifarVal``; "minc": ``MincTrain(base_size, image_size, color_jitter,
      lighting)`` / ``MincVal``.

    Keys read by the upstream recipes, with their defaults: ``base_size`` (520 for segmentation;
    ``int(image_size / 0.875)`` for minc, upstream's default), ``rand_augment`` ((n, m); (0, 0) =
    off), ``color_jitter`` (0.4), ``lighting`` (0.1), ``mask_pad`` (-1), ``interpolation``
    ("bilinear"), ``etrans`` (True), ``mean`` / ``std`` (ImageNet statistics; CIFAR's for "cifar").
    An unknown task or augment name raises ValueError naming the choices.
    """
    if task not in AUGMENTS:
        raise ValueError(f"config.task must be one of {list(AUGMENTS)}, got {task!r}")
    get = lambda key, default: input_config[key] if key in input_config else default  # noqa: E731
    name = get("augment", "basic")
    if name not in AUGMENTS[task]:
        raise ValueError(
            f"config.input.augment must be one of {list(AUGMENTS[task])} for task {task!r}, "
            f"got {name!r}"
        )
    if name == "basic":
        builders = {"segmentation": segmentation_transform, "recognition": recognition_transform}
        scale_range = get("scale_range", None)
        return builders[task](
            train=train,
            image_size=image_size,
            flip=bool(get("flip", True)),
            scale_range=None if scale_range is None else tuple(scale_range),
            mean=tuple(get("mean", IMAGENET_MEAN)),
            std=tuple(get("std", IMAGENET_STD)),
        )
    if name == "cifar":
        stats = dict(mean=tuple(get("mean", CIFAR_MEAN)), std=tuple(get("std", CIFAR_STD)))
        return CifarTrain(image_size, **stats) if train else CifarVal(**stats)
    stats = dict(mean=tuple(get("mean", IMAGENET_MEAN)), std=tuple(get("std", IMAGENET_STD)))
    if name == "upstream":
        interpolation = get("interpolation", "bilinear")
        if not train:
            return UpstreamSegVal(image_size, interpolation=interpolation, **stats)
        return UpstreamSegTrain(
            get("base_size", 520),
            image_size,
            flip=bool(get("flip", True)),
            mask_pad=get("mask_pad", IGNORE_INDEX),
            interpolation=interpolation,
            **stats,
        )
    jitter, lighting = get("color_jitter", 0.4), get("lighting", 0.1)
    if name == "minc":
        base_size = get("base_size", int(1.0 * image_size / 0.875))
        if not train:
            return MincVal(base_size, image_size, **stats)
        return MincTrain(base_size, image_size, jitter=jitter, lighting=lighting, **stats)
    etrans = bool(get("etrans", True))  # imagenet
    if not train:
        return ImageNetVal(image_size, etrans=etrans, **stats)
    rand_aug = get("rand_augment", (0, 0))
    return ImageNetTrain(
        image_size,
        rand_aug=None if rand_aug is None else tuple(rand_aug),
        jitter=jitter,
        lighting=lighting,
        etrans=etrans,
        **stats,
    )


def testval_transform(input_config: Any) -> UpstreamSegTestval:
    """Upstream's "testval" transform for the multi-scale evaluator: the full image and mask,
    normalised with ``config.input.mean`` / ``std`` (variable size; apply per image, unbatched)."""
    return UpstreamSegTestval(
        mean=tuple(input_config["mean"] if "mean" in input_config else IMAGENET_MEAN),
        std=tuple(input_config["std"] if "std" in input_config else IMAGENET_STD),
    )
