"""Building blocks shared by the segmentation heads (:mod:`jaxenc.models.heads`, :mod:`~jaxenc.models.aspp`,
:mod:`~jaxenc.models.enc_heads`): upstream's ``nn.Sequential`` pieces with their child indices as names.

Conventions: ``__call__(..., train=False)``; in training the norms use batch statistics and dropout
draws from the ``dropout`` rng stream. ``norm_layer(num_features, *, name, dtype, param_dtype)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn import (
    BatchNorm,
    Conv2d,
    PyramidPooling,
    adaptive_avg_pool2d,
    interpolate_bilinear,
)
from jaxenc.nn.customize import ConvNormReLU, check_up_kwargs
from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.validation import check_channels, check_positive_int, check_rank

Dtype = Any
NormLayer = Callable[..., nn.Module]

__all__ = [
    "BlockSequential",
    "Classifier",
    "ConvNormReLUDropConv",
    "ConvNormReLUList",
    "GapSequential",
    "GlobalPooling",
    "IdentityAndGlobalPool",
    "NormLayer",
    "apply_dropout",
    "check_feature_count",
    "conv_norm_relu",
    "feature_input",
    "lateral_fusion",
    "upsample",
]

_NHWC = "N, H, W, C"


def apply_dropout(x: jax.Array, rate: float, train: bool, channelwise: bool) -> jax.Array:
    """``nn.Dropout(rate)`` (element-wise) or ``nn.Dropout2d(rate)`` (whole channels of each sample,
    the mask shared over H and W) in training; the identity otherwise. Call inside a compact method."""
    if not train or rate == 0.0:
        return x
    return nn.Dropout(rate, broadcast_dims=(1, 2) if channelwise else ())(x, deterministic=False)


def upsample(x: jax.Array, size: tuple[int, int], align_corners: bool) -> jax.Array:
    if tuple(x.shape[1:3]) == tuple(size) and align_corners:
        return x  # align-corners resize to the same size is the identity
    return interpolate_bilinear(x, size, align_corners=align_corners)


def conv_norm_relu(
    module: nn.Module, x: jax.Array, channels: int, kernel_size: int, names, train: bool, padding=0
) -> jax.Array:
    """``module``'s children ``names`` = (conv, norm): conv (no bias) -> norm -> ReLU. Call inside
    ``module``'s compact method (it needs ``norm_layer``, ``dtype`` and ``param_dtype`` fields)."""
    kw = dtype_kwargs(module)
    conv, norm = names
    y = Conv2d(channels, kernel_size, padding=padding, bias=False, name=conv, **kw)(x)
    return jax.nn.relu(module.norm_layer(channels, name=norm, **kw)(y, train=train))


def feature_input(x: jax.Array, in_channels: int | None, where: str, dtype) -> jax.Array:
    x = jnp.asarray(x)
    check_rank(x, 4, _NHWC, where)
    check_channels(x, in_channels, where)
    return x if dtype is None else x.astype(dtype)


class ConvNormReLUList(DtypeFields):
    """An ``nn.ModuleList`` of :class:`jaxenc.nn.customize.ConvNormReLU` blocks with one configuration; ``__call__(i, x)``
    runs block ``i`` (child name ``str(i)``)."""

    out_channels: int
    kernel_size: int = 1
    padding: int = 0
    norm_layer: NormLayer = BatchNorm

    @nn.compact
    def __call__(self, index: int, x: jax.Array, train: bool = False) -> jax.Array:
        block = ConvNormReLU(
            self.out_channels,
            self.kernel_size,
            self.padding,
            norm_layer=self.norm_layer,
            name=str(index),
            **dtype_kwargs(self),
        )
        return block(x, train=train)


class ConvNormReLUDropConv(DtypeFields):
    """Upstream ``nn.Sequential(Conv2d(k=3, pad 1, no bias), norm, ReLU, Dropout(rate), Conv2d(1x1, bias))``
    (children "0", "1", "4").

    ``pyramid`` puts PSPHead's :class:`jaxenc.nn.PyramidPooling` in front as child "0" (the rest
    shift by one); ``with_global`` inserts FCNHead's ``ConcurrentModule([Identity(), GlobalPooling])``
    after the ReLU as child "3" (the dropout and classifier shift by one).
    """

    inter_channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    dropout: float = 0.1
    channelwise: bool = False
    with_global: bool = False
    pyramid: bool = False
    up_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        i = 0
        if self.pyramid:  # PSPHead: PyramidPooling is child "0"
            x = PyramidPooling(
                x.shape[-1], norm_layer=self.norm_layer, up_kwargs=self.up_kwargs, name="0", **kw
            )(x, train=train)
            i = 1
        y = conv_norm_relu(self, x, self.inter_channels, 3, (str(i), str(i + 1)), train, padding=1)
        j = i + 3
        if self.with_global:  # FCNHead: ConcurrentModule([Identity(), GlobalPooling]) is child "3"
            y = IdentityAndGlobalPool(
                self.inter_channels, self.norm_layer, self.up_kwargs, name=str(j), **kw
            )(y, train=train)
            j += 1
        y = apply_dropout(y, self.dropout, train, self.channelwise)
        return Conv2d(self.out_channels, 1, name=str(j + 1), **kw)(y)


class Classifier(DtypeFields):
    """Upstream ``nn.Sequential(Dropout(rate) or Dropout2d(rate), Conv2d(in, out, 1))``: child "1"."""

    out_channels: int
    dropout: float = 0.1
    channelwise: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = apply_dropout(x, self.dropout, train, self.channelwise)
        return Conv2d(self.out_channels, 1, name="1", **dtype_kwargs(self))(x)


class GapSequential(DtypeFields):
    """Upstream ``gap = nn.Sequential(AdaptiveAvgPool2d(1), Conv2d(in, out, 1, bias=False), norm, ReLU)``:
    children "1" (conv) and "2" (norm). Shapes: (N, H, W, C) -> (N, 1, 1, out_channels)."""

    out_channels: int
    norm_layer: NormLayer = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return conv_norm_relu(
            self, adaptive_avg_pool2d(x, 1), self.out_channels, 1, ("1", "2"), train
        )


class GlobalPooling(DtypeFields):
    """Image-level pooling branch: global average pool, 1x1 conv (no bias) + norm + ReLU, then
    bilinear upsampling back to H x W (upstream ``GlobalPooling`` of fcn.py/atten.py and
    ``AsppPooling`` of deeplab.py; Chen et al., "Rethinking Atrous Convolution for Semantic Image
    Segmentation", arXiv:1706.05587).

    Shapes: x (N, H, W, in_channels) -> (N, H, W, out_channels), every position equal. Submodule
    ``gap`` with children "1" (conv) and "2" (norm): torch keys ``gap.1.weight``, ``gap.2.running_mean``.
    Training needs N > 1 (the norm sees one value per sample and channel).
    """

    in_channels: int | None
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = type(self).__name__
        check_positive_int(self.out_channels, "out_channels", where)
        align = check_up_kwargs(self.up_kwargs, where)
        x = feature_input(x, self.in_channels, where, self.dtype)
        pool = GapSequential(self.out_channels, self.norm_layer, name="gap", **dtype_kwargs(self))(
            x, train=train
        )
        return interpolate_bilinear(pool, tuple(x.shape[1:3]), align_corners=align).astype(x.dtype)


class IdentityAndGlobalPool(DtypeFields):
    """Upstream ``ConcurrentModule([Identity(), GlobalPooling(C, C)])``: concat(x, pool(x)); child "1"."""

    channels: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pool = GlobalPooling(
            self.channels,
            self.channels,
            self.norm_layer,
            self.up_kwargs,
            name="1",
            **dtype_kwargs(self),
        )
        return jnp.concatenate([x, pool(x, train=train).astype(x.dtype)], axis=-1)


class BlockSequential(DtypeFields):
    """DeepLabV3Head ``block`` and FCFPNHead ``conv5``: "0" 3x3 conv -> channels (no bias), "1" norm,
    ReLU, Dropout(0.1), "4" 1x1 conv -> out_channels."""

    channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = conv_norm_relu(self, x, self.channels, 3, ("0", "1"), train, padding=1)
        y = apply_dropout(y, 0.1, train, channelwise=False)
        return Conv2d(self.out_channels, 1, name="4", **dtype_kwargs(self))(y)


def lateral_fusion(
    module: nn.Module, feat: jax.Array, c2: jax.Array, c3: jax.Array, train: bool
) -> jax.Array:
    """EncHead / ATTENHead ``lateral``: connect.0 (c2 -> 512), connect.1 (c3 -> 512), then
    fusion(concat(feat, c2', c3')) -> 512. Call inside the head's compact method."""
    kw = dtype_kwargs(module)
    connect = ConvNormReLUList(512, 1, norm_layer=module.norm_layer, name="connect", **kw)
    c2 = connect(0, c2.astype(feat.dtype), train=train)
    c3 = connect(1, c3.astype(feat.dtype), train=train)
    if c2.shape[1:3] != feat.shape[1:3] or c3.shape[1:3] != feat.shape[1:3]:
        raise ValueError(
            f"{type(module).__name__}: lateral=True concatenates c2, c3 and c4 and needs them at one resolution "
            f"(a dilated backbone); got c2 {tuple(c2.shape)}, c3 {tuple(c3.shape)}, c4 head features {tuple(feat.shape)}"
        )
    fusion = ConvNormReLU(512, 3, padding=1, norm_layer=module.norm_layer, name="fusion", **kw)
    return fusion(jnp.concatenate([feat, c2, c3], axis=-1), train=train)


def check_feature_count(features: Sequence[jax.Array], need: int, where: str) -> None:
    if len(features) < need:
        raise ValueError(
            f"{where}: expected the backbone features (c1, c2, c3, c4), got {len(features)} arrays"
        )
