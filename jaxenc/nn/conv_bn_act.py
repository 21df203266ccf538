"""Conv -> norm -> ReLU blocks of PyTorch-Encoding: ConvBnAct (ResNeSt stems) and ConvNormReLU
(PSPNet pyramid levels and the segmentation heads), NHWC."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.rectified_conv import RFConv2d
from jaxenc.nn.split_attn import SplAtConv2d
from jaxenc.nn.torch_compat import Conv2d, ConvGeometry, conv_options

Dtype = Any

__all__ = ["ConvBnAct"]  # ConvNormReLU: for jaxenc.models, not re-exported by jaxenc.nn


class ConvBnAct(ConvGeometry, DtypeFields):
    """PyTorch-Encoding's ``ConvBnAct``: conv (plain, rectified or split-attention), BatchNorm, ReLU.

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955 (the building block of its
    stems and heads).

    radix == 0: ``conv`` (a torch Conv2d, or :class:`RFConv2d` with ``average_mode=rectify_avg`` when
    ``rectify``), then ``bn`` (:class:`jaxenc.nn.BatchNorm`, whatever ``norm_layer`` is: upstream always
    uses nn.BatchNorm2d here) and ``relu`` when ``act``. radix > 0: only ``conv`` =
    :class:`SplAtConv2d` (with ``radix``, ``rectify``, ``rectify_avg``, ``group_width`` and ``norm_layer``);
    upstream adds no BN or activation after it. Submodule names as the upstream nn.Sequential.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', out_channels). ``__call__(x, train=False)``.
    """

    radix: int = 0
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    rectify: bool = False
    rectify_avg: bool = False
    group_width: int | None = None
    act: bool = True
    norm_layer: Callable[..., nn.Module] | None = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "ConvBnAct"
        if isinstance(self.radix, bool) or not isinstance(self.radix, int) or self.radix < 0:
            raise ValueError(
                f"{where}: radix must be a non-negative integer (0: no split attention), got {self.radix!r}"
            )
        conv_kwargs = conv_options(self, name="conv")
        in_out = (self.in_channels, self.out_channels, self.kernel_size)
        if self.radix > 0:
            split = dict(radix=self.radix, rectify=self.rectify, rectify_avg=self.rectify_avg)
            return SplAtConv2d(
                *in_out,
                norm_layer=self.norm_layer,
                group_width=self.group_width,
                **split,
                **conv_kwargs,
            )(x, train=train)
        if self.rectify:
            y = RFConv2d(*in_out, average_mode=self.rectify_avg, **conv_kwargs)(x)
        else:
            y = Conv2d(
                self.out_channels, self.kernel_size, in_channels=self.in_channels, **conv_kwargs
            )(x)
        y = BatchNorm(self.out_channels, name="bn", dtype=self.dtype)(y, train=train)
        return jax.nn.relu(y) if self.act else y


class ConvNormReLU(DtypeFields):
    """Upstream's ``nn.Sequential(Conv2d(in, out, k, bias=False), norm_layer(out), ReLU)``, the
    building block of PyramidPooling and of the segmentation heads (jaxenc.models.heads).

    Children are named "0" (conv) and "1" (norm) so that the torch keys read ``<name>.0.weight``,
    ``<name>.1.running_mean``. Shapes: (N, H, W, C_in) -> (N, H', W', out_channels).
    """

    out_channels: int
    kernel_size: int = 1
    padding: int = 0
    dilation: int = 1
    norm_layer: Callable[..., nn.Module] = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        conv = Conv2d(
            self.out_channels,
            self.kernel_size,
            padding=self.padding,
            dilation=self.dilation,
            bias=False,
            name="0",
            **kw,
        )
        y = conv(x)
        y = self.norm_layer(self.out_channels, name="1", **kw)(y, train=train)
        return jax.nn.relu(y)
