"""The function an export captures: a model's eval-mode forward with its variables closed over.

Input: NHWC float images (B, H, W, 3), already normalised as the model was trained (mean/std
applied; jaxenc's models take the normalised image, as upstream's do). Output (``outputs="all"``):
exactly what ``model.apply(variables, x, train=False)`` returns: logits (B, classes) for a
recognition model; for a segmentation model the tuple (main logits (B, H, W, nclass), [se logits
(B, nclass)], [aux logits (B, H, W, nclass)]) (DANet: fused, position, channel [, aux]), every
spatial output at the input size. ``outputs="main"`` keeps only the first element of a tuple (what
``BaseNet.evaluate`` returns), so the artifact does not compute the auxiliary head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["OUTPUTS", "DTYPES", "apply_function", "cast_params", "inference_function"]

#: Values of ``outputs``.
OUTPUTS = ("all", "main")
#: Names accepted for ``dtype`` and the compute dtype a model field gets (None: float32).
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def cast_params(variables: Mapping[str, Any], dtype: str) -> dict:
    """``variables`` with ``params`` cast to ``dtype`` ("float32" | "bfloat16"); other collections
    (BatchNorm statistics) stay float32, as jaxenc's models keep them."""
    if dtype not in DTYPES:
        raise ValueError(f"jaxenc.export: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = dict(variables)
    if dtype != "float32" and "params" in out:
        out["params"] = jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(dtype)), out["params"])
    return out


def _is_segmentation(model) -> bool:
    from jaxenc.models.segmentation import BaseNet

    return isinstance(model, BaseNet)


def apply_function(model, outputs: str = "all") -> Callable:
    """``(variables, x) -> model.apply(variables, x, train=False)`` (first output only with
    ``outputs="main"``): the variables are an argument, so a compiled program does not embed them."""
    if outputs not in OUTPUTS:
        raise ValueError(f"jaxenc.export: outputs must be one of {OUTPUTS}, got {outputs!r}")
    main_only = outputs == "main" and _is_segmentation(model)

    def forward(variables, x):
        if main_only:
            return model.apply(variables, x, method=type(model).evaluate)
        return model.apply(variables, x, train=False)

    return forward


def inference_function(model, variables: Mapping[str, Any], outputs: str = "all") -> Callable:
    """``x -> model.apply(variables, x, train=False)``: :func:`apply_function` with the variables
    closed over (they become constants of a converted graph)."""
    forward = apply_function(model, outputs)
    variables = dict(variables)
    return lambda x: forward(variables, x)
