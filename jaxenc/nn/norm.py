"""Torch-compatible batch normalisation.

Differences from ``flax.linen.BatchNorm`` that matter for parity with PyTorch checkpoints and
training runs: the running variance is updated with the UNBIASED batch variance (n / (n - 1)), as
torch does; the defaults are torch's (eps 1e-5, momentum 0.9 in Flax's decay convention == torch
0.1); statistics are always computed in float32, with a two-pass variance so that inputs with a
large mean keep their precision.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.fields import DtypeFields

Dtype = Any

__all__ = ["BatchNorm", "SyncBatchNorm", "batch_moments", "batchnorm_axis_override", "normalize"]


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


# Set by jaxenc.nn.convert_sync_batchnorm while a converted module runs: (axis_name, axis_index_groups)
# replaces every BatchNorm's own setting (axis_name None: per-device statistics). Read at trace time.
_AXIS_OVERRIDE: contextvars.ContextVar[tuple[str | None, Any] | None] = contextvars.ContextVar(
    "jaxenc_bn_axis_override", default=None
)

_ACTIVATIONS = ("none", "leaky_relu")
_EPS_MODES = ("plus", "clamp")


@contextlib.contextmanager
def batchnorm_axis_override(axis_name: str | None, axis_index_groups: Any = None):
    """Within this context every jaxenc BatchNorm synchronises over ``axis_name`` (None: not at all)."""
    token = _AXIS_OVERRIDE.set((axis_name, axis_index_groups))
    try:
        yield
    finally:
        _AXIS_OVERRIDE.reset(token)


def effective_axis(axis_name: str | None, axis_index_groups: Any) -> tuple[str | None, Any]:
    """A BatchNorm's own (axis_name, axis_index_groups), unless a conversion context overrides them."""
    override = _AXIS_OVERRIDE.get()
    return (axis_name, axis_index_groups) if override is None else override


def _axis_is_bound(axis_name: str) -> bool:
    try:
        jax.lax.axis_index(axis_name)
    except NameError:
        return False
    return True


def batch_norm_core(
    x: jax.Array,
    *,
    where: str,
    feature_axis: int,
    train: bool,
    mask: jax.Array | None,
    ra_mean: jax.Array,
    ra_var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    momentum: float,
    epsilon: float,
    axis_name: str | None,
    axis_index_groups: Any,
    initializing: bool,
    eps_mode: str = "plus",
    activation: str = "none",
    slope: float = 0.01,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Torch-compatible batch normalisation of ``x`` (features on ``feature_axis``), float32 result.

    Returns the output and, in training outside initialisation, the updated (running mean, running
    unbiased var); None otherwise. Shared by :class:`BatchNorm`, :class:`SyncBatchNorm` and the
    conversion of ``flax.linen.BatchNorm`` layers.
    """
    if eps_mode not in _EPS_MODES:
        raise ValueError(f"{where}: eps_mode must be one of {_EPS_MODES}, got {eps_mode!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    reduce_axes = tuple(a for a in range(x.ndim) if a != feature_axis)
    feature_shape = [1] * x.ndim
    feature_shape[feature_axis] = x.shape[feature_axis]
    update = None
    if train:
        if axis_name is not None and not _axis_is_bound(axis_name):
            if not initializing:
                raise ValueError(
                    f"{where}: axis_name={axis_name!r} is not a mapped axis here. Call the module inside "
                    f"jax.shard_map / jax.pmap over an axis named {axis_name!r}, or set axis_name=None "
                    "(under plain jit with sharded inputs XLA already computes global statistics)"
                )
            axis_name = None  # init runs outside the mapped context: local statistics, no update
        if math.prod(x.shape[a] for a in reduce_axes) == 1 and mask is None and axis_name is None:
            raise ValueError(
                f"{where}: training needs more than 1 value per feature, got input shape {tuple(x.shape)}"
            )
        mean, var, count = batch_moments(
            x, reduce_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
        )
        if not initializing:
            unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
            update = (
                momentum * ra_mean + (1.0 - momentum) * mean,
                momentum * ra_var + (1.0 - momentum) * unbiased,
            )
    else:
        mean, var = ra_mean, ra_var
    y = normalize(x, mean, var, scale, bias, epsilon, feature_shape, eps_mode=eps_mode)
    if activation == "leaky_relu":
        y = jax.nn.leaky_relu(y, slope)
    return y, update


class BatchNorm(DtypeFields):
    """Batch normalisation with PyTorch's numerics (``torch.nn.BatchNorm{1,2,3}d``), any feature axis.

    Ioffe & Szegedy, "Batch Normalization", ICML 2015.

    Shapes: x (..., C) with the features on ``axis`` (default last: NHWC images, (B, D) vectors);
    output has the shape of x. Parameters ``scale``, ``bias`` (C); ``batch_stats`` ``mean``, ``var``
    (C), var stored unbiased like torch's ``running_var``.

    Args:
      num_features: torch's first argument; inferred from the input when None, checked when given.
      momentum: Flax decay convention, 0.9 == torch momentum 0.1.
      epsilon: added to the variance, torch's ``eps``.
      axis_name: mapped axis (shard_map / pmap) over which training statistics are synchronised
        (see :class:`SyncBatchNorm`).
    ``__call__(x, train=False, mask=None)``: batch statistics and a running-average update when
    ``train`` (``batch_stats`` must be mutable), running statistics otherwise. ``mask`` (broadcastable
    to x, True = counted) excludes elements from the statistics.
    """

    num_features: int | None = None
    axis: int = -1
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str | None = None
    axis_index_groups: Any = None

    def _extra(self) -> dict:
        return {}

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        name = type(self).__name__
        if x.ndim < 2:
            raise ValueError(
                f"{name}: expected an input of rank >= 2 (batch and features), got shape {tuple(x.shape)}"
            )
        axis = self.axis % x.ndim
        features = x.shape[axis]
        if self.num_features is not None and features != self.num_features:
            raise ValueError(
                f"{name}: num_features={self.num_features} but the input has {features} features on axis "
                f"{self.axis} (shape {tuple(x.shape)})"
            )
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = (
            self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
            if self.use_scale
            else None
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
            if self.use_bias
            else None
        )
        axis_name, groups = effective_axis(self.axis_name, self.axis_index_groups)
        y, update = batch_norm_core(
            x,
            where=name,
            feature_axis=axis,
            train=train,
            mask=mask,
            ra_mean=ra_mean.value,
            ra_var=ra_var.value,
            scale=scale,
            bias=bias,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=axis_name,
            axis_index_groups=groups,
            initializing=self.is_initializing(),
            **self._extra(),
        )
        if update is not None:
            ra_mean.value, ra_var.value = update
        return y.astype(self.dtype or x.dtype)


class SyncBatchNorm(BatchNorm):
    """Synchronised batch normalisation: exact global statistics over a mapped device axis.

    PyTorch-Encoding's ``SyncBatchNorm`` / ``DistSyncBatchNorm``, torch's ``nn.SyncBatchNorm`` and
    Synchronized-BatchNorm-PyTorch's ``SynchronizedBatchNorm{1,2,3}d`` in one layer (Ioffe & Szegedy,
    ICML 2015; Zhang et al., "Context Encoding for Semantic Segmentation", CVPR 2018).

    Shapes: x (..., C) with the features on ``axis``; output has the shape of x. Variables as
    :class:`BatchNorm` (``params/scale,bias``, ``batch_stats/mean,var``), so checkpoints move freely
    between the two.

    With ``axis_name`` set and inside ``jax.shard_map`` / ``jax.pmap`` over that axis, training
    statistics are ``psum``-ed sums and counts (a shifted two-pass mean and variance), so they are
    the exact statistics of the global batch even when devices hold different numbers of valid
    elements (``mask``); the running mean and UNBIASED running variance are updated with them
    (identically on every device). ``axis_index_groups`` synchronises within groups only. Without
    ``axis_name`` it is exactly :class:`BatchNorm`. ``init`` works outside the mapped context (local
    statistics); applying it in training outside one raises a ValueError naming the axis.

    Args beyond :class:`BatchNorm`:
      eps_mode: "plus" normalises with sqrt(var + eps) (torch); "clamp" with sqrt(max(var, eps))
        (Synchronized-BatchNorm-PyTorch's default).
      activation: "none" or "leaky_relu" (PyTorch-Encoding's activated BN, in training AND
        inference; upstream drops it at inference), with negative ``slope``.
    """

    eps_mode: str = "plus"
    activation: str = "none"
    slope: float = 0.01

    def _extra(self) -> dict:
        return {"eps_mode": self.eps_mode, "activation": self.activation, "slope": self.slope}


def normalize(x, mean, var, scale, bias, epsilon, feature_shape, *, eps_mode: str = "plus"):
    """(x - mean) / sqrt(var + eps) * scale + bias in float32; ``eps_mode='clamp'`` uses sqrt(max(var, eps))."""
    inv = jax.lax.rsqrt(var + epsilon if eps_mode == "plus" else jnp.maximum(var, epsilon))
    if scale is not None:
        inv = inv * scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - mean.reshape(feature_shape)) * inv.reshape(feature_shape)
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(feature_shape)
    return y
