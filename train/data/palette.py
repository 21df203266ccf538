"""Colour maps for label images: the Pascal VOC palette that upstream uses for every dataset."""

from __future__ import annotations

import numpy as np

from jaxenc.validation import check_positive_int

__all__ = ["voc_palette"]


def voc_palette(num_classes: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (as upstream ``encoding.utils.pallete``): (num_classes, 3) uint8.
    Class 0 is black; white never occurs for num_classes <= 256, so it can mark ignore pixels."""
    num_classes = check_positive_int(num_classes, "num_classes", "voc_palette")
    out = np.zeros((num_classes, 3), np.int64)
    for i in range(num_classes):
        c, j = i, 0
        while c:
            for ch in range(3):
                out[i, ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
            j += 1
    return (out % 256).astype(np.uint8)
