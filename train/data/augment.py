"""Upstream-faithful (PyTorch-Encoding) augmentation in numpy/PIL for grain workers: one import for all.

Every transform is a frozen dataclass (picklable, hashable) called as ``transform(example, rng)``
-> dict: grain's ``random_map`` hands train transforms a per-element ``np.random.Generator``, eval
transforms get ``rng=None``. All randomness comes from ``rng``, so outputs depend on (example, rng
state) only, whatever the worker count. Draws are made in upstream's order (upstream's
distribution; the streams differ from Python's ``random``/torch's, so not bit-equal to an upstream run).

Where things live: ``seg_transforms`` (segmentation train/val/testval), ``cls_transforms``
(ImageNet/CIFAR/MINC example transforms, ColorJitter, Lighting), ``cls_crops`` (crops and resizes),
``randaugment`` (the 16 ops and the policy), ``arrays`` (example arrays, resizes, checks). The
config factory is ``pipeline.transform_from_config``.
"""

from jaxenc.constants import IMAGENET_MEAN, IMAGENET_STD
from train.data.arrays import align_mask, as_rgb_image, resize_image, resize_mask
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
