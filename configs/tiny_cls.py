"""Smoke-test recognition recipe: ``configs/tiny.py``'s sizes on the built-in ``shapes_cls`` set with
a shrunk ResNet-18 (8-channel stages), seconds on one core.

    python -m train.main --config configs/tiny_cls.py --workdir /tmp/tiny_cls
    python -m train.evaluate --config configs/tiny_cls.py --checkpoint /tmp/tiny_cls --outdir /tmp/tiny_cls/eval

What the recognition paths of the trainer, ``train.evaluate`` and their tests run.
"""

from __future__ import annotations

import ml_collections

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.name = "tiny_cls"
    c.task = "recognition"
    c.dataset.name = "shapes_cls"
    c.dataset.num_classes = 5
    c.model.name = "resnet18"
    c.model.kwargs = ml_collections.ConfigDict(
        {"layers": (1, 1, 1, 1), "stage_planes": (8, 16, 32, 64)}
    )
    c.train.best_metric = "top1"
    return c
