"""Small helpers shared by jaxenc's Flax modules (not re-exported by ``jaxenc.nn``)."""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.fields import dtype_kwargs
from jaxenc.nn.torch_compat import torch_uniform_init
from jaxenc.validation import check_positive_int


def accepts_train(module: nn.Module) -> bool:
    """Whether ``module.__call__`` takes a ``train`` keyword (only modules whose behaviour differs in
    training do), so containers pass it on exactly where it means something."""
    return "train" in inspect.signature(type(module).__call__).parameters


def cast_input(x: Any, dtype: Any | None) -> jax.Array:
    """``x`` as an array in the module's compute ``dtype`` (unchanged when ``dtype`` is None)."""
    x = jnp.asarray(x)
    return x if dtype is None else x.astype(dtype)


def check_features(x: jax.Array, dim: int, where: str, name: str = "x") -> None:
    """Raise ValueError unless the last axis of ``x`` has ``dim`` features."""
    if x.shape[-1] != dim:
        raise ValueError(
            f"{where}: {name} must have dim={dim} features on its last axis, got shape {tuple(x.shape)}"
        )


def check_positive_fields(module: nn.Module, names: tuple[str, ...], where: str) -> None:
    """:func:`~jaxenc.validation.check_positive_int` on each of ``module``'s fields ``names``, in order."""
    for name in names:
        check_positive_int(getattr(module, name), name, where)


def check_width(value, name: str, minimum: int, reason: str, where: str) -> int:
    """``value`` as a positive int of at least ``minimum``; ``reason`` (why) goes into the ValueError."""
    value = check_positive_int(value, name, where)
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum} ({reason}), got {value}")
    return value


def compute_dtype(module: nn.Module, x: jax.Array):
    """The module's ``dtype``, else what Flax layers would compute in (input promoted with params)."""
    return module.dtype or jnp.promote_types(x.dtype, module.param_dtype)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum in the compute dtype with float32 accumulation and a float32 result."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def torch_linear(
    features: int, fan_in: int, use_bias: bool, name: str, module: nn.Module
) -> nn.Dense:
    """``torch.nn.Linear(fan_in, features)`` as a Dense: torch's U(+-1/sqrt(fan_in)) init for both leaves."""
    init = torch_uniform_init(fan_in)
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=init,
        bias_init=init,
        name=name,
        **dtype_kwargs(module),
    )


def torch_layer_norm(module: nn.Module) -> nn.LayerNorm:
    """``torch.nn.LayerNorm(dim)`` named "norm": eps 1e-5 and a two-pass variance, statistics in float32."""
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm", **dtype_kwargs(module))


def gelu_exact(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): the exact erf form (jax defaults to the tanh approximation)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)
