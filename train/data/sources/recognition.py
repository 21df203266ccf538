"""Recognition sets: ImageNet-1k and CIFAR-10 through TFDS, MINC-2500 from a local folder.

**imagenet2012** (TFDS; labels 0..999 in sorted-WordNet-id order, as torchvision's ImageFolder):
put ``ILSVRC2012_img_{train,val}.tar`` in a manual dir and, with TensorFlow, ``tfds build
imagenet2012 --manual_dir <dir> --data_dir <data_dir> --file_format=array_record``. An extracted
``<split>/<wnid>/*.JPEG`` tree also works with ``image_folder``.

**cifar10** (TFDS): splits train, test, and validation = test (CIFAR has none);
``tfds build cifar10 --data_dir <data_dir> --file_format=array_record``.

**minc** (MINC-2500 as released): ``<data_dir>/minc-2500/images/<class>/*.jpg`` and
``labels/{train,validate,test}<fold>.txt``; classes are the sorted folders (upstream's
MINCDataset); ``config.dataset.fold`` picks split 1..5 (default 1); upstream evaluates on
test1.txt, the "test" split here.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from train.data.sources import _base

CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# fmt: off
MINC_CLASS_NAMES = ("brick", "carpet", "ceramic", "fabric", "foliage", "food", "glass", "hair", "leather",
                    "metal", "mirror", "other", "painted", "paper", "plastic", "polishedstone", "skin", "sky",
                    "stone", "tile", "wallpaper", "water", "wood")
# fmt: on

_IMAGENET_MANUAL = (
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org, registration)"
)


class _TfdsSet(NamedTuple):
    """A TFDS recognition set: its builder (also the dataset name unless config.dataset.name says
    otherwise), our split -> TFDS split, the class count, the manual-download note and the class
    names (None: TFDS's label names)."""

    builder: str
    splits: dict[str, str]
    num_classes: int
    manual: str | None = None
    class_names: tuple[str, ...] | None = None


_IMAGENET = _TfdsSet(
    "imagenet2012", {"train": "train", "validation": "validation"}, 1000, manual=_IMAGENET_MANUAL
)
_CIFAR10 = _TfdsSet(
    "cifar10",
    {"train": "train", "validation": "test", "test": "test"},
    10,
    class_names=CIFAR10_CLASS_NAMES,
)


def _tfds_recognition(config, split: str, spec: _TfdsSet) -> _base.TfdsRecognition:
    name = _base.dataset_name(config, spec.builder)
    inner = _base.open_tfds_split(config, name, split, spec.splits, spec.builder, spec.manual)
    names = spec.class_names or _base.tfds_class_names(inner, "label", spec.num_classes)
    return _base.TfdsRecognition(name, split, inner, names)


def build_imagenet(config, split: str) -> _base.TfdsRecognition:
    """``fn(config.dataset, split)`` for ``"imagenet2012"`` (module docstring)."""
    return _tfds_recognition(config, split, _IMAGENET)


def build_cifar10(config, split: str) -> _base.TfdsRecognition:
    """``fn(config.dataset, split)`` for ``"cifar10"`` (module docstring)."""
    return _tfds_recognition(config, split, _CIFAR10)


MINC_LAYOUT = (
    "  <data_dir>/minc-2500/images/<class>/*.jpg            (23 class folders)\n"
    "  <data_dir>/minc-2500/labels/{train,validate,test}<fold>.txt  (lines images/<class>/<file>.jpg)"
)


def build_minc(config, split: str) -> _base.FileRecognition:
    """``fn(config.dataset, split)`` for ``"minc"`` (module docstring)."""
    name = _base.dataset_name(config, "minc")
    prefix = _base.lookup_split(
        name, split, {"train": "train", "validation": "validate", "test": "test"}
    )
    fold = int(_base.cfg_get(config, "fold", 1))
    if not 1 <= fold <= 5:
        raise ValueError(f"dataset {name!r}: config.dataset.fold must be 1..5, got {fold}")
    root = os.path.join(_base.require_data_dir(config, name, MINC_LAYOUT), "minc-2500")
    image_root = _base.require_dir(os.path.join(root, "images"), name, MINC_LAYOUT)
    classes = sorted(
        d for d in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, d))
    )
    if len(classes) != len(MINC_CLASS_NAMES):
        raise ValueError(
            f"dataset {name!r}: {image_root} has {len(classes)} class folders, expected "
            f"{len(MINC_CLASS_NAMES)} ({', '.join(MINC_CLASS_NAMES)})"
        )
    index = {c: k for k, c in enumerate(classes)}
    list_path = _base.require_file(
        os.path.join(root, "labels", f"{prefix}{fold}.txt"), name, MINC_LAYOUT
    )
    paths, labels = [], []
    for line in _base.read_ids(list_path):
        cls = os.path.basename(os.path.dirname(line))
        if cls not in index:
            raise ValueError(
                f"dataset {name!r}: {list_path}: {line!r} is not under images/<class>/"
            )
        paths.append(os.path.join(root, line))
        labels.append(index[cls])
    if not paths:
        raise FileNotFoundError(
            f"dataset {name!r}: {list_path} lists no images\nexpected layout:\n{MINC_LAYOUT}"
        )
    _base.require_all(paths, name, MINC_LAYOUT)
    return _base.FileRecognition(name, split, paths, labels, classes)
