"""Small helpers shared by jaxenc's Flax modules."""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def accepts_train(module: nn.Module) -> bool:
    """Whether ``module.__call__`` takes a ``train`` keyword (only modules whose behaviour differs in
    training do), so containers pass it on exactly where it means something."""
    return "train" in inspect.signature(type(module).__call__).parameters


def cast_input(x: Any, dtype: Any | None) -> jax.Array:
    """``x`` as an array in the module's compute ``dtype`` (unchanged when ``dtype`` is None)."""
    x = jnp.asarray(x)
    return x if dtype is None else x.astype(dtype)
