"""ADE20K / MIT SceneParse150 (150 classes), ``config.dataset.name = "ade20k"``.

Two backends (``config.dataset.backend``: "auto" = the folder when it exists, else TFDS):

* **folder** (the benchmark; what upstream reads): the ADEChallengeData2016 release,
  ``<data_dir>/ADEChallengeData2016/images/{training,validation}/*.jpg`` and
  ``<data_dir>/ADEChallengeData2016/annotations/{training,validation}/<same stem>.png``. The
  annotations are single-channel PNGs: 0 = "other" (unlabelled), k = class k (1..150). Labels follow
  upstream (mask - 1): 0 -> -1 ignore, k -> k-1. Splits: train (training/, 20210 images),
  validation (validation/, 2000), trainval (both). Upstream asserts those counts; here any subset
  is accepted.
* **tfds**: TFDS ``scene_parse150``. Its builder does NOT ship the 150-class semantic annotations: it
  downloads ChallengeData2017 ``annotations_instance.tar``, the Places Challenge 2017 *instance*
  masks (RGB; R = instance category id in a 100-"thing"-category list, G = instance id; see
  ``placeschallenge/instancesegmentation``). So this backend labels only those 100 object classes,
  mapped by name onto their 150-class index (e.g. instance "bed" (1) -> class "bed" (7)); every
  stuff class (wall, floor, sky, road, grass, ...) and every unlabelled pixel is -1 (ignore). It
  is a partial labelling of ADE20K, not the SceneParse150 benchmark. TFDS splits: train, test
  (= the 2000 validation images) -> exposed as "train" and "validation".

The raw -> class mappings are ``SEMANTIC_LABELS`` and ``INSTANCE_LABELS`` (``LabelTable``s).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from train.data.sources import _base

log = logging.getLogger(__name__)

NAME = "ade20k"
TFDS_NAME = "scene_parse150"
FOLDER = "ADEChallengeData2016"

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
NUM_CLASSES = len(CLASS_NAMES)

# The standard ADE20K visualisation colours (row = class index 0..149), as used by the common
# segmentation toolboxes.
PALETTE = np.array([
    120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140, 140, 140, 204, 5, 255,
    230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61, 120, 120, 70, 8, 255, 51, 255, 6, 82,
    143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70, 3, 0, 102, 200, 61, 230, 250, 255, 6, 51, 11, 102, 255,
    255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220, 255, 9, 92, 112, 9, 255, 8, 255, 214, 7, 255, 224,
    255, 184, 6, 10, 255, 71, 255, 41, 10, 7, 255, 255, 224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7,
    255, 122, 8, 0, 255, 20, 255, 8, 41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255,
    140, 140, 140, 250, 10, 15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0, 153, 255, 0, 0, 0, 255,
    255, 71, 0, 0, 235, 255, 0, 173, 255, 31, 0, 255, 11, 200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255,
    0, 255, 112, 0, 255, 133, 255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0,
    0, 82, 255, 0, 255, 41, 0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153, 255, 92, 0, 255, 0, 255,
    255, 0, 245, 255, 0, 102, 255, 173, 0, 255, 0, 20, 255, 184, 184, 0, 31, 255, 0, 255, 61, 0, 71, 255,
    255, 0, 204, 0, 255, 194, 0, 255, 82, 0, 10, 255, 0, 112, 255, 51, 0, 255, 0, 194, 255, 0, 122, 255,
    0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0, 143, 255, 0, 82, 0, 255, 163, 255, 0, 255, 235, 0,
    8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0, 255, 255, 0, 31, 0, 184, 255, 0, 214, 255, 255, 0, 112,
    92, 255, 0, 0, 224, 255, 112, 224, 255, 70, 184, 160, 163, 0, 255, 153, 0, 255, 71, 255, 0, 255, 0, 163,
    255, 204, 0, 255, 0, 143, 0, 255, 235, 133, 255, 0, 255, 0, 235, 245, 0, 255, 255, 0, 122, 255, 245, 0,
    10, 190, 212, 214, 255, 0, 0, 204, 255, 20, 0, 255, 255, 255, 0, 0, 153, 255, 0, 41, 255, 0, 255, 204,
    41, 0, 255, 41, 255, 0, 173, 0, 255, 0, 245, 255, 71, 0, 255, 122, 0, 255, 0, 255, 184, 0, 92, 255,
    184, 255, 0, 0, 133, 255, 255, 214, 0, 25, 194, 194, 102, 255, 0, 92, 0, 255,
], np.uint8).reshape(NUM_CLASSES, 3)

# Places Challenge 2017 instance-segmentation categories (R channel of annotations_instance PNGs),
# ids 1..100 in this order.
INSTANCE_CLASS_NAMES = (
    "bed", "windowpane", "cabinet", "person", "door", "table", "curtain", "chair", "car", "painting", "sofa",
    "shelf", "mirror", "armchair", "seat", "fence", "desk", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "box", "column", "signboard", "chest of drawers", "counter", "sink", "fireplace",
    "refrigerator", "stairs", "case", "pool table", "pillow", "screen door", "bookcase", "coffee table",
    "toilet", "flower", "book", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "arcade machine", "bus", "towel", "light", "truck", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "apparel", "pole", "bannister", "ottoman",
    "bottle", "van", "ship", "fountain", "washer", "plaything", "stool", "barrel", "basket", "bag",
    "minibike", "oven", "ball", "food", "step", "trade name", "microwave", "pot", "animal", "bicycle",
    "dishwasher", "screen", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "plate", "monitor", "bulletin board", "radiator", "glass", "clock", "flag",
)

# Semantic annotations (folder backend): 0 "other" -> -1, k -> k-1 (upstream's mask - 1).
SEMANTIC_LABELS = _base.shift_table(NUM_CLASSES, size=256)
# Instance annotations (TFDS backend): channel 0 (R) = instance category 1..100 -> its 150-class index.
INSTANCE_LABELS = _base.LabelTable.from_pairs(
    {k + 1: CLASS_NAMES.index(name) for k, name in enumerate(INSTANCE_CLASS_NAMES)}, size=256, channel=0)

_FOLDER_SPLITS = {"train": ("training",), "validation": ("validation",), "trainval": ("training", "validation")}
_TFDS_SPLITS = {"train": "train", "validation": "test"}

LAYOUT = (f"  <data_dir>/{FOLDER}/images/{{training,validation}}/*.jpg\n"
          f"  <data_dir>/{FOLDER}/annotations/{{training,validation}}/<same stem>.png  (0 = other, 1..150)\n"
          f"or TFDS {TFDS_NAME!r} prepared (array_record) in <data_dir>")


def _folder(config, split: str, name: str) -> _base.FileSegmentation:
    subdirs = _base.lookup_split(name, split, _FOLDER_SPLITS)
    root = os.path.join(_base.require_data_dir(config, name, LAYOUT), FOLDER)
    images, masks = [], []
    for sub in subdirs:
        image_dir = _base.require_dir(os.path.join(root, "images", sub), name, LAYOUT)
        mask_dir = _base.require_dir(os.path.join(root, "annotations", sub), name, LAYOUT)
        found = _base.list_images(image_dir)
        if not found:
            raise FileNotFoundError(f"dataset {name!r}: no images in {image_dir}\nexpected layout:\n{LAYOUT}")
        images += found
        masks += [os.path.join(mask_dir, os.path.splitext(os.path.basename(p))[0] + ".png") for p in found]
    _base.require_all(masks, name, LAYOUT)
    return _base.FileSegmentation(name, split, images, masks, SEMANTIC_LABELS, CLASS_NAMES)


def _tfds(config, split: str, name: str) -> _base.TfdsSegmentation:
    tfds_split = _base.lookup_split(name, split, _TFDS_SPLITS)
    root = _base.data_dir(config)
    hint = (f"put the ADEChallengeData2016 release under <data_dir>/{FOLDER}/ (the folder backend, 150-class "
            f"semantic labels), or {_base.tfds_prepare_hint(TFDS_NAME, root)}")
    inner = _base.open_tfds(name, TFDS_NAME, tfds_split, root, hint)
    log.warning("dataset %r: TFDS %r carries instance masks; only its 100 object classes are labelled (stuff "
                "classes are -1). For the 150-class benchmark use the folder backend (%s).", name, TFDS_NAME, FOLDER)
    return _base.TfdsSegmentation(name, split, inner, "image", "annotation", INSTANCE_LABELS, CLASS_NAMES)


def build(config, split: str):
    """``fn(config.dataset, split)`` for the registry (module docstring)."""
    name = _base.dataset_name(config, NAME)
    choice = _base.backend(config, name)
    if choice == "auto":
        root = _base.data_dir(config)
        choice = "folder" if root is not None and os.path.isdir(os.path.join(root, FOLDER)) else "tfds"
    return _folder(config, split, name) if choice == "folder" else _tfds(config, split, name)
