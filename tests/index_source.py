"""A toy source whose element i is {"index": i}: the record order of a stream, read through the
public pipeline API (order, coverage, sharding and skip checks)."""

from __future__ import annotations

import numpy as np


class IndexSource:
    """``len`` n; element i is ``{"index": int64 i}``."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": np.asarray(i, np.int64)}
