"""Squeeze-and-excitation channel gate of MaxViT's MBConv (vit-pytorch 1.26.11 ``max_vit``).

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018. NHWC; the gate is computed in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import check_features, compute_dtype, torch_linear
from jaxenc.validation import check_positive_int, check_rank

Dtype = Any

__all__ = ["SqueezeExcitation"]


class _SEGate(DtypeFields):
    """Upstream's ``gate`` nn.Sequential: mean over H, W -> "1" Linear -> SiLU -> "3" Linear -> sigmoid."""

    dim: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
        y = nn.silu(
            torch_linear(self.hidden, self.dim, False, "1", self)(pooled).astype(jnp.float32)
        )
        y = jax.nn.sigmoid(
            torch_linear(self.dim, self.hidden, False, "3", self)(y).astype(jnp.float32)
        )
        return y[:, None, None, :]


class SqueezeExcitation(DtypeFields):
    """Squeeze-and-excitation channel gate of MaxViT's MBConv (vit-pytorch ``max_vit.SqueezeExcitation``).

    Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018; as used in Tu et al., "MaxViT:
    Multi-Axis Vision Transformer", ECCV 2022.

    Shapes: x (N, H, W, dim) -> (N, H, W, dim); out = x * sigmoid(W3 silu(W1 mean_HW(x))), with
    hidden = int(dim * shrinkage_rate). Parameters (torch keys): ``gate.1.weight`` (hidden, dim),
    ``gate.3.weight`` (dim, hidden), no biases.
    """

    dim: int
    shrinkage_rate: float = 0.25

    def __post_init__(self):
        check_positive_int(self.dim, "dim", "SqueezeExcitation")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "SqueezeExcitation"
        x = jnp.asarray(x)
        check_rank(x, 4, "N, H, W, C", where)
        check_features(x, self.dim, where)
        dtype = compute_dtype(self, x)
        gate = _SEGate(
            self.dim, int(self.dim * self.shrinkage_rate), self.dtype, self.param_dtype, name="gate"
        )(x)
        return (x.astype(jnp.float32) * gate).astype(dtype)
