"""Cityscapes fine semantic segmentation, 19 classes, ``config.dataset.name = "cityscapes"``.

Labels: gtFine ``*_labelIds.png`` ids map to the 19 train ids by ``TRAIN_IDS`` (upstream's
CitySegmentation table); every other id -> -1 ignore. The test split's public labels are all void.

* **folder** (upstream's layout): ``<data_dir>/cityscapes/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png``
  and ``gtFine/{train,val,test}/<city>/*_gtFine_labelIds.png``.
* **tfds** (``cityscapes/semantic_segmentation``; registration needed, so no download): put
  ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` in a manual dir and, with
  TensorFlow, ``tfds build cityscapes/semantic_segmentation --manual_dir <dir> --data_dir <data_dir>
  --file_format=array_record``.

Splits: train, validation (val/), test, trainval.
"""

from __future__ import annotations

import os

import numpy as np

from train.data.sources import _base

NAME = "cityscapes"
TFDS_NAME = "cityscapes/semantic_segmentation"
FOLDER = "cityscapes"

# fmt: off
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")
# fmt: on
NUM_CLASSES = len(CLASS_NAMES)
LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
TRAIN_IDS = _base.LabelTable.from_pairs(
    {label_id: k for k, label_id in enumerate(LABEL_IDS)}, size=256
)

# The official Cityscapes colours of the 19 train ids.
PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    np.uint8,
)

_FOLDER_SPLITS = {
    "train": ("train",),
    "validation": ("val",),
    "test": ("test",),
    "trainval": ("train", "val"),
}
_TFDS_SPLITS = {
    "train": "train",
    "validation": "validation",
    "test": "test",
    "trainval": "train+validation",
}

LAYOUT = (
    f"  <data_dir>/{FOLDER}/leftImg8bit/{{train,val,test}}/<city>/<id>_leftImg8bit.png\n"
    f"  <data_dir>/{FOLDER}/gtFine/{{train,val,test}}/<city>/<id>_gtFine_labelIds.png\n"
    f"or TFDS {TFDS_NAME!r} prepared (array_record) in <data_dir>"
)
_TFDS_HINT = f"extract the official zips under <data_dir>/{FOLDER}/ (the folder backend), or {{}}"
_MANUAL = "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from cityscapes-dataset.com (registration)"


def _folder(config, split: str, name: str) -> _base.FileSegmentation:
    images, masks = [], []
    dirs = ("leftImg8bit", "gtFine")
    for image_root, mask_root in _base.split_dirs(
        config, name, split, _FOLDER_SPLITS, FOLDER, dirs, LAYOUT
    ):
        for city in sorted(os.listdir(image_root)):
            if not os.path.isdir(os.path.join(image_root, city)):
                continue
            for path in _base.list_images(os.path.join(image_root, city)):
                base = os.path.basename(path)
                if not base.endswith("_leftImg8bit.png"):
                    continue
                images.append(path)
                masks.append(
                    os.path.join(
                        mask_root, city, base[: -len("_leftImg8bit.png")] + "_gtFine_labelIds.png"
                    )
                )
    if not images:
        root = os.path.join(_base.data_dir(config), FOLDER)
        raise FileNotFoundError(
            f"dataset {name!r}: no *_leftImg8bit.png images for split {split!r} under "
            f"{root}/leftImg8bit\nexpected layout:\n{LAYOUT}"
        )
    _base.require_all(masks, name, LAYOUT)
    return _base.FileSegmentation(name, split, images, masks, TRAIN_IDS, CLASS_NAMES)


def _tfds(config, split: str, name: str) -> _base.TfdsSegmentation:
    inner = _base.open_tfds_split(config, name, split, _TFDS_SPLITS, TFDS_NAME, _MANUAL, _TFDS_HINT)
    return _base.TfdsSegmentation(
        name, split, inner, "image_left", "segmentation_label", TRAIN_IDS, CLASS_NAMES
    )


def build(config, split: str):
    """``fn(config.dataset, split)`` for the registry (module docstring)."""
    marker = os.path.join(FOLDER, "leftImg8bit")
    return _base.folder_or_tfds(config, split, NAME, marker, _folder, _tfds)
