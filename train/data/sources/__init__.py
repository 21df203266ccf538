"""Real-dataset adapters, registered with ``train.data.pipeline`` on import (README, Datasets).

Every adapter is ``fn(config.dataset, split) -> source``: a random-access, picklable source whose
examples are ``{"image": uint8 (H, W, 3), "mask": int32 (H, W)}`` (labels 0..num_classes-1, -1 =
ignore) or ``{"image": uint8 (H, W, 3), "label": int32 ()}``, with attributes ``num_classes`` and
``class_names``. ``config.dataset.data_dir`` is where the data lives (None: TFDS's default). An
unknown split raises ValueError naming the available ones; missing data raises FileNotFoundError
naming the path (or TFDS dataset) and how to prepare it. A record that cannot be read (a
truncated or non-image file, mask labels outside the classes) raises
``train.data.bad_examples.BadExample`` (a ValueError with the path) when it is read. Two-backend
adapters (ade20k, cityscapes) read ``config.dataset.backend``: "auto" (the local folder when it
exists, else TFDS), "folder" or "tfds". TFDS is imported only when a TFDS backend is opened.
"""

from __future__ import annotations

from train.data import pipeline
from train.data.sources import ade20k, cityscapes, coco, folders, pascal, recognition

_REGISTRY = (
    ("ade20k", ade20k.build, ade20k.PALETTE),
    ("cityscapes", cityscapes.build, cityscapes.PALETTE),
    ("pascal_voc", pascal.build_voc, pascal.VOC_PALETTE),
    ("pcontext", pascal.build_context, pascal.CONTEXT_PALETTE),
    ("coco", coco.build, coco.PALETTE),
    ("imagenet2012", recognition.build_imagenet, None),
    ("cifar10", recognition.build_cifar10, None),
    ("minc", recognition.build_minc, None),
    ("image_folder", folders.build_image_folder, None),
    ("seg_folder", folders.build_seg_folder, None),
)
NAMES = tuple(name for name, _, _ in _REGISTRY)


def register_all(*, overwrite: bool = True) -> None:
    """Registers every adapter (idempotent: re-registration replaces the entry)."""
    for name, fn, palette in _REGISTRY:
        pipeline.register_source(name, fn, palette=palette, overwrite=overwrite)


register_all()
