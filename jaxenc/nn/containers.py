"""Containers of PyTorch-Encoding: ConcurrentModule (children side by side, outputs concatenated)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import accepts_train

Dtype = Any

__all__ = ["ConcurrentModule"]


class ConcurrentModule(DtypeFields):
    """Apply every module in ``modules`` to the same input and concatenate the outputs on channels.

    Upstream's ``ConcurrentModule`` (an ``nn.ModuleList``), used by the ATTEN head (Zhang et al.,
    "Co-occurrent Features in Semantic Segmentation", CVPR 2019) to run global pooling and ACF side by
    side. The children are renamed "0", "1", ... (the ModuleList indices), so a torch state_dict with
    keys ``0.weight``, ``1.conv.weight``... converts unchanged.

    Shapes: x (N, H, W, C) -> (N, H, W, sum of the children's channels); every child must keep the
    leading axes. ``__call__(x, train=False)`` passes ``train`` to the children that take it.
    """

    modules: Sequence[nn.Module] = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "ConcurrentModule"
        if not self.modules:
            raise ValueError(f"{where}: modules is empty; give at least one module to run")
        outputs = []
        for i, module in enumerate(self.modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"{where}: modules[{i}] must be a flax.linen Module, got {type(module).__name__}"
                )
            child = module.clone(parent=self, name=str(i))
            outputs.append(child(x, train=train) if accepts_train(module) else child(x))
        lead = outputs[0].shape[:-1]
        for i, y in enumerate(outputs):
            if y.ndim != outputs[0].ndim or y.shape[:-1] != lead:
                raise ValueError(
                    f"{where}: outputs must agree on every axis but the last (channels) to be concatenated; "
                    f"modules[0] gave {tuple(outputs[0].shape)}, modules[{i}] gave {tuple(y.shape)}"
                )
        dtype = self.dtype or jnp.result_type(*outputs)
        return jnp.concatenate([y.astype(dtype) for y in outputs], axis=-1)
