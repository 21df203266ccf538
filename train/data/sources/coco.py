"""COCO 2017 restricted to the 20 PASCAL VOC categories (21 classes with background), ``"coco"``.

TFDS ``coco/2017`` is not usable (its builder imports TensorFlow and has no semantic masks), so the
adapter reads images plus **pre-rendered** class masks::

      <data_dir>/{train2017,val2017}/<image id, 12 digits>.jpg        (the official image zips)
      <data_dir>/masks_voc/{train2017,val2017}/<same stem>.png        (0..20, 255 = ignore)

Every mask file is one example; 255 and values above 20 -> -1. ``prepare_voc_masks`` renders them
from ``annotations/instances_{split}.json`` without pycocotools, as upstream's COCOSegmentation:
``CAT_LIST[k]`` is VOC class k, other categories are background, the first instance covering a
pixel wins, crowd regions are painted too, and only images with more than
``min_foreground_pixels`` (1000) VOC pixels are kept. Deviation: polygons are rasterised with PIL
(may differ from pycocotools by a pixel along boundaries); RLE masks are decoded exactly.
Splits: train (train2017), validation (val2017).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from train.data.sources import _base
from train.data.sources.pascal import VOC_CLASS_NAMES, VOC_PALETTE

NAME = "coco"
CLASS_NAMES = VOC_CLASS_NAMES
PALETTE = VOC_PALETTE
LABELS = _base.identity_table(len(CLASS_NAMES))
CAT_LIST = (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
_CAT_TO_CLASS = {cat: k for k, cat in enumerate(CAT_LIST) if k > 0}
MASK_FOLDER = "masks_voc"

_SPLITS = {"train": "train2017", "validation": "val2017"}
LAYOUT = (
    "  <data_dir>/{train2017,val2017}/<stem>.jpg\n"
    f"  <data_dir>/{MASK_FOLDER}/{{train2017,val2017}}/<stem>.png  (0..20, 255 = ignore)\n"
    "  (render the masks with train.data.sources.coco.prepare_voc_masks(data_dir, split) from "
    "<data_dir>/annotations/instances_<split>.json)"
)


def build(config, split: str) -> _base.FileSegmentation:
    """``fn(config.dataset, split)`` for the registry (module docstring)."""
    name = _base.dataset_name(config, NAME)
    folder = _base.lookup_split(name, split, _SPLITS)
    root = _base.require_data_dir(config, name, LAYOUT)
    mask_dir = _base.require_dir(os.path.join(root, MASK_FOLDER, folder), name, LAYOUT)
    image_dir = _base.require_dir(os.path.join(root, folder), name, LAYOUT)
    masks = [p for p in _base.list_images(mask_dir) if p.lower().endswith(".png")]
    images = _base.paired_by_stem(masks, "masks", mask_dir, image_dir, ".jpg", name, LAYOUT)
    _base.require_all(images, name, LAYOUT)
    return _base.FileSegmentation(name, split, images, masks, LABELS, CLASS_NAMES)


# -- mask rendering ------------------------------------------------------------------------------


def rle_counts_from_string(s: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (each count: 5-bit groups as chars from '0',
    0x20 = more groups follow, sign from 0x10 of the last group; from the third count on, stored
    as a difference to the count two places back)."""
    counts: list[int] = []
    pos = 0
    while pos < len(s):
        value, shift, more = 0, 0, True
        while more:
            c = ord(s[pos]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(counts: Iterable[int], height: int, width: int) -> np.ndarray:
    """bool (H, W) from run lengths (alternating 0/1 runs starting with 0, column-major)."""
    counts = np.asarray(list(counts), np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE covers {counts.sum()} pixels, expected {height * width}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape(width, height).T


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """bool (H, W) mask of one COCO annotation's ``segmentation`` (polygons, RLE or compressed RLE)."""
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in segmentation:
            if len(poly) >= 6:
                draw.polygon(
                    [(float(x), float(y)) for x, y in zip(poly[0::2], poly[1::2])],
                    fill=1,
                    outline=1,
                )
        return np.asarray(canvas, np.uint8).astype(bool)
    counts = segmentation["counts"]
    h, w = (int(v) for v in segmentation.get("size", (height, width)))
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts.decode() if isinstance(counts, bytes) else counts)
    return decode_rle(counts, h, w)


def render_voc_mask(
    annotations: Iterable[Mapping[str, Any]], height: int, width: int
) -> np.ndarray:
    """uint8 (H, W) VOC-class mask (0 = background, 1..20) of one image's COCO instance annotations:
    ``CAT_LIST`` mapping, other categories skipped, the first instance covering a pixel wins."""
    mask = np.zeros((height, width), np.uint8)
    for ann in annotations:
        cls = _CAT_TO_CLASS.get(int(ann["category_id"]))
        if cls is None:
            continue
        cover = decode_segmentation(ann["segmentation"], height, width)
        mask[cover & (mask == 0)] = cls
    return mask


def prepare_voc_masks(data_dir: str, split: str, *, min_foreground_pixels: int = 1000) -> int:
    """Writes ``<data_dir>/masks_voc/<split>/<stem>.png`` (palette PNGs, values 0..20) for every image
    of ``<data_dir>/annotations/instances_<split>.json`` with more than ``min_foreground_pixels``
    VOC-class pixels; returns how many masks were written. ``split``: "train2017" or "val2017"."""
    ann_path = os.path.join(data_dir, "annotations", f"instances_{split}.json")
    _base.require_file(ann_path, NAME, LAYOUT)
    with open(ann_path) as f:
        data = json.load(f)
    by_image = collections.defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    out_dir = os.path.join(data_dir, MASK_FOLDER, split)
    os.makedirs(out_dir, exist_ok=True)
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(PALETTE)] = PALETTE
    palette[255] = 255
    written = 0
    for info in data["images"]:
        mask = render_voc_mask(
            by_image.get(info["id"], ()), int(info["height"]), int(info["width"])
        )
        if int(np.count_nonzero(mask)) <= min_foreground_pixels:
            continue
        img = Image.frombytes(
            "P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes()
        )
        img.putpalette(palette.tobytes())
        stem = os.path.splitext(info["file_name"])[0]
        img.save(os.path.join(out_dir, stem + ".png"))
        written += 1
    return written
