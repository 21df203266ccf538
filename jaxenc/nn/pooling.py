"""Pooling and downsampling layers (holocron.nn: ZPool, ...), NHWC."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def z_pool(x: jax.Array, dim: int = -1) -> jax.Array:
    """Concatenate max and mean over ``dim``, max first: size 2 along ``dim``.

    Misra et al., "Rotate to Attend: Convolutional Triplet Attention Module", WACV 2021.
    Shapes: x (..., C) with the default ``dim=-1`` (the NHWC channel axis) -> (..., 2).
    """
    dim = dim % x.ndim if -x.ndim <= dim < x.ndim else _bad_dim(x, dim)
    return jnp.concatenate(
        [jnp.max(x, axis=dim, keepdims=True), jnp.mean(x, axis=dim, keepdims=True, dtype=jnp.float32).astype(x.dtype)],
        axis=dim,
    )


def _bad_dim(x, dim):
    raise ValueError(f"ZPool: dim={dim} is out of range for an input of rank {x.ndim} (shape {tuple(x.shape)})")


class ZPool(nn.Module):
    """holocron.nn.ZPool: [max, mean] over ``dim``. NHWC: the default ``dim=-1`` pools channels.

    Shapes: (N, H, W, C) -> (N, H, W, 2).
    """

    dim: int = -1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return z_pool(x, self.dim)
