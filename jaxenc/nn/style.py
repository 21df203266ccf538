"""Style-transfer layers of MSG-Net (PyTorch-Encoding): gram_matrix, GramMatrix, Inspiration, NHWC.

Zhang & Dana, "Multi-style Generative Network for Real-time Transfer", arXiv:1703.06953. Inspiration
takes the target Gram matrix as a call argument (upstream's ``setTarget`` state has no JAX meaning).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import cast_input
from jaxenc.validation import check_channels, check_positive_int, check_rank

Dtype = Any

__all__ = ["GramMatrix", "Inspiration", "gram_matrix"]


def gram_matrix(x: jax.Array) -> jax.Array:
    """Per-sample Gram matrix ``F·Fᵀ / (C·H·W)`` of NHWC features (PyTorch-Encoding ``GramMatrix``).

    Shapes: x (B, H, W, C) -> (B, C, C), entry (c, c') = Σ_{h,w} x[b,h,w,c]·x[b,h,w,c'] / (C·H·W),
    in x's dtype (float32 accumulation).
    """
    x = jnp.asarray(x)
    check_rank(x, 4, "B, H, W, C", "gram_matrix")
    b, h, w, c = x.shape
    feats = x.reshape(b, h * w, c)
    gram = jnp.einsum("bnc,bne->bce", feats, feats, preferred_element_type=jnp.float32)
    return (gram / (c * h * w)).astype(x.dtype)


class GramMatrix(DtypeFields):
    """Per-sample Gram matrix of NHWC features, F·Fᵀ / (C·H·W) (Zhang & Dana, MSG-Net). See :func:`gram_matrix`.

    Shapes: (B, H, W, C) -> (B, C, C). No parameters.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = cast_input(x, self.dtype)
        return gram_matrix(x)


class Inspiration(DtypeFields):
    """Inspiration (CoMatch) layer of MSG-Net (Zhang & Dana, arXiv:1703.06953).

    P = W·G, then every pixel's feature vector f becomes Pᵀ f. Parameter ``weight`` (1, C, C), init
    U(0, 0.02). The target Gram matrix G (from :func:`gram_matrix` of the style features) is a call
    argument: upstream stores it with ``setTarget``, which has no JAX counterpart. ``B`` (upstream:
    the batch of the placeholder G) is kept for signature compatibility; G's batch may be 1 (shared)
    or x's batch.

    Shapes: x (B, H, W, C), target_gram (1 or B, C, C) -> (B, H, W, C).
    """

    C: int
    B: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, target_gram: jax.Array) -> jax.Array:
        where = "Inspiration"
        check_positive_int(self.C, "C", where)
        check_positive_int(self.B, "B", where)
        x, target_gram = jnp.asarray(x), jnp.asarray(target_gram)
        check_rank(x, 4, "B, H, W, C", where)
        check_channels(x, self.C, where, name="C")
        check_rank(target_gram, 3, "B, C, C", where, name="target_gram")
        if target_gram.shape[1:] != (self.C, self.C) or target_gram.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"{where}: target_gram must have shape (1 or {x.shape[0]}, {self.C}, {self.C}) for C={self.C} "
                f"and an input batch of {x.shape[0]}, got {tuple(target_gram.shape)}"
            )
        weight = self.param(
            "weight",
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, 0.0, 0.02),
            (1, self.C, self.C),
            self.param_dtype,
        )
        x, weight, target_gram = promote_dtype(x, weight, target_gram, dtype=self.dtype)
        p = jnp.einsum(
            "ij,bjk->bik", weight[0], target_gram, preferred_element_type=jnp.float32
        ).astype(x.dtype)
        # y[b, c] = Σ_c' P[b, c', c]·x[b, c']: upstream's Pᵀ·X_flat, with G's batch broadcast as its expand does.
        if p.shape[0] == 1:
            y = jnp.einsum("bhwi,ic->bhwc", x, p[0], preferred_element_type=jnp.float32)
        else:
            y = jnp.einsum("bhwi,bic->bhwc", x, p, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
