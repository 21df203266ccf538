"""Whole-model BatchNorm tools: switching a module tree to synchronised BatchNorm and back, and
precise-BN recalibration of running statistics.

Conversion is the JAX answer to Synchronized-BatchNorm-PyTorch's ``convert_model`` and torch's
``nn.SyncBatchNorm.convert_sync_batchnorm``: Flax modules are immutable and their submodules are
often created inside ``@nn.compact`` methods, so instead of rebuilding the tree, the converted
module runs the original one in the same variable scope with every BatchNorm switched to
synchronised statistics. Variables are untouched: the converted module loads the original's
checkpoints, and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.norm import batch_norm_core, batchnorm_axis_override

__all__ = [
    "SyncBatchNormConverted",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "recompute_batch_stats",
]


def _flax_feature_axis(module: nn.BatchNorm, x: jax.Array) -> int:
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    if len(axes) != 1:
        raise ValueError(
            f"convert_sync_batchnorm: flax.linen.BatchNorm with several feature axes {tuple(axes)} is not "
            "supported; use one feature axis"
        )
    return axes[0] % x.ndim


def _flax_batchnorm_as_sync(
    module: nn.BatchNorm, axis_name, axis_index_groups, x, use_running_average=None, *, mask=None
):
    """A bound ``flax.linen.BatchNorm`` call computed as a jaxenc SyncBatchNorm on its own variables
    (torch numerics: unbiased running variance; the module's momentum, epsilon and feature axis)."""
    scope = module.scope
    train = not nn.merge_param(
        "use_running_average", module.use_running_average, use_running_average
    )
    y, update = batch_norm_core(
        x,
        where="flax.linen.BatchNorm (converted to SyncBatchNorm)",
        feature_axis=_flax_feature_axis(module, x),
        train=train,
        mask=mask,
        ra_mean=scope.get_variable("batch_stats", "mean"),
        ra_var=scope.get_variable("batch_stats", "var"),
        scale=scope.get_variable("params", "scale") if module.use_scale else None,
        bias=scope.get_variable("params", "bias") if module.use_bias else None,
        momentum=module.momentum,
        epsilon=module.epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        initializing=False,
    )
    if update is not None:
        scope.put_variable("batch_stats", "mean", update[0])
        scope.put_variable("batch_stats", "var", update[1])
    return y.astype(module.dtype or x.dtype)


class SyncBatchNormConverted(nn.Module):
    """``module`` with every BatchNorm synchronised over ``axis_name`` (None: per-device statistics).

    Made by :func:`convert_sync_batchnorm` / :func:`revert_sync_batchnorm`. It shares ``module``'s
    variable scope, so its variables are exactly ``module``'s. jaxenc ``BatchNorm`` /
    ``SyncBatchNorm`` layers keep their other settings; ``flax.linen.BatchNorm`` layers are computed
    as jaxenc SyncBatchNorm with their own momentum, epsilon and feature axis (and from then on store
    the unbiased running variance, as torch does). Calls go to ``module.__call__`` with the same
    arguments.
    """

    module: nn.Module
    axis_name: str | None = "data"
    axis_index_groups: Any = None

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        def intercept(next_fun, call_args, call_kwargs, context):
            if (
                isinstance(context.module, nn.BatchNorm)
                and context.method_name == "__call__"
                and not context.module.is_initializing()
            ):
                return _flax_batchnorm_as_sync(
                    context.module,
                    self.axis_name,
                    self.axis_index_groups,
                    *call_args,
                    **call_kwargs,
                )
            return next_fun(*call_args, **call_kwargs)

        with (
            batchnorm_axis_override(self.axis_name, self.axis_index_groups),
            nn.intercept_methods(intercept),
        ):
            return self.module(*args, **kwargs)


def convert_sync_batchnorm(
    module: nn.Module, axis_name: str | None = "data", *, axis_index_groups: Any = None
):
    """Return ``module`` with every BatchNorm (jaxenc or flax.linen) synchronised over ``axis_name``.

    The result is a :class:`SyncBatchNormConverted` with the same variables as ``module``; use it
    inside ``jax.shard_map`` / ``jax.pmap`` over ``axis_name`` (``init`` works anywhere). Converting
    an already converted module replaces its axis. ``axis_name=None`` is the reverse conversion
    (:func:`revert_sync_batchnorm`).
    """
    if isinstance(module, SyncBatchNormConverted):
        module = module.module
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_sync_batchnorm: expected a flax.linen.Module, got {type(module).__name__}"
        )
    return SyncBatchNormConverted(module, axis_name=axis_name, axis_index_groups=axis_index_groups)


def revert_sync_batchnorm(module: nn.Module):
    """Return ``module`` with every BatchNorm computing per-device statistics (no ``axis_name``),
    e.g. to evaluate or fine-tune a SyncBatchNorm model on one device. Variables are unchanged."""
    return convert_sync_batchnorm(module, None)


def recompute_batch_stats(
    apply_fn: Callable[[Any, Any], tuple[Any, Any]], variables: dict, batches: Iterable[Any]
) -> dict:
    """Precise BN: replace every running mean/variance by the average of its per-batch statistics.

    PyTorch-Encoding's ``update_bn_stats`` (fvcore's precise BN; Wu & Johnson, "Rethinking 'Batch'
    in BatchNorm", 2021): running averages with momentum are dominated by the last batches and by
    weights that were still changing; the true average over N batches of the final weights is what
    inference should use.

    Args:
      apply_fn: ``apply_fn(variables, batch) -> (outputs, updates)`` running the model in TRAINING
        mode with ``batch_stats`` mutable, e.g.
        ``lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])`` (jit it if you like).
      variables: the model's variables (``params`` and ``batch_stats``).
      batches: an iterable of inputs (at least one).

    Returns:
      ``variables`` with every floating ``batch_stats`` leaf replaced by the mean over batches of the
      per-batch statistic that layer computed (the unbiased variance for jaxenc BatchNorm).
      Non-floating leaves (step counters) are kept.

    Works for any BatchNorm implementation and momentum without knowing either: each layer's update
    is ``m * running + (1 - m) * batch``, so running the first batch from zero and from one running
    statistics gives ``m`` per leaf, and every batch run from zeros gives ``(1 - m) * batch``.
    Costs one extra forward pass. Leaves whose layer does not update (m == 1) are kept.
    """
    stats = variables["batch_stats"]
    is_float = lambda a: jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)  # noqa: E731
    fill = lambda value: jax.tree_util.tree_map(
        lambda a: jnp.full_like(a, value) if is_float(a) else a, stats
    )  # noqa: E731
    zeros, ones = fill(0.0), fill(1.0)

    def batch_statistics(batch, start):
        _, updates = apply_fn({**variables, "batch_stats": start}, batch)
        return updates["batch_stats"]

    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError(
            "recompute_batch_stats: batches is empty; pass at least one batch"
        ) from None
    from_zero = batch_statistics(first, zeros)
    decay = jax.tree_util.tree_map(
        lambda r1, r0: (r1 - r0) if is_float(r0) else r0, batch_statistics(first, ones), from_zero
    )

    def unscale(r0, m, original):
        if not is_float(original):
            return original
        frozen = m >= 1.0 - 1e-6
        return jnp.where(frozen, original, r0 / jnp.where(frozen, 1.0, 1.0 - m))

    average = jax.tree_util.tree_map(unscale, from_zero, decay, stats)
    count = 1
    for batch in iterator:
        current = jax.tree_util.tree_map(unscale, batch_statistics(batch, zeros), decay, stats)
        count += 1
        average = jax.tree_util.tree_map(
            lambda avg, cur, n=count: avg + (cur - avg) / n if is_float(avg) else avg,
            average,
            current,
        )
    return {**variables, "batch_stats": average}
