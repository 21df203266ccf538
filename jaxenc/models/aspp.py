"""DeepLabV3's atrous spatial pyramid pooling and head (Chen et al., "Rethinking Atrous Convolution for
Semantic Image Segmentation", arXiv:1706.05587), upstream ``encoding/models/sseg/deeplab.py``, NHWC.

Names follow upstream (``aspp.b0`` .. ``aspp.b4``, ``aspp.project.0``, ``block.4``), so
:func:`jaxenc.port.torch_to_flax` converts its ``state_dict`` one to one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models.head_blocks import (
    BlockSequential,
    GlobalPooling,
    NormLayer,
    apply_dropout,
    conv_norm_relu,
    feature_input,
)
from jaxenc.nn import BatchNorm
from jaxenc.nn.customize import ConvNormReLU
from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.module_utils import check_width
from jaxenc.validation import check_positive_int

Dtype = Any

__all__ = ["ASPP", "ASPP_Module", "AsppPooling", "DeepLabV3Head"]


class AsppPooling(GlobalPooling):
    """DeepLabV3's image pooling branch (upstream ``AsppPooling``): identical to :class:`GlobalPooling`."""


class _ProjectSequential(DtypeFields):
    """ASPP ``project``: "0" 1x1 conv (no bias), "1" norm, ReLU, Dropout2d(0.5)."""

    out_channels: int
    norm_layer: NormLayer = BatchNorm
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = conv_norm_relu(self, x, self.out_channels, 1, ("0", "1"), train)
        return apply_dropout(y, self.dropout, train, channelwise=True)


class ASPP_Module(DtypeFields):  # noqa: N801 (upstream name)
    """Atrous spatial pyramid pooling of DeepLabV3 (Chen et al., arXiv:1706.05587), upstream ``ASPP_Module``.

    Five branches of in // 8 channels each: ``b0`` 1x1; ``b1``..``b3`` 3x3 with dilation = padding =
    the atrous rates (default 12, 24, 36); ``b4`` image pooling (:class:`AsppPooling`). Their concat
    (5 · in // 8) goes through ``project``: 1x1 conv -> in // 8 + norm + ReLU + Dropout2d(0.5)
    (whole channels dropped, ``dropout`` rng, training only).

    Shapes: x (N, H, W, in_channels) -> (N, H, W, in_channels // 8).
    """

    in_channels: int
    atrous_rates: Sequence[int] = (12, 24, 36)
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "ASPP_Module"
        check_width(self.in_channels, "in_channels", 8, "branches have in_channels // 8", where)
        rates = tuple(self.atrous_rates)
        if len(rates) != 3 or any(
            isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates
        ):
            raise ValueError(
                f"{where}: atrous_rates must be three positive integers, got {self.atrous_rates!r}"
            )
        x = feature_input(x, self.in_channels, where, self.dtype)
        kw = dtype_kwargs(self)
        out = self.in_channels // 8
        feats = [ConvNormReLU(out, 1, norm_layer=self.norm_layer, name="b0", **kw)(x, train=train)]
        for i, rate in enumerate(rates, start=1):
            block = ConvNormReLU(
                out, 3, padding=rate, dilation=rate, norm_layer=self.norm_layer, name=f"b{i}", **kw
            )
            feats.append(block(x, train=train))
        feats.append(
            AsppPooling(self.in_channels, out, self.norm_layer, self.up_kwargs, name="b4", **kw)(
                x, train=train
            )
        )
        y = jnp.concatenate([f.astype(x.dtype) for f in feats], axis=-1)
        return _ProjectSequential(out, self.norm_layer, name="project", **kw)(y, train=train)


ASPP = ASPP_Module


class DeepLabV3Head(DtypeFields):
    """DeepLabV3 head (Chen et al., arXiv:1706.05587), upstream ``DeepLabV3Head``: ``aspp``
    (:class:`ASPP_Module`, in -> in // 8) then ``block`` (3x3 conv + norm + ReLU, Dropout(0.1), 1x1 ->
    out_channels).

    Shapes: x (N, H, W, in_channels) -> (N, H, W, out_channels).
    """

    in_channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None
    atrous_rates: Sequence[int] = (12, 24, 36)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_positive_int(self.out_channels, "out_channels", "DeepLabV3Head")
        kw = dtype_kwargs(self)
        y = ASPP_Module(
            self.in_channels,
            tuple(self.atrous_rates),
            self.norm_layer,
            self.up_kwargs,
            name="aspp",
            **kw,
        )(x, train=train)
        return BlockSequential(
            self.in_channels // 8, self.out_channels, self.norm_layer, name="block", **kw
        )(y, train=train)
