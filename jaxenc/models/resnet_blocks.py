"""The residual blocks of :mod:`jaxenc.models.resnet` (upstream ``encoding/models/backbone/resnet.py``).

:class:`Bottleneck` (expansion 4; ResNet/ResNeXt/ResNeSt) and :class:`BasicBlock` (expansion 1,
torchvision's ResNet-18/34 block, which upstream lacks), the shortcut :class:`Downsample` and the
deep stem. Children carry upstream's torch attribute names. Every conv kernel, SplAt's and
RFConv2d's included, is drawn He fan-out (:func:`he_fan_out_normal`), as upstream's init loop does.
``last_gamma=True`` really zeroes the block's last norm scale (upstream's init loop undoes it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from jaxenc.models.model_utils import dtype_kwargs, he_conv, he_fan_out_normal
from jaxenc.nn import BatchNorm, DropBlock2D, RFConv2d, SplAtConv2d
from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.resample import avg_pool2d

Dtype = Any

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DeepStem",
    "Downsample",
    "add_shortcut",
    "conv3x3",
    "dropblock",
    "he_reinit_convs",
    "zero_scale",
]


def zero_scale(module: nn.Module, child: str, where: str) -> None:
    """At init, set ``child``'s ``scale`` parameter to zeros (working ``last_gamma``)."""
    if not module.is_initializing():
        return
    params = module.variables.get("params", {}).get(child, {})
    if "scale" not in params:
        raise ValueError(
            f"{where}: last_gamma=True needs a norm layer with a 'scale' parameter, but {child!r} has "
            f"parameters {sorted(params)}"
        )
    module.scope.push(child, reuse=True).put_variable(
        "params", "scale", jnp.zeros_like(params["scale"])
    )


def he_reinit_convs(module: nn.Module, child: str) -> None:
    """At init, redraw every 4-D ``kernel`` below ``module``'s child ``child`` with :func:`he_fan_out_normal`.

    For the convolutions jaxenc's layers create with torch's default init and no ``kernel_init``
    field (SplAtConv2d's conv/fc1/fc2, RFConv2d): upstream's ResNet re-initialises every ``nn.Conv2d``
    it contains, those included. The plain convs get ``kernel_init=he_fan_out_normal`` directly.
    """
    if not module.is_initializing():
        return
    flat = flatten_dict(module.variables.get("params", {}).get(child, {}))
    kernels = sorted(k for k, v in flat.items() if k[-1] == "kernel" and jnp.ndim(v) == 4)
    if not kernels:
        return
    keys = jax.random.split(module.make_rng("params"), len(kernels))
    for key, path in zip(keys, kernels):
        scope = module.scope.push(child, reuse=True)
        for name in path[:-1]:
            scope = scope.push(name, reuse=True)
        old = flat[path]
        scope.put_variable("params", "kernel", he_fan_out_normal(key, old.shape, old.dtype))


class Downsample(DtypeFields):
    """Upstream's shortcut ``nn.Sequential``: [AvgPool (avg_down)] + conv1x1 + norm.

    Children "0" (conv) and "1" (norm), or with ``avg_down`` "1" (conv) and "2" (norm) behind the
    parameter-free pool "0". Shapes: (N, H, W, C_in) -> (N, H/stride, W/stride, out_channels).
    """

    out_channels: int
    stride: int
    avg_down: bool
    norm_layer: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        conv_name, norm_name, stride = "0", "1", self.stride
        if self.avg_down:  # the pool strides; the conv and norm come after it
            if self.stride > 1:  # upstream's kernel-1 pool in stride-1 stages is the identity
                x = avg_pool2d(x, self.stride, self.stride, ceil_mode=True, count_include_pad=False)
            conv_name, norm_name, stride = "1", "2", 1
        x = he_conv(self.out_channels, 1, stride=stride, name=conv_name, **kw)(x)
        return self.norm_layer(self.out_channels, name=norm_name, **kw)(x, train=train)


def conv3x3(
    module: nn.Module,
    x: jax.Array,
    out: int,
    *,
    stride: int,
    padding: int,
    dilation: int = 1,
    groups: int = 1,
    name: str,
) -> jax.Array:
    """``module``'s 3x3 conv child ``name``: :class:`RFConv2d` with ``module.rectified_conv`` (kernels
    redrawn He fan-out at init, as upstream's init loop does), else a plain conv with that init."""
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, name=name)
    args.update(dtype_kwargs(module))
    if module.rectified_conv:
        y = RFConv2d(x.shape[-1], out, 3, average_mode=module.rectify_avg, bias=False, **args)(x)
        he_reinit_convs(module, name)
        return y
    return he_conv(out, 3, in_channels=x.shape[-1], **args)(x)


def dropblock(module: nn.Module, x: jax.Array, name: str, train: bool) -> jax.Array:
    """``module``'s DropBlock2D child ``name`` (block size 3), absent when ``dropblock_prob`` is 0."""
    if module.dropblock_prob <= 0.0:
        return x
    return DropBlock2D(module.dropblock_prob, 3, name=name)(x, train=train)


def add_shortcut(module: nn.Module, x: jax.Array, out: jax.Array, train: bool) -> jax.Array:
    """ReLU(out + shortcut(x)): ``downsample`` (a :class:`Downsample` child) when the block has one."""
    residual = x
    if module.downsample:
        residual = Downsample(
            out.shape[-1],
            module.stride,
            module.avg_down,
            module.norm_layer,
            name="downsample",
            **dtype_kwargs(module),
        )(x, train=train)
    return jax.nn.relu(out + residual.astype(out.dtype))


class Bottleneck(DtypeFields):
    """PyTorch-Encoding's ResNet/ResNeXt/ResNeSt Bottleneck (expansion 4).

    He et al., CVPR 2016; Xie et al., CVPR 2017; Zhang et al., arXiv:2004.08955.

    conv1 1x1 (-> gw = int(planes * bottleneck_width / 64) * cardinality) -> bn1 -> [dropblock1] ->
    relu -> [avd pool if avd_first] -> conv2 3x3 (stride, padding = dilation, groups = cardinality:
    a plain or rectified conv + bn2 -> [dropblock2] -> relu when radix == 1, :class:`SplAtConv2d`
    when radix > 1) -> [avd pool] -> conv3 1x1 (-> 4 planes) -> bn3 -> [dropblock3] -> + shortcut
    (``downsample`` when given) -> relu. See the module docstring for avd and ``last_gamma``.

    Shapes: x (N, H, W, C_in) -> (N, H/stride, W/stride, 4 * planes). ``__call__(x, train=False)``.
    ``downsample``: whether the block has a shortcut projection (``avg_down`` picks its form).
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    avg_down: bool = False
    radix: int = 1
    cardinality: int = 1
    bottleneck_width: int = 64
    avd: bool = False
    avd_first: bool = False
    dilation: int = 1
    is_first: bool = False
    rectified_conv: bool = False
    rectify_avg: bool = False
    norm_layer: Callable[..., nn.Module] = BatchNorm
    dropblock_prob: float = 0.0
    last_gamma: bool = False

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        norm = self.norm_layer
        drop = self.dropblock_prob
        gw = int(self.planes * (self.bottleneck_width / 64.0)) * self.cardinality
        avd = self.avd and (self.stride > 1 or self.is_first)
        stride = 1 if avd else self.stride

        def avd_pool(v):
            return avg_pool2d(
                v, 3, self.stride, padding=1
            )  # count_include_pad=True, as torch's default

        out = he_conv(gw, 1, name="conv1", **kw)(x)
        out = jax.nn.relu(
            dropblock(self, norm(gw, name="bn1", **kw)(out, train=train), "dropblock1", train)
        )
        if avd and self.avd_first:
            out = avd_pool(out)

        d = self.dilation
        geometry = dict(stride=stride, padding=d, dilation=d, groups=self.cardinality, name="conv2")
        if self.radix > 1:
            split = dict(radix=self.radix, norm_layer=norm, dropblock_prob=drop, bias=False)
            rectify = dict(rectify=self.rectified_conv, rectify_avg=self.rectify_avg)
            out = SplAtConv2d(gw, gw, 3, **geometry, **split, **rectify, **kw)(out, train=train)
            he_reinit_convs(self, "conv2")
        else:
            out = conv3x3(self, out, gw, **geometry)
            out = jax.nn.relu(
                dropblock(self, norm(gw, name="bn2", **kw)(out, train=train), "dropblock2", train)
            )
        if avd and not self.avd_first:
            out = avd_pool(out)

        out_channels = self.planes * self.expansion
        out = he_conv(out_channels, 1, name="conv3", **kw)(out)
        out = norm(out_channels, name="bn3", **kw)(out, train=train)
        if self.last_gamma:
            zero_scale(self, "bn3", "Bottleneck")
        return add_shortcut(self, x, dropblock(self, out, "dropblock3", train), train)


class BasicBlock(DtypeFields):
    """torchvision's ResNet-18/34 basic block (expansion 1) in PyTorch-Encoding's backbone.

    He et al., CVPR 2016.

    conv1 3x3 (stride, padding = dilation, dilation) -> bn1 -> [dropblock1] -> relu -> conv2 3x3
    (padding = dilation, dilation) -> bn2 -> [dropblock2] -> + shortcut -> relu. Both 3x3 convs are
    :class:`RFConv2d` with ``rectified_conv``; ``last_gamma`` zero-initialises bn2's scale.

    Shapes: x (N, H, W, C_in) -> (N, H/stride, W/stride, planes). ``__call__(x, train=False)``.
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    avg_down: bool = False
    dilation: int = 1
    rectified_conv: bool = False
    rectify_avg: bool = False
    norm_layer: Callable[..., nn.Module] = BatchNorm
    dropblock_prob: float = 0.0
    last_gamma: bool = False

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        planes, d = self.planes, self.dilation
        out = conv3x3(self, x, planes, stride=self.stride, padding=d, dilation=d, name="conv1")
        out = jax.nn.relu(
            dropblock(
                self,
                self.norm_layer(planes, name="bn1", **kw)(out, train=train),
                "dropblock1",
                train,
            )
        )
        out = conv3x3(self, out, planes, stride=1, padding=d, dilation=d, name="conv2")
        out = self.norm_layer(planes, name="bn2", **kw)(out, train=train)
        if self.last_gamma:
            zero_scale(self, "bn2", "BasicBlock")
        return add_shortcut(self, x, dropblock(self, out, "dropblock2", train), train)


class DeepStem(DtypeFields):
    """Upstream's deep stem ``nn.Sequential``: conv 3->w /2, norm, ReLU, conv w->w, norm, ReLU, conv w->2w.

    Children "0", "1", "3", "4", "6" (the ReLUs are "2" and "5"). Shapes: (N, H, W, 3) ->
    (N, H/2, W/2, 2 * stem_width). Convs are :class:`RFConv2d` with ``rectified_conv``.
    """

    stem_width: int
    rectified_conv: bool = False
    rectify_avg: bool = False
    norm_layer: Callable[..., nn.Module] = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        w = self.stem_width
        x = conv3x3(self, x, w, stride=2, padding=1, name="0")
        x = jax.nn.relu(self.norm_layer(w, name="1", **kw)(x, train=train))
        x = conv3x3(self, x, w, stride=1, padding=1, name="3")
        x = jax.nn.relu(self.norm_layer(w, name="4", **kw)(x, train=train))
        return conv3x3(self, x, 2 * w, stride=1, padding=1, name="6")
