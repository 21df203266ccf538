"""PASCAL VOC 2012 segmentation (``"pascal_voc"``, 21 classes) and PASCAL Context, 59-class
protocol (``"pcontext"``), both from local folders.

**pascal_voc** (TFDS ``voc/2012`` has no masks): ``<data_dir>/VOCdevkit/VOC2012/{JPEGImages,
SegmentationClass,ImageSets/Segmentation/{train,val,trainval}.txt}``; labels 0..20, 255 and others
-> -1. Deviation: train = train.txt (upstream's train mode reads trainval.txt, which contains the
validation images). The SBD-augmented set (``pascal_aug``) is not supported.

**pcontext**: instead of upstream's ``detail`` API on ``trainval_merged.json``, the common
pre-converted PNGs: ``<data_dir>/VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext,
ImageSets/SegmentationContext/{train,val}.txt}``; 0 (background) -> -1, k -> k-1, others -> -1. The
60-class variant (background scored) is not provided.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from train.data.palette import voc_palette
from train.data.sources import _base

VOC_NAME = "pascal_voc"
CONTEXT_NAME = "pcontext"

# fmt: off
VOC_CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")
# fmt: on
VOC_LABELS = _base.identity_table(len(VOC_CLASS_NAMES))
VOC_PALETTE = voc_palette(len(VOC_CLASS_NAMES))

# fmt: off
CONTEXT_CLASS_NAMES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)
# fmt: on
CONTEXT_LABELS = _base.shift_table(len(CONTEXT_CLASS_NAMES))
# Class k is stored as PNG value k+1, so it gets the VOC colour of k+1 (as the PNG viewers show it).
CONTEXT_PALETTE = voc_palette(len(CONTEXT_CLASS_NAMES) + 1)[1:]

VOC_LAYOUT = (
    "  <data_dir>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg\n"
    "  <data_dir>/VOCdevkit/VOC2012/SegmentationClass/<id>.png  (palette PNG, 0..20, 255 = void)\n"
    "  <data_dir>/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt"
)
CONTEXT_LAYOUT = (
    "  <data_dir>/VOCdevkit/VOC2010/JPEGImages/<id>.jpg\n"
    "  <data_dir>/VOCdevkit/VOC2010/SegmentationClassContext/<id>.png  (0 = background, 1..59)\n"
    "  <data_dir>/VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt"
)


class _VocStyle(NamedTuple):
    """A VOCdevkit-style dataset: ``<data_dir>/VOCdevkit/<year>/{JPEGImages/<id>.jpg,
    <mask_dir>/<id>.png, ImageSets/<sets_dir>/<list>.txt}``, ``splits`` naming the lists."""

    name: str  # the dataset name unless config.dataset.name says otherwise
    year: str
    mask_dir: str
    sets_dir: str
    splits: dict[str, str]
    layout: str
    labels: _base.LabelTable
    class_names: tuple[str, ...]


_VOC = _VocStyle(
    name=VOC_NAME,
    year="VOC2012",
    mask_dir="SegmentationClass",
    sets_dir="Segmentation",
    splits={"train": "train", "validation": "val", "trainval": "trainval"},
    layout=VOC_LAYOUT,
    labels=VOC_LABELS,
    class_names=VOC_CLASS_NAMES,
)
_CONTEXT = _VocStyle(
    name=CONTEXT_NAME,
    year="VOC2010",
    mask_dir="SegmentationClassContext",
    sets_dir="SegmentationContext",
    splits={"train": "train", "validation": "val"},
    layout=CONTEXT_LAYOUT,
    labels=CONTEXT_LABELS,
    class_names=CONTEXT_CLASS_NAMES,
)


def _voc_style(config, split: str, spec: _VocStyle) -> _base.FileSegmentation:
    name = _base.dataset_name(config, spec.name)
    layout = spec.layout
    list_name = _base.lookup_split(name, split, spec.splits)
    root = os.path.join(_base.require_data_dir(config, name, layout), "VOCdevkit", spec.year)
    _base.require_dir(root, name, layout)
    ids = _base.read_ids(
        _base.require_file(
            os.path.join(root, "ImageSets", spec.sets_dir, list_name + ".txt"), name, layout
        )
    )
    if not ids:
        raise FileNotFoundError(
            f"dataset {name!r}: the split list for {split!r} is empty\nexpected layout:\n{layout}"
        )
    images = [os.path.join(root, "JPEGImages", i + ".jpg") for i in ids]
    masks = [os.path.join(root, spec.mask_dir, i + ".png") for i in ids]
    _base.require_all(images, name, layout)
    _base.require_all(masks, name, layout)
    return _base.FileSegmentation(name, split, images, masks, spec.labels, spec.class_names)


def build_voc(config, split: str) -> _base.FileSegmentation:
    """``fn(config.dataset, split)`` for ``"pascal_voc"`` (module docstring)."""
    return _voc_style(config, split, _VOC)


def build_context(config, split: str) -> _base.FileSegmentation:
    """``fn(config.dataset, split)`` for ``"pcontext"`` (module docstring)."""
    return _voc_style(config, split, _CONTEXT)
