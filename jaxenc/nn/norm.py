"""Torch-compatible batch normalisation.

Differences from ``flax.linen.BatchNorm`` that matter for parity with PyTorch checkpoints and
training runs: the running variance is updated with the UNBIASED batch variance (n / (n - 1)), as
torch does; the defaults are torch's (eps 1e-5, momentum 0.9 in Flax's decay convention == torch
0.1); statistics are always computed in float32, with a two-pass variance so that inputs with a
large mean keep their precision.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

__all__ = ["BatchNorm", "batch_moments", "normalize"]


def batch_moments(
    x: jax.Array,
    reduce_axes: Sequence[int],
    *,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, biased variance and element count of ``x`` over ``reduce_axes`` (float32).

    With ``axis_name`` the statistics are the exact global ones over every device on that mapped
    axis: sums and counts are ``psum``-ed, so devices with unequal counts are weighted correctly.
    ``mask`` (broadcastable to ``x``, True = counted) excludes elements.

    Returns:
      mean, var: shape of ``x`` without ``reduce_axes``; count: float32, a scalar without ``mask``,
      else per feature.
    """
    x = x.astype(jnp.float32)
    reduce_axes = tuple(reduce_axes)

    def total(v):
        s = jnp.sum(v, axis=reduce_axes)
        if axis_name is not None:
            s = jax.lax.psum(s, axis_name, axis_index_groups=axis_index_groups)
        return s

    if mask is None:
        count = jnp.asarray(float(math.prod(x.shape[a] for a in reduce_axes)), jnp.float32)
        if axis_name is not None:
            count = jax.lax.psum(count, axis_name, axis_index_groups=axis_index_groups)
        weights = None
    else:
        weights = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
        count = total(weights)
    safe = jnp.maximum(count, 1.0)
    # Shifted two-pass moments: a first (rounded) mean m0, then sums of x - m0, which are small.
    # The correction d = E[x - m0] removes m0's rounding error and var = E[(x - m0)^2] - d^2 has no
    # cancellation, so inputs with |mean| >> std keep float32 precision.
    m0 = jax.lax.stop_gradient(total(x if weights is None else x * weights) / safe)
    centred = x - jnp.expand_dims(m0, reduce_axes)
    if weights is not None:
        centred = centred * weights
    d = total(centred) / safe
    var = jnp.maximum(total(centred * centred) / safe - d * d, 0.0)
    mean = m0 + d
    return mean, var, count


class BatchNorm(nn.Module):
    """Batch normalisation with PyTorch's numerics (``torch.nn.BatchNorm{1,2,3}d``), any feature axis.

    Ioffe & Szegedy, "Batch Normalization", ICML 2015.

    Shapes: x (..., C) with the features on ``axis`` (default last: NHWC images, (B, D) vectors);
    output has the shape of x. Parameters ``scale``, ``bias`` (C); ``batch_stats`` ``mean``, ``var``
    (C), var stored unbiased like torch's ``running_var``.

    Args:
      num_features: torch's first argument; inferred from the input when None, checked when given.
      momentum: Flax decay convention, 0.9 == torch momentum 0.1.
      epsilon: added to the variance, torch's ``eps``.
      axis_name: mapped axis (shard_map / pmap) over which training statistics are synchronised.
    ``__call__(x, train=False, mask=None)``: batch statistics and a running-average update when
    ``train`` (``batch_stats`` must be mutable), running statistics otherwise.
    """

    num_features: int | None = None
    axis: int = -1
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str | None = None
    axis_index_groups: Any = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        name = type(self).__name__
        if x.ndim < 2:
            raise ValueError(f"{name}: expected an input of rank >= 2 (batch and features), got shape {tuple(x.shape)}")
        axis = self.axis % x.ndim
        features = x.shape[axis]
        if self.num_features is not None and features != self.num_features:
            raise ValueError(
                f"{name}: num_features={self.num_features} but the input has {features} features on axis "
                f"{self.axis} (shape {tuple(x.shape)})"
            )
        reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
        feature_shape = [1] * x.ndim
        feature_shape[axis] = features

        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype) if self.use_bias else None

        if train:
            static_count = 1
            for a in reduce_axes:
                static_count *= x.shape[a]
            if static_count == 1 and mask is None and self.axis_name is None:
                raise ValueError(
                    f"{name}: training needs more than 1 value per feature, got input shape {tuple(x.shape)}"
                )
            mean, var, count = batch_moments(
                x, reduce_axes, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups
            )
            if not self.is_initializing():
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        y = normalize(x, mean, var, scale, bias, self.epsilon, feature_shape)
        return y.astype(self.dtype or x.dtype)


def normalize(x, mean, var, scale, bias, epsilon, feature_shape, *, eps_mode: str = "plus"):
    """(x - mean) / sqrt(var + eps) * scale + bias in float32; ``eps_mode='clamp'`` uses sqrt(max(var, eps))."""
    inv = jax.lax.rsqrt(var + epsilon if eps_mode == "plus" else jnp.maximum(var, epsilon))
    if scale is not None:
        inv = inv * scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - mean.reshape(feature_shape)) * inv.reshape(feature_shape)
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(feature_shape)
    return y
