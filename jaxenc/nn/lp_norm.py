"""L_p normalisation along one axis (``torch.nn.functional.normalize``): lp_normalize, Normalize."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import cast_input

Dtype = Any

__all__ = ["Normalize", "lp_normalize"]


def lp_normalize(x: jax.Array, p: float = 2.0, dim: int = -1, eps: float = 1e-8) -> jax.Array:
    """``x / max(||x||_p, eps)`` along ``dim`` (``torch.nn.functional.normalize``).

    The norm is taken in float32 and its gradient is 0 for an all-zero vector (as in torch, where
    the clamp at ``eps`` blocks it), not NaN. ``p`` is any number >= 0 or ``inf``.
    Shapes: any x with ``dim`` in range -> the shape of x, dtype of x.
    """
    where = "lp_normalize"
    x = jnp.asarray(x)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p < 0:
        raise ValueError(f"{where}: p must be a number >= 0 or inf, got {p!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(
            f"{where}: dim={dim!r} is out of range for an input of rank {x.ndim} (shape {tuple(x.shape)})"
        )
    v = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    a = jnp.abs(v)
    if math.isinf(p):
        norm = jnp.max(a, axis=dim, keepdims=True)
    elif p == 0:
        norm = jax.lax.stop_gradient(jnp.sum((v != 0).astype(v.dtype), axis=dim, keepdims=True))
    elif p == 1:
        norm = jnp.sum(a, axis=dim, keepdims=True)
    else:
        total = jnp.sum(v * v if p == 2 else a**p, axis=dim, keepdims=True)
        # d(total^(1/p)) is infinite at 0: route zero vectors through a constant instead.
        zero = total == 0
        norm = jnp.where(zero, 0.0, jnp.where(zero, 1.0, total) ** (1.0 / p))
    return (v / jnp.maximum(norm, eps)).astype(x.dtype)


class Normalize(DtypeFields):
    """L_p normalisation over one axis: ``x / max(||x||_p, 1e-8)`` (upstream ``Normalize(p=2, dim=1)``).

    Used after the Encoding layer in Deep TEN (Zhang et al., "Deep TEN: Texture Encoding Network",
    CVPR 2017). Upstream's default ``dim=1`` is the channel axis of NCHW tensors and the feature axis of
    (B, D) matrices: both are the LAST axis in jaxenc's layouts, hence ``dim=-1`` here. ``dim`` is an
    axis of the jax array. No parameters.

    Shapes: any x -> the shape of x.
    """

    p: float = 2
    dim: int = -1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = cast_input(x, self.dtype)
        try:
            return lp_normalize(x, self.p, self.dim, eps=1e-8)
        except ValueError as err:
            raise ValueError(str(err).replace("lp_normalize", "Normalize", 1)) from None
