"""Pieces every jaxenc model shares: rematerialisation, He fan-out init, input checks, stages, the
pooled classifier."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxenc.nn.fields import dtype_kwargs
from jaxenc.nn.torch_compat import Conv2d, torch_uniform_init
from jaxenc.validation import check_int

__all__ = [
    "REMAT_MODES",
    "Stage",
    "check_block_counts",
    "check_image_batch",
    "check_norm_layer",
    "check_remat",
    "dataset_nclass",
    "dtype_kwargs",
    "field_values",
    "he_conv",
    "he_fan_out_normal",
    "pooled_classifier",
    "remat_apply",
    "remat_call",
]

#: Values of the models' ``remat`` field: "none" (store every activation for the backward pass) and
#: "block" (each residual block / head is recomputed in the backward pass: memory for compute).
REMAT_MODES = ("none", "block")


def check_remat(value: Any, where: str) -> str:
    """``value`` if it is one of :data:`REMAT_MODES`, else a ValueError naming the allowed values."""
    if not isinstance(value, str) or value not in REMAT_MODES:
        raise ValueError(f"{where}: remat must be one of {REMAT_MODES}, got {value!r}")
    return value


def remat_apply(
    fn: Callable[..., Any], module: nn.Module, remat: str, *args: Any, **static: Any
) -> Any:
    """``fn(module, *args, **static)``; with ``remat="block"`` under :func:`flax.linen.remat`.

    The lifted transform runs on ``module``'s own scope, so variable names and rng streams stay the
    same. ``args`` are traced; the keyword arguments (``train=...``) are static (closed over).
    XLA:CPU undoes much of the recomputation unless ``--xla_disable_hlo_passes=cse_barrier_expander``.
    """
    if remat == "none":
        return fn(module, *args, **static)
    check_remat(remat, type(module).__name__)

    def call(mdl: nn.Module, *inputs: Any) -> Any:
        return fn(mdl, *inputs, **static)

    return nn.remat(call)(module, *args)


def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def remat_call(module: nn.Module, remat: str, *args: Any, **static: Any) -> Any:
    """``module(*args, **static)``, rematerialised as a whole with ``remat="block"`` (:func:`remat_apply`)."""
    return remat_apply(_call_module, module, remat, *args, **static)


def he_fan_out_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """N(0, sqrt(2 / (kh * kw * out_channels))) for an HWIO conv kernel (upstream ResNet's conv init)."""
    kh, kw, _, out = shape
    std = np.sqrt(2.0 / (kh * kw * out))
    return (jax.random.normal(key, tuple(shape), jnp.float32) * std).astype(dtype)


#: A bias-free :class:`jaxenc.nn.Conv2d` with :func:`he_fan_out_normal` kernels (upstream ResNet's and
#: Xception's convs): ``he_conv(out_channels, kernel_size, stride=..., name=..., dtype=..., ...)``;
#: ``bias=True`` overrides the default (Xception's separable convs take theirs from a field).
he_conv = functools.partial(Conv2d, bias=False, kernel_init=he_fan_out_normal)


def dataset_nclass(dataset: Any, classes: Mapping[str, int], where: str) -> int:
    """The class count of ``dataset`` (case-insensitive) in ``classes``; a ValueError names the known ones."""
    if not isinstance(dataset, str) or dataset.lower() not in classes:
        raise ValueError(
            f"{where}: unknown dataset {dataset!r}; give nclass, or one of {sorted(classes)}"
        )
    return classes[dataset.lower()]


def field_values(module: nn.Module, names: Sequence[str]) -> dict[str, Any]:
    """``{name: module.<name>}`` for ``names``: the fields a network hands on unchanged to a child
    (stem, block) that has fields of the same names."""
    return {name: getattr(module, name) for name in names}


def check_norm_layer(norm_layer: Any, where: str) -> None:
    """Raise ValueError unless ``norm_layer`` is a callable building a norm module."""
    if norm_layer is None or not callable(norm_layer):
        raise ValueError(
            f"{where}: norm_layer must be a callable building a norm module, got {norm_layer!r}"
        )


def check_block_counts(value: Any, count: int, name: str, what: str, where: str) -> None:
    """Raise ValueError unless ``value`` is a sequence of ``count`` integers >= 1 (``what`` names them)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count:
        raise ValueError(f"{where}: {name} must be {count} {what}, got {value!r}")
    for i, n in enumerate(value):
        check_int(n, f"{name}[{i}]", where, minimum=1)


def check_image_batch(x: Any, where: str, dtype: Any = None) -> jax.Array:
    """``x`` as an NHWC RGB batch (B, H, W, 3), cast to ``dtype`` when given."""
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"{where}: expected an NHWC image batch (B, H, W, 3), got shape {tuple(x.shape)}"
        )
    return x if dtype is None else x.astype(dtype)


def pooled_classifier(
    module: nn.Module, x: jax.Array, num_classes: int, dropout: float = 0.0, train: bool = False
) -> jax.Array:
    """Global average pool (accumulated in at least float32), [child ``drop``: Dropout(dropout)],
    child ``fc`` (torch's Linear init): (B, H, W, C) -> (B, num_classes). Call inside ``module``'s
    compact method."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = jnp.mean(x.astype(acc), axis=(1, 2)).astype(x.dtype)
    if dropout > 0.0:
        x = nn.Dropout(dropout, name="drop")(x, deterministic=not train)
    init = torch_uniform_init(x.shape[-1])
    return nn.Dense(
        num_classes,
        kernel_init=init,
        bias_init=init,
        name="fc",
        **dtype_kwargs(module),
    )(x)


class Stage(nn.Module):
    """An ``nn.Sequential`` of ``block_cls`` blocks, children named "0", "1", ... (or ``names``).

    ``configs``: one tuple of (field, value) pairs per block; each block is rematerialised with
    ``remat="block"``. Shapes as the blocks'.
    """

    block_cls: type
    configs: tuple
    remat: str = "none"
    names: tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        names = self.names or tuple(str(i) for i in range(len(self.configs)))
        for name, config in zip(names, self.configs):
            x = remat_call(self.block_cls(**dict(config), name=name), self.remat, x, train=train)
        return x
