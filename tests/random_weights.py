"""Random weights for a recipe's model without running its init (slow on CPU), saved as a native
``.msgpack``: the stand-in for a trained checkpoint in the predict and evaluation tests."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from jaxenc.models import native
from train.trainer import build_model


def save_random_weights(config, path: Path, seed: int = 3, size: int = 32) -> dict:
    """He-style random weights for ``config``'s model (traced at ``size`` x ``size``), BatchNorm
    statistics at mean 0 / variance 1, saved at ``path``; returns the variables."""
    model = build_model(config)
    example = np.zeros((1, size, size, 3), np.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), example)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "mean":
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0
        if fan_in:
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        centre = 1.0 if name == "scale" else 0.0
        return (centre + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    variables = {
        "params": jax.tree_util.tree_map_with_path(fill, shapes["params"]),
        "batch_stats": jax.tree_util.tree_map_with_path(fill, shapes.get("batch_stats", {})),
    }
    native.save_checkpoint(path, variables)
    return variables
