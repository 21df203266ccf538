"""Users' own data in plain folders.

**image_folder** (recognition): ``<data_dir>/<split>/<class>/*.{jpg,jpeg,png}``. Classes are the
sorted sub-directories of ``<data_dir>/train`` (of the split itself without a train folder), so all
splits share label indices; a class the train folder lacks is an error. Splits: train, validation
(``validation/`` or ``val/``), test.

**seg_folder** (segmentation): ``<data_dir>/<split>/images/<stem>.{jpg,jpeg,png}`` and
``<data_dir>/<split>/masks/<stem>.png`` (single-channel; 0..K-1, 255 = ignore), ``K =
config.dataset.num_classes`` (required); any other value is an error when the example is read.
``config.dataset.class_names`` is optional; visualisations use the VOC colour map.
"""

from __future__ import annotations

import os

import numpy as np

from train.data.arrays import integer_mask
from train.data.bad_examples import BadExample
from train.data.sources import _base

_SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}

IMAGE_LAYOUT = (
    "  <data_dir>/<split>/<class>/*.{jpg,jpeg,png}   (split: train, validation or val, test)"
)
SEG_LAYOUT = (
    "  <data_dir>/<split>/images/<stem>.{jpg,jpeg,png}\n"
    "  <data_dir>/<split>/masks/<stem>.png   (0..num_classes-1, 255 = ignore)   "
    "(split: train, validation or val, test)"
)


def _split_dir(config, split: str, name: str, layout: str) -> str:
    candidates = _base.lookup_split(name, split, _SPLIT_DIRS)
    root = _base.require_data_dir(config, name, layout)
    for sub in candidates:
        if os.path.isdir(os.path.join(root, sub)):
            return os.path.join(root, sub)
    return _base.require_dir(os.path.join(root, candidates[0]), name, layout)


def _classes(directory: str) -> list[str]:
    return sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))


def build_image_folder(config, split: str) -> _base.FileRecognition:
    """``fn(config.dataset, split)`` for ``"image_folder"`` (module docstring)."""
    name = _base.dataset_name(config, "image_folder")
    directory = _split_dir(config, split, name, IMAGE_LAYOUT)
    train_dir = os.path.join(os.path.dirname(directory), "train")
    classes = _classes(train_dir if os.path.isdir(train_dir) else directory)
    if not classes:
        raise FileNotFoundError(
            f"dataset {name!r}: no class folders in {directory}\nexpected layout:\n{IMAGE_LAYOUT}"
        )
    extra = sorted(set(_classes(directory)) - set(classes))
    if extra:
        raise ValueError(
            f"dataset {name!r}: {directory} has classes {extra} that {train_dir} does not have"
        )
    paths, labels = [], []
    for k, cls in enumerate(classes):
        cls_dir = os.path.join(directory, cls)
        if os.path.isdir(cls_dir):
            found = _base.list_images(cls_dir)
            paths += found
            labels += [k] * len(found)
    if not paths:
        raise FileNotFoundError(
            f"dataset {name!r}: no images under {directory}\nexpected layout:\n{IMAGE_LAYOUT}"
        )
    return _base.FileRecognition(name, split, paths, labels, classes)


class FolderLabels:
    """0..K-1 kept, 255 -> -1; any other value raises BadExample, a ValueError (user data is
    checked, not guessed; ``config.input.bad_examples`` says what the pipeline does with it)."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)

    def __call__(self, raw) -> np.ndarray:
        error = "seg_folder: expected an integer (H, W) mask, got {dtype} {shape}"
        mask = integer_mask(raw, error).astype(np.int32)
        ignore = mask == 255
        bad = ~ignore & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            raise BadExample(
                None,
                f"seg_folder: mask values {sorted(np.unique(mask[bad]).tolist())[:10]} are outside "
                f"0..{self.num_classes - 1} (and are not 255 = ignore)",
            )
        mask[ignore] = _base.IGNORE
        return mask


def build_seg_folder(config, split: str) -> _base.FileSegmentation:
    """``fn(config.dataset, split)`` for ``"seg_folder"`` (module docstring)."""
    name = _base.dataset_name(config, "seg_folder")
    num_classes = _base.cfg_get(config, "num_classes")
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(
            f"dataset {name!r}: config.dataset.num_classes (the number of mask classes) is required"
        )
    num_classes = int(num_classes)
    if num_classes > 255:
        raise ValueError(
            f"dataset {name!r}: at most 255 classes (255 marks ignored pixels), got {num_classes}"
        )
    class_names = _base.cfg_get(config, "class_names")
    if class_names is None:
        class_names = tuple(f"class_{k}" for k in range(num_classes))
    elif len(class_names) != num_classes:
        raise ValueError(
            f"dataset {name!r}: config.dataset.class_names has {len(class_names)} names for "
            f"{num_classes} classes"
        )
    directory = _split_dir(config, split, name, SEG_LAYOUT)
    image_dir = _base.require_dir(os.path.join(directory, "images"), name, SEG_LAYOUT)
    mask_dir = _base.require_dir(os.path.join(directory, "masks"), name, SEG_LAYOUT)
    images = _base.list_images(image_dir)
    masks = _base.paired_by_stem(images, "images", image_dir, mask_dir, ".png", name, SEG_LAYOUT)
    _base.require_all(masks, name, SEG_LAYOUT)
    return _base.FileSegmentation(
        name, split, images, masks, FolderLabels(num_classes), class_names
    )
