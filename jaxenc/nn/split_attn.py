"""Split-attention convolution of ResNeSt (PyTorch-Encoding's SplAtConv2d, rSoftMax), NHWC.

Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.drop import DropBlock2D
from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.module_utils import cast_input
from jaxenc.nn.rectified_conv import RFConv2d
from jaxenc.nn.torch_compat import Conv2d, conv_args, conv_options
from jaxenc.validation import check_channels, check_divisible, check_positive_int, check_rank

Dtype = Any

__all__ = ["SplAtConv2d", "r_softmax", "rSoftMax"]


def r_softmax(x: jax.Array, radix: int, cardinality: int) -> jax.Array:
    """Split-attention weights over the last axis (ResNeSt's rSoftMax), radix-major out.

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955.

    x (..., R*C) with the channels ordered [cardinal group g][split r][c'] (a grouped 1x1 conv's
    output): radix > 1 applies a softmax over the R splits of each (g, c') and returns the channels
    ordered [r][g][c']; radix == 1 is a sigmoid (an SE block). Computed in float32, returned in x's
    dtype, with x's shape (upstream flattens to (B, R*C)).
    """
    where = "rSoftMax"
    radix = check_positive_int(radix, "radix", where)
    cardinality = check_positive_int(cardinality, "cardinality", where)
    x = jnp.asarray(x)
    a = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if radix == 1:
        return jax.nn.sigmoid(a).astype(x.dtype)
    check_divisible(x.shape[-1], radix * cardinality, "the last axis", "radix * cardinality", where)
    lead = x.shape[:-1]
    a = a.reshape(*lead, cardinality, radix, -1)
    a = jax.nn.softmax(a, axis=-2)
    return jnp.swapaxes(a, -3, -2).reshape(x.shape).astype(x.dtype)


class rSoftMax(DtypeFields):  # noqa: N801 (upstream's class name)
    """Module form of :func:`r_softmax` (PyTorch-Encoding's ``rSoftMax(radix, cardinality)``).

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955.

    Shapes: (..., R*C) -> (..., R*C), in ``dtype`` when given. No parameters.
    """

    radix: int
    cardinality: int

    def __call__(self, x: jax.Array) -> jax.Array:
        return r_softmax(cast_input(x, self.dtype), self.radix, self.cardinality)


class SplAtConv2d(DtypeFields):
    """Split-Attention convolution (ResNeSt), PyTorch-Encoding's ``SplAtConv2d``.

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955.

    ``u = relu(dropblock(bn0(conv(x))))`` with ``conv`` a k x k convolution in -> channels*radix with
    ``groups*radix`` groups (radix-major output: channel r*channels + c, group r*groups + g; an
    :class:`RFConv2d` when ``rectify`` and padding > 0); the R splits u_r (channels each) are summed and
    average-pooled, ``fc1`` (1x1, channels -> inter = max(in_channels*radix // reduction_factor, 32),
    ``groups`` groups) -> ``bn1`` -> relu -> ``fc2`` (1x1, inter -> channels*radix) -> :func:`r_softmax`
    give per-split weights a_r, and the output is sum_r a_r * u_r.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', channels), H' as the conv's. Submodules ``conv``,
    ``bn0``, ``fc1``, ``bn1``, ``fc2``, ``dropblock``, ``rsoftmax`` as upstream, so converting a torch
    state_dict is a plain OIHW -> HWIO transpose. ``group_width`` (upstream's later keyword) sets the
    conv's groups to channels*radix // group_width. ``padding_mode`` is upstream's ``**kwargs`` to the conv.

    ``norm_layer``: None (no bn0/bn1, as upstream's ``use_bn``) or a callable such that
    ``norm_layer(num_features, name=...)`` builds a module called as ``bn(x, train=train)``, e.g.
    :class:`jaxenc.nn.BatchNorm` or a ``functools.partial`` of it; training with it needs N > 1 (bn1
    normalises one value per sample). ``dropblock_prob > 0`` adds ``DropBlock2D(dropblock_prob, 3)``
    (:class:`jaxenc.nn.DropBlock2D`, constant probability).
    ``__call__(x, train=False)``.

    Differences from upstream: ``norm_layer=None`` works (upstream calls it and fails); the dropblock
    works without ``reset_dropblock`` (upstream asserts it was called).
    """

    in_channels: int
    channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = (1, 1)
    padding: int | tuple[int, int] = (0, 0)
    dilation: int | tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    radix: int = 2
    reduction_factor: int = 4
    group_width: int | None = None
    rectify: bool = False
    rectify_avg: bool = False
    norm_layer: Callable[..., nn.Module] | None = None
    dropblock_prob: float = 0.0
    padding_mode: str = "zeros"

    def _conv_groups(
        self, c_in: int, channels: int, radix: int, cardinality: int, where: str
    ) -> int:
        if self.group_width is None:
            total = cardinality * radix
        else:
            width = check_positive_int(self.group_width, "group_width", where)
            check_divisible(
                channels // width, cardinality, "channels // group_width", "groups", where
            )
            check_divisible(c_in, width, "in_channels", "group_width", where)
            check_divisible(channels * radix, width, "channels * radix", "group_width", where)
            total = channels * radix // width
        check_divisible(c_in, total, "in_channels", "the conv's groups (groups * radix)", where)
        return total

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "SplAtConv2d"
        check_rank(x, 4, "N, H, W, C", where)
        c_in = check_channels(x, self.in_channels, where)
        kernel_size, stride, padding, dilation = conv_args(
            self.kernel_size, self.stride, self.padding, self.dilation, where
        )
        channels = check_positive_int(self.channels, "channels", where)
        radix = check_positive_int(self.radix, "radix", where)
        cardinality = check_positive_int(self.groups, "groups", where)
        reduction = check_positive_int(self.reduction_factor, "reduction_factor", where)
        check_divisible(channels, cardinality, "channels", "groups", where)
        inter = max(c_in * radix // reduction, 32)
        inter_name = "inter_channels (max(in_channels * radix // reduction_factor, 32))"
        check_divisible(inter, cardinality, inter_name, "groups", where)
        conv_groups = self._conv_groups(c_in, channels, radix, cardinality, where)
        if self.norm_layer is not None and not callable(self.norm_layer):
            raise TypeError(
                f"{where}: norm_layer must be None or a callable building a norm module, got {self.norm_layer!r}"
            )
        drop = self.dropblock_prob
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop <= 1.0:
            raise ValueError(
                f"{where}: dropblock_prob must be a probability in [0, 1], got {drop!r}"
            )

        common = dtype_kwargs(self)
        # The validated stride/padding/dilation are what Conv2d and RFConv2d derive from the fields.
        conv_kwargs = conv_options(self, groups=conv_groups, name="conv")
        if self.rectify and padding != (0, 0):
            conv = RFConv2d(
                c_in, channels * radix, kernel_size, average_mode=self.rectify_avg, **conv_kwargs
            )
        else:
            conv = Conv2d(channels * radix, kernel_size, in_channels=c_in, **conv_kwargs)
        u = conv(x)
        if self.norm_layer is not None:
            u = self.norm_layer(channels * radix, name="bn0")(u, train=train)
        if drop > 0.0:
            u = DropBlock2D(drop, 3, name="dropblock")(u, train=train)
        u = jax.nn.relu(u)
        compute = u.dtype
        n, h, w, _ = u.shape
        acc = jnp.promote_types(compute, jnp.float32)
        splits = u.reshape(n, h, w, radix, channels).astype(acc)  # radix-major channels

        gap = jnp.mean(jnp.sum(splits, axis=3), axis=(1, 2), keepdims=True).astype(compute)
        gap = Conv2d(inter, 1, groups=cardinality, in_channels=channels, name="fc1", **common)(gap)
        if self.norm_layer is not None:
            gap = self.norm_layer(inter, name="bn1")(gap, train=train)
        gap = jax.nn.relu(gap)
        atten = Conv2d(channels * radix, 1, groups=cardinality, name="fc2", **common)(gap)
        atten = rSoftMax(radix, cardinality, name="rsoftmax")(atten)
        atten = atten.reshape(n, 1, 1, radix, channels).astype(acc)
        return jnp.sum(atten * splits, axis=3).astype(compute)
