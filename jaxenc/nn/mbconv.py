"""MaxViT's MBConv block and its residual wrapper (vit-pytorch 1.26.11 ``max_vit``), NHWC.

Sandler et al., "MobileNetV2", CVPR 2018; Tu et al., "MaxViT", ECCV 2022. The stochastic depth is
:class:`jaxenc.nn.drop.Dropsample` (per sample, as upstream intends).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.drop import Dropsample
from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.module_utils import (
    accepts_train,
    cast_input,
    check_features,
    check_positive_fields,
    gelu_exact,
)
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.squeeze_excite import SqueezeExcitation
from jaxenc.nn.torch_compat import Conv2d
from jaxenc.validation import check_probability, check_rank

Dtype = Any

__all__ = ["MBConvResidual", "MBConv"]


def _add_residual(y: jax.Array, x: jax.Array, dropout: float, train: bool, where: str) -> jax.Array:
    """Dropsample(y) + x inside the calling compact module (child "dropsample", no parameters)."""
    if y.shape != x.shape:
        raise ValueError(
            f"{where}: fn must keep the input shape for the residual sum, got fn(x) of shape {tuple(y.shape)} "
            f"for x of shape {tuple(x.shape)}"
        )
    y = Dropsample(dropout, name="dropsample")(y, train=train)
    return y + x.astype(y.dtype)


class MBConvResidual(DtypeFields):
    """Residual wrapper of MaxViT's MBConv (vit-pytorch ``max_vit.MBConvResidual``).

    Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022.

    Shapes: x -> fn(x) of the same shape; out = Dropsample(dropout)(fn(x)) + x. ``fn`` is a Flax
    module given as a field; it becomes the child "fn" (torch keys ``fn.*``). Flax's ownership rule
    applies: a ``fn`` constructed inside another module's compact method belongs to THAT module (and
    is named there) unless it is built with ``parent=None``, e.g.
    ``MBConvResidual(SqueezeExcitation(c, parent=None))``. ``__call__(x,
    train=False)`` passes ``train`` to ``fn`` when its ``__call__`` takes it, and drives the
    per-sample :class:`Dropsample` (see there for the deviation from upstream).
    """

    fn: nn.Module
    dropout: float = 0.0

    def __post_init__(self):
        check_probability(self.dropout, "dropout", "MBConvResidual")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = cast_input(x, self.dtype)
        y = self.fn(x, train=train) if accepts_train(self.fn) else self.fn(x)
        return _add_residual(y, x, self.dropout, train, "MBConvResidual")


def _mbconv_layers(cfg: MBConv | _MBConvLayers, x: jax.Array, train: bool) -> jax.Array:
    """Upstream's MBConv nn.Sequential, its children "0".."8" created in the calling compact module."""
    kw = dtype_kwargs(cfg)
    hidden = cfg.hidden_dim
    stride = 2 if cfg.downsample else 1
    # torch BatchNorm2d: momentum 0.1 == Flax decay 0.9, eps 1e-5
    bn = dict(momentum=0.9, epsilon=1e-5, **kw)
    y = Conv2d(hidden, 1, in_channels=cfg.dim_in, name="0", **kw)(x)
    y = gelu_exact(BatchNorm(hidden, name="1", **bn)(y, train=train))
    y = Conv2d(
        hidden, 3, stride=stride, padding=1, groups=hidden, in_channels=hidden, name="3", **kw
    )(y)
    y = gelu_exact(BatchNorm(hidden, name="4", **bn)(y, train=train))
    y = SqueezeExcitation(hidden, cfg.shrinkage_rate, name="6", **kw)(y)
    y = Conv2d(cfg.dim_out, 1, in_channels=hidden, name="7", **kw)(y)
    return BatchNorm(cfg.dim_out, name="8", **bn)(y, train=train)


class _MBConvLayers(DtypeFields):
    """The unwrapped MBConv stack as a child (named "fn" inside a residual MBConv)."""

    dim_in: int
    dim_out: int
    downsample: bool
    expansion_rate: float
    shrinkage_rate: float

    @property
    def hidden_dim(self) -> int:
        return int(self.expansion_rate * self.dim_out)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _mbconv_layers(self, x, train)


class MBConv(DtypeFields):
    """MaxViT's inverted-bottleneck conv block (vit-pytorch ``max_vit.MBConv``), NHWC.

    Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018; Tu et al.,
    "MaxViT: Multi-Axis Vision Transformer", ECCV 2022.

    Shapes: x (N, H, W, dim_in) -> (N, H', W', dim_out), H' = ceil(H / 2) when ``downsample`` else H.
    With hidden = int(expansion_rate * dim_out): 1x1 conv -> BN -> GELU -> depthwise 3x3 conv
    (stride 2 if downsample, padding 1) -> BN -> GELU -> :class:`SqueezeExcitation` (hidden,
    shrinkage_rate) -> 1x1 conv -> BN. BatchNorms: torch momentum 0.1, eps 1e-5; GELU exact.

    Upstream ``MBConv`` is a function returning an ``nn.Sequential``, wrapped in
    :class:`MBConvResidual` (with ``dropout`` feeding its Dropsample) when dim_in == dim_out and not
    downsample. This module reproduces its parameters: torch keys ``0.weight/bias``, ``1.*`` (BN),
    ``3.*`` (depthwise), ``4.*``, ``6.gate.1.weight``, ``6.gate.3.weight``, ``7.*``, ``8.*``; prefixed
    with ``fn.`` in the residual case. ``__call__(x, train=False)``: batch statistics (``batch_stats``
    mutable) and Dropsample when ``train``.
    """

    dim_in: int
    dim_out: int
    _: dataclasses.KW_ONLY
    downsample: bool
    expansion_rate: float = 4
    shrinkage_rate: float = 0.25
    dropout: float = 0.0

    def __post_init__(self):
        where = "MBConv"
        check_positive_fields(self, ("dim_in", "dim_out"), where)
        if self.hidden_dim < 1:
            raise ValueError(
                f"{where}: the hidden width int(expansion_rate * dim_out) must be >= 1, got "
                f"int({self.expansion_rate!r} * {self.dim_out}) = {self.hidden_dim}"
            )
        check_probability(self.dropout, "dropout", where)
        super().__post_init__()

    @property
    def hidden_dim(self) -> int:
        return int(self.expansion_rate * self.dim_out)

    @property
    def residual(self) -> bool:
        """True when upstream wraps the stack in MBConvResidual (dim_in == dim_out, no downsampling)."""
        return self.dim_in == self.dim_out and not self.downsample

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "MBConv"
        x = jnp.asarray(x)
        check_rank(x, 4, "N, H, W, C", where)
        check_features(x, self.dim_in, where, name="x (NHWC)")
        if not self.residual:
            return _mbconv_layers(self, x, train)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        fn = _MBConvLayers(
            self.dim_in,
            self.dim_out,
            self.downsample,
            self.expansion_rate,
            self.shrinkage_rate,
            self.dtype,
            self.param_dtype,
            name="fn",
        )
        y = fn(x, train=train)
        return _add_residual(y, x, self.dropout, train, where)
