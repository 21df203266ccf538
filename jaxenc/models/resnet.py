"""PyTorch-Encoding's configurable ResNet family (ResNet, ResNet-S/D, ResNeXt, ResNeSt) in Flax, NHWC.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; He et al., "Bag of Tricks for
Image Classification with CNNs", CVPR 2019 (deep stem, avg-down shortcut: ResNet-D); Xie et al.,
"Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017 (ResNeXt); Zhang et al.,
"ResNeSt: Split-Attention Networks", arXiv:2004.08955 (radix, avd); Yu & Koltun, "Multi-Scale Context
Aggregation by Dilated Convolutions", ICLR 2016 (dilated output stride 8/16).

One :class:`ResNet` (upstream ``encoding/models/backbone/resnet.py``)
with the upstream knobs, a :class:`Bottleneck` (expansion 4) and a :class:`BasicBlock` (expansion 1,
torchvision's ResNet-18/34 block, which upstream lacks). Submodule names are upstream's torch attribute
names (``conv1``, ``bn1``, ``layer1.0.conv2.fc1``, ``downsample.1``, the deep stem's ``conv1.0`` ...
``conv1.6``), so :func:`jaxenc.port.torch_to_flax` converts an upstream ``state_dict`` one to one.

Named constructors (registered in :mod:`jaxenc.models.registry`): ``resnet18``, ``resnet34``,
``resnet50``, ``resnet101``, ``resnet152``, ``resnet50s``, ``resnet101s``, ``resnet152s``, ``resnet50d``,
``resnext50_32x4d``, ``resnext101_32x8d``, ``resnest50``, ``resnest101``, ``resnest200``,
``resnest269``, ``resnest50_fast``, ``resnest101_fast``. Each takes keyword overrides of the
:class:`ResNet` fields (``dilated=True``, ``norm_layer=...``, ``num_classes=...``); overrides replace the
constructor's presets. Pretrained weights live in the model store (``jaxenc.models.load_pretrained``).

Semantics settled against upstream at HEAD (the ``is_first`` version of the backbone; an older
revision activated avd with ``stride > 1 or dilation > 1``, which differs only in dilated stages):

- ``radix == 1``: plain 3x3 conv + ``bn2`` (ReLU, optional DropBlock); ``radix > 1``:
  :class:`jaxenc.nn.SplAtConv2d` (no ``bn2``: its own ``bn0``/``bn1``). The ``resnest`` pip package's
  copy of this backbone (the test oracle) uses SplAt for ``radix >= 1`` and the plain conv for
  ``radix == 0``, so its ``radix=0`` is this ``radix=1``.
- avd (``AvgPool2d(3, stride, padding=1)``, count_include_pad=True; the 3x3 conv then has stride 1) is
  active when ``avd and (stride > 1 or is_first)``: the first block of layers 2-4 (``is_first``), so
  in dilated, stride-1 stages that block blurs with a 3x3/1 average. ``avd_first`` puts the pool
  before the 3x3 conv, otherwise it follows it (after its BN/ReLU).
- Output strides: 4/8/16/32 for c1..c4; 4/8/8/8 with ``dilated=True`` or ``dilation=4`` (layer3
  stride 1 with first block d=1 then d=2, layer4 stride 1 with first block d=2 then d=4); 4/8/16/16
  with ``dilation=2`` (layer4 stride 1, first block d=1 then d=2).
- Shortcut: conv1x1(stride) + norm, or with ``avg_down`` AvgPool(stride, stride, ceil_mode=True,
  count_include_pad=False) + conv1x1 + norm (the pool is the identity in stride-1 stages: upstream's
  kernel-1 pool), as ``downsample.0``/``.1``(/``.2``).
- DropBlock (``DropBlock2D(dropblock_prob, 3)``, :class:`jaxenc.nn.DropBlock2D`) in layer3 and layer4
  only: after bn1, after bn2 (radix 1) or inside SplAt after bn0 (radix > 1), and after bn3 before the
  residual add.
- Initialisation (by the blocks and the stem, so also for a standalone block): every convolution
  kernel, SplAt's and RFConv2d's included, ~ N(0, sqrt(2 / (kh * kw * out_channels))) (He fan-out,
  :func:`he_fan_out_normal`); conv biases (SplAt's fc1/fc2) keep torch's default; norm scale 1,
  bias 0; ``fc`` torch's Linear default U(+-1/sqrt(fan_in)).

Deliberate differences from upstream (docs/DESIGN.md, "Decisions on upstream bugs"):

- ``last_gamma=True`` really zero-initialises the last norm's scale of every block (``bn3`` of a
  Bottleneck, ``bn2`` of a BasicBlock), so every residual branch outputs zero at init and a block
  without a projection shortcut starts as the identity on its (non-negative) input. Upstream zeroes
  ``bn3.weight`` in the block constructor and then its ResNet init loop refills every norm weight
  with 1: a no-op.
- ``dilation`` other than 1, 2 or 4 (with ``dilated=False``) raises a ValueError; upstream silently
  builds the non-dilated network. ``radix`` < 1 raises (upstream's ``radix=0`` builds ``bn2`` and then
  skips it in ``forward``). Invalid options raise a ValueError naming the option instead of failing
  deep in the forward pass.
- :class:`BasicBlock` exists (ResNet-18/34). It follows torchvision's block and honours ``dilation``
  (both 3x3 convs), ``avg_down``, ``deep_stem``, ``rectified_conv`` (both 3x3 convs rectified),
  ``dropblock_prob`` (after bn1 and bn2) and ``last_gamma`` (``bn2``); ``radix > 1``, ``groups > 1``,
  ``bottleneck_width != 64`` and ``avd`` raise a ValueError with basic blocks.
- ``__call__(..., return_features=True)`` returns (c1, c2, c3, c4) without creating ``fc`` (upstream's
  segmentation models set ``fc = None`` after building it).

Rematerialisation (jaxenc's addition): ``remat="block"`` wraps every residual block, and the stem
(conv1, bn1, ReLU, max pool) as one more unit, in :func:`flax.linen.remat` (:func:`remat_apply`), so
training keeps only the block outputs for the backward pass and recomputes each block's internals
there: less activation memory for about one more forward pass of compute. ``remat="none"``
(default) is the plain network. The variables (names, shapes, values at init) and the results
(up to float rounding) are the same in both modes. XLA:CPU undoes much of the recomputation
unless its ``cse_barrier_expander`` pass is disabled (``XLA_FLAGS=--xla_disable_hlo_passes=
cse_barrier_expander``); GPU and TPU keep jax.checkpoint's barriers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from jaxenc.models.registry import build_named, register_model
from jaxenc.nn.conv import RFConv2d, SplAtConv2d
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.regularization import DropBlock2D
from jaxenc.nn.resample import avg_pool2d, max_pool2d
from jaxenc.nn.torch_compat import Conv2d, torch_uniform_init
from jaxenc.validation import check_probability

Dtype = Any

__all__ = [
    "REMAT_MODES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "check_remat",
    "he_fan_out_normal",
    "remat_apply",
    "remat_call",
    "resnest101",
    "resnest101_fast",
    "resnest200",
    "resnest269",
    "resnest50",
    "resnest50_fast",
    "resnet101",
    "resnet101s",
    "resnet152",
    "resnet152s",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50d",
    "resnet50s",
    "resnext101_32x8d",
    "resnext50_32x4d",
]

_BLOCKS = ("bottleneck", "basic")
_EXPANSION = {"bottleneck": 4, "basic": 1}

#: Values of the models' ``remat`` field: "none" (store every activation for the backward pass) and
#: "block" (each residual block / head is rematerialised: its internals are recomputed in the backward
#: pass, trading about one extra forward pass of compute for activation memory).
REMAT_MODES = ("none", "block")


def check_remat(value: Any, where: str) -> str:
    """``value`` if it is one of :data:`REMAT_MODES`, else a ValueError naming the allowed values."""
    if not isinstance(value, str) or value not in REMAT_MODES:
        raise ValueError(f"{where}: remat must be one of {REMAT_MODES}, got {value!r}")
    return value


def remat_apply(
    fn: Callable[..., Any], module: nn.Module, remat: str, *args: Any, **static: Any
) -> Any:
    """``fn(module, *args, **static)``; with ``remat="block"`` under :func:`flax.linen.remat`.

    The lifted transform runs on ``module``'s own scope, so the variables ``fn`` creates or reads keep
    their names (no extra path level) and its rng streams (dropout, DropBlock) draw the same numbers.
    ``args`` are traced (arrays); the keyword arguments (``train=...``) are closed over, i.e. static,
    so Python control flow on them works inside the checkpoint. In the backward pass ``fn`` is
    recomputed from its inputs instead of reading stored internals: memory for compute.
    """
    if remat == "none":
        return fn(module, *args, **static)
    check_remat(remat, type(module).__name__)

    def call(mdl: nn.Module, *inputs: Any) -> Any:
        return fn(mdl, *inputs, **static)

    return nn.remat(call)(module, *args)


def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def remat_call(module: nn.Module, remat: str, *args: Any, **static: Any) -> Any:
    """``module(*args, **static)``, rematerialised as a whole with ``remat="block"`` (:func:`remat_apply`)."""
    return remat_apply(_call_module, module, remat, *args, **static)


def he_fan_out_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """N(0, sqrt(2 / (kh * kw * out_channels))) for an HWIO conv kernel (upstream ResNet's conv init).

    ``shape`` = (kh, kw, in/groups, out), as torch's ``n = k_h * k_w * out_channels``.
    """
    kh, kw, _, out = shape
    std = np.sqrt(2.0 / (kh * kw * out))
    return (jax.random.normal(key, tuple(shape), jnp.float32) * std).astype(dtype)


def _check_int(value, name: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _zero_scale(module: nn.Module, child: str, where: str) -> None:
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


def _he_reinit_convs(module: nn.Module, child: str) -> None:
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


class _Downsample(nn.Module):
    """Upstream's shortcut ``nn.Sequential``: [AvgPool (avg_down)] + conv1x1 + norm.

    Children "0" (conv) and "1" (norm), or with ``avg_down`` "1" (conv) and "2" (norm) behind the
    parameter-free pool "0". Shapes: (N, H, W, C_in) -> (N, H/stride, W/stride, out_channels).
    """

    out_channels: int
    stride: int
    avg_down: bool
    norm_layer: Callable[..., nn.Module]
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.avg_down:
            if self.stride > 1:  # upstream's kernel-1 pool in stride-1 stages is the identity
                x = avg_pool2d(x, self.stride, self.stride, ceil_mode=True, count_include_pad=False)
            x = Conv2d(
                self.out_channels, 1, bias=False, kernel_init=he_fan_out_normal, name="1", **kw
            )(x)
            return self.norm_layer(self.out_channels, name="2", **kw)(x, train=train)
        conv = Conv2d(
            self.out_channels,
            1,
            stride=self.stride,
            bias=False,
            kernel_init=he_fan_out_normal,
            name="0",
            **kw,
        )
        x = conv(x)
        return self.norm_layer(self.out_channels, name="1", **kw)(x, train=train)


def _conv3x3(
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
    args = dict(
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
        name=name,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
    )
    if module.rectified_conv:
        y = RFConv2d(x.shape[-1], out, 3, average_mode=module.rectify_avg, **args)(x)
        _he_reinit_convs(module, name)
        return y
    return Conv2d(out, 3, in_channels=x.shape[-1], kernel_init=he_fan_out_normal, **args)(x)


def _dropblock(module: nn.Module, x: jax.Array, name: str, train: bool) -> jax.Array:
    """``module``'s DropBlock2D child ``name`` (block size 3), absent when ``dropblock_prob`` is 0."""
    if module.dropblock_prob <= 0.0:
        return x
    return DropBlock2D(module.dropblock_prob, 3, name=name)(x, train=train)


def _add_shortcut(module: nn.Module, x: jax.Array, out: jax.Array, train: bool) -> jax.Array:
    """ReLU(out + shortcut(x)): ``downsample`` (a :class:`_Downsample` child) when the block has one."""
    residual = x
    if module.downsample:
        residual = _Downsample(
            out.shape[-1],
            module.stride,
            module.avg_down,
            module.norm_layer,
            name="downsample",
            dtype=module.dtype,
            param_dtype=module.param_dtype,
        )(x, train=train)
    return jax.nn.relu(out + residual.astype(out.dtype))


class Bottleneck(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = self.norm_layer
        drop = self.dropblock_prob
        gw = int(self.planes * (self.bottleneck_width / 64.0)) * self.cardinality
        avd = self.avd and (self.stride > 1 or self.is_first)
        stride = 1 if avd else self.stride

        def avd_pool(v):
            return avg_pool2d(
                v, 3, self.stride, padding=1
            )  # count_include_pad=True, as torch's default

        out = Conv2d(gw, 1, bias=False, kernel_init=he_fan_out_normal, name="conv1", **kw)(x)
        out = jax.nn.relu(
            _dropblock(self, norm(gw, name="bn1", **kw)(out, train=train), "dropblock1", train)
        )
        if avd and self.avd_first:
            out = avd_pool(out)

        d = self.dilation
        if self.radix > 1:
            out = SplAtConv2d(
                gw,
                gw,
                3,
                stride=stride,
                padding=d,
                dilation=d,
                groups=self.cardinality,
                bias=False,
                radix=self.radix,
                rectify=self.rectified_conv,
                rectify_avg=self.rectify_avg,
                norm_layer=norm,
                dropblock_prob=drop,
                name="conv2",
                **kw,
            )(out, train=train)
            _he_reinit_convs(self, "conv2")
        else:
            out = _conv3x3(
                self,
                out,
                gw,
                stride=stride,
                padding=d,
                dilation=d,
                groups=self.cardinality,
                name="conv2",
            )
            out = jax.nn.relu(
                _dropblock(self, norm(gw, name="bn2", **kw)(out, train=train), "dropblock2", train)
            )
        if avd and not self.avd_first:
            out = avd_pool(out)

        out_channels = self.planes * self.expansion
        out = Conv2d(
            out_channels, 1, bias=False, kernel_init=he_fan_out_normal, name="conv3", **kw
        )(out)
        out = norm(out_channels, name="bn3", **kw)(out, train=train)
        if self.last_gamma:
            _zero_scale(self, "bn3", "Bottleneck")
        return _add_shortcut(self, x, _dropblock(self, out, "dropblock3", train), train)


class BasicBlock(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        planes, d = self.planes, self.dilation
        out = _conv3x3(self, x, planes, stride=self.stride, padding=d, dilation=d, name="conv1")
        out = jax.nn.relu(
            _dropblock(
                self,
                self.norm_layer(planes, name="bn1", **kw)(out, train=train),
                "dropblock1",
                train,
            )
        )
        out = _conv3x3(self, out, planes, stride=1, padding=d, dilation=d, name="conv2")
        out = self.norm_layer(planes, name="bn2", **kw)(out, train=train)
        if self.last_gamma:
            _zero_scale(self, "bn2", "BasicBlock")
        return _add_shortcut(self, x, _dropblock(self, out, "dropblock2", train), train)


class _DeepStem(nn.Module):
    """Upstream's deep stem ``nn.Sequential``: conv 3->w /2, norm, ReLU, conv w->w, norm, ReLU, conv w->2w.

    Children "0", "1", "3", "4", "6" (the ReLUs are "2" and "5"). Shapes: (N, H, W, 3) ->
    (N, H/2, W/2, 2 * stem_width). Convs are :class:`RFConv2d` with ``rectified_conv``.
    """

    stem_width: int
    rectified_conv: bool = False
    rectify_avg: bool = False
    norm_layer: Callable[..., nn.Module] = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        w = self.stem_width
        x = _conv3x3(self, x, w, stride=2, padding=1, name="0")
        x = jax.nn.relu(self.norm_layer(w, name="1", **kw)(x, train=train))
        x = _conv3x3(self, x, w, stride=1, padding=1, name="3")
        x = jax.nn.relu(self.norm_layer(w, name="4", **kw)(x, train=train))
        return _conv3x3(self, x, 2 * w, stride=1, padding=1, name="6")


class _Stage(nn.Module):
    """One ``layerN`` ``nn.Sequential``: blocks of class ``block_cls`` named "0", "1", ...

    ``configs``: one tuple of (field, value) pairs per block. Shapes as the blocks'. ``remat``: see
    :func:`remat_call` (each block rematerialised with "block").
    """

    block_cls: type
    configs: tuple
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, config in enumerate(self.configs):
            x = remat_call(self.block_cls(**dict(config), name=str(i)), self.remat, x, train=train)
        return x


def _validate_resnet(self: ResNet) -> None:
    """Check :class:`ResNet`'s fields (a function: Flax wraps module methods, even during construction)."""
    where = "ResNet"
    if self.block not in _BLOCKS:
        raise ValueError(f"{where}: block must be one of {_BLOCKS}, got {self.block!r}")
    layers = self.layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 4:
        raise ValueError(f"{where}: layers must be 4 block counts (layer1..layer4), got {layers!r}")
    for i, n in enumerate(layers):
        _check_int(n, f"layers[{i}]", where)
    planes = self.stage_planes
    if isinstance(planes, (str, bytes)) or not isinstance(planes, Sequence) or len(planes) != 4:
        raise ValueError(f"{where}: stage_planes must be 4 widths (layer1..layer4), got {planes!r}")
    for i, n in enumerate(planes):
        _check_int(n, f"stage_planes[{i}]", where)
    _check_int(self.num_classes, "num_classes", where)
    _check_int(self.radix, "radix", where)
    _check_int(self.groups, "groups", where)
    _check_int(self.bottleneck_width, "bottleneck_width", where)
    _check_int(self.stem_width, "stem_width", where)
    if isinstance(self.dilation, bool) or self.dilation not in (1, 2, 4):
        raise ValueError(
            f"{where}: dilation must be 1 (output stride 32), 2 (16) or 4 (8, as dilated=True), got {self.dilation!r}"
        )
    if check_probability(self.final_drop, "final_drop", where) == 1.0:
        raise ValueError(
            f"{where}: final_drop must be < 1 (it would drop every feature), got {self.final_drop!r}"
        )
    check_probability(self.dropblock_prob, "dropblock_prob", where)
    if self.norm_layer is None or not callable(self.norm_layer):
        raise ValueError(
            f"{where}: norm_layer must be a callable building a norm module, got {self.norm_layer!r}"
        )
    check_remat(self.remat, where)
    if self.block == "basic":
        bad = {
            "radix": (self.radix, 1),
            "groups": (self.groups, 1),
            "bottleneck_width": (self.bottleneck_width, 64),
            "avd": (self.avd, False),
        }
        for name, (value, allowed) in bad.items():
            if value != allowed:
                raise ValueError(
                    f"{where}: {name}={value!r} is not supported with block='basic' (only {name}={allowed!r}); "
                    "use block='bottleneck'"
                )


def _resnet_stem(module: ResNet, x: jax.Array, train: bool) -> jax.Array:
    """:class:`ResNet`'s stem on ``module``'s scope: conv1 (7x7/2, or the deep stem) -> bn1 -> ReLU ->
    3x3/2 max pool. (B, H, W, 3) -> (B, H/4, W/4, 64 or 2 * stem_width)."""
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    stem_out = 2 * module.stem_width if module.deep_stem else 64
    if module.deep_stem:
        x = _DeepStem(
            module.stem_width,
            module.rectified_conv,
            module.rectify_avg,
            module.norm_layer,
            name="conv1",
            **kw,
        )(x, train=train)
    elif module.rectified_conv:
        rf = dict(average_mode=module.rectify_avg, name="conv1", **kw)
        x = RFConv2d(3, 64, 7, stride=2, padding=3, bias=False, **rf)(x)
        _he_reinit_convs(module, "conv1")
    else:
        x = Conv2d(
            64,
            7,
            stride=2,
            padding=3,
            bias=False,
            kernel_init=he_fan_out_normal,
            name="conv1",
            **kw,
        )(x)
    x = jax.nn.relu(module.norm_layer(stem_out, name="bn1", **kw)(x, train=train))
    return max_pool2d(x, 3, 2, 1)


class ResNet(nn.Module):
    """PyTorch-Encoding's ResNet variants (ResNet, ResNet-S/D, ResNeXt, ResNeSt), NHWC.

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Zhang et al., "ResNeSt:
    Split-Attention Networks", arXiv:2004.08955. See the module docstring for the block semantics,
    the dilation schedule, the initialisation and the deliberate differences from upstream.

    Fields (upstream's constructor keywords): ``block`` ("bottleneck" | "basic"), ``layers`` (blocks
    per stage, 4 ints), ``stage_planes`` (jaxenc's addition: the stages' ``planes``, default upstream's
    (64, 128, 256, 512); narrower stages make small models), ``num_classes``, ``radix`` (1: plain 3x3 conv, > 1: split attention),
    ``groups`` (cardinality), ``bottleneck_width``, ``dilated`` / ``dilation`` (output stride 8 with
    dilated=True or dilation=4, 16 with dilation=2), ``deep_stem``, ``stem_width``, ``avg_down``,
    ``rectified_conv``, ``rectify_avg``, ``avd``, ``avd_first``, ``final_drop`` (dropout before fc),
    ``dropblock_prob`` (layer3/layer4), ``last_gamma`` (working), ``norm_layer`` (a callable
    ``norm_layer(num_features, *, name, dtype, param_dtype)``, default :class:`jaxenc.nn.BatchNorm`;
    ``functools.partial(jaxenc.nn.SyncBatchNorm, axis_name="data")`` for synchronised statistics),
    ``dtype`` (compute dtype, e.g. bfloat16), ``param_dtype``, ``remat`` ("none" | "block": every
    residual block and the stem rematerialised, trading recompute in the backward pass for activation
    memory; same variables and results, see :func:`remat_apply`).

    ``__call__(x, train=False, *, return_features=False)``: x (B, H, W, 3) -> logits (B, num_classes);
    with ``return_features`` the tuple (c1, c2, c3, c4) of layer1..layer4 outputs, (B, H/s, W/s, C)
    with s = 4, 8, 16, 32 (4, 8, 8, 8 when dilated; 4, 8, 16, 16 with dilation=2) and C = 256, 512,
    1024, 2048 (64, 128, 256, 512 for basic blocks; in general ``stage_planes`` times the block's
    expansion), without ``fc`` parameters. ``train`` uses batch
    statistics (``batch_stats`` mutable) and the ``dropout`` rng stream (final_drop, DropBlock).
    """

    block: str = "bottleneck"
    layers: Sequence[int] = (3, 4, 6, 3)
    stage_planes: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 1000
    radix: int = 1
    groups: int = 1
    bottleneck_width: int = 64
    dilated: bool = False
    dilation: int = 1
    deep_stem: bool = False
    stem_width: int = 64
    avg_down: bool = False
    rectified_conv: bool = False
    rectify_avg: bool = False
    avd: bool = False
    avd_first: bool = False
    final_drop: float = 0.0
    dropblock_prob: float = 0.0
    last_gamma: bool = False
    norm_layer: Callable[..., nn.Module] = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    def __post_init__(self):
        _validate_resnet(self)
        super().__post_init__()

    def _stage_plan(self) -> list[tuple[int, int, int, float]]:
        """(planes, stride, dilation, dropblock_prob) of layer1..layer4, as upstream's constructor."""
        p = self.dropblock_prob
        if self.dilated or self.dilation == 4:
            plan = [(1, 1, 0.0), (2, 1, 0.0), (1, 2, p), (1, 4, p)]
        elif self.dilation == 2:
            plan = [(1, 1, 0.0), (2, 1, 0.0), (2, 1, p), (1, 2, p)]
        else:
            plan = [(1, 1, 0.0), (2, 1, 0.0), (2, 1, p), (2, 1, p)]
        return [(planes, *rest) for planes, rest in zip(self.stage_planes, plan)]

    def _stage(
        self,
        inplanes: int,
        planes: int,
        n: int,
        stride: int,
        dilation: int,
        dropblock_prob: float,
        is_first: bool,
        name: str,
    ) -> tuple[_Stage, int]:
        """Upstream's ``_make_layer``: the first block strides (and projects), the rest keep the shape."""
        expansion = _EXPANSION[self.block]
        common = dict(
            planes=planes,
            avg_down=self.avg_down,
            rectified_conv=self.rectified_conv,
            rectify_avg=self.rectify_avg,
            norm_layer=self.norm_layer,
            dropblock_prob=dropblock_prob,
            last_gamma=self.last_gamma,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        first = dict(stride=stride, downsample=stride != 1 or inplanes != planes * expansion)
        first["dilation"] = 2 if dilation == 4 else 1
        if self.block == "bottleneck":
            cls = Bottleneck
            common.update(
                radix=self.radix,
                cardinality=self.groups,
                bottleneck_width=self.bottleneck_width,
                avd=self.avd,
                avd_first=self.avd_first,
            )
            first["is_first"] = is_first
        else:
            cls = BasicBlock
        configs = [tuple({**common, **first}.items())]
        configs += [tuple({**common, "dilation": dilation}.items()) for _ in range(1, n)]
        return _Stage(cls, tuple(configs), remat=self.remat, name=name), planes * expansion

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, return_features: bool = False):
        where = "ResNet"
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"{where}: expected an NHWC image batch (B, H, W, 3), got shape {tuple(x.shape)}"
            )
        if self.dtype is not None:
            x = x.astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = remat_apply(_resnet_stem, self, self.remat, x, train=train)

        features = []
        inplanes = 2 * self.stem_width if self.deep_stem else 64
        for i, (planes, stride, dilation, drop) in enumerate(self._stage_plan()):
            n = self.layers[i]
            stage, inplanes = self._stage(
                inplanes, planes, n, stride, dilation, drop, i > 0, f"layer{i + 1}"
            )
            x = stage(x, train=train)
            features.append(x)

        if return_features:
            return tuple(features)

        acc = jnp.promote_types(x.dtype, jnp.float32)
        x = jnp.mean(x.astype(acc), axis=(1, 2)).astype(x.dtype)
        if self.final_drop > 0.0:
            x = nn.Dropout(self.final_drop, name="drop")(x, deterministic=not train)
        fan_in = x.shape[-1]
        x = nn.Dense(
            self.num_classes,
            kernel_init=torch_uniform_init(fan_in),
            bias_init=torch_uniform_init(fan_in),
            name="fc",
            **kw,
        )(x)
        return x


# --------------------------------------------------------------------------------------------------
# Named constructors


def _build(
    model: str, presets: dict[str, Any], pretrained: bool, overrides: dict[str, Any]
) -> ResNet:
    return build_named(
        model, ResNet, pretrained, presets, overrides, tuple_fields=("layers", "stage_planes")
    )


_RESNEST = dict(radix=2, groups=1, bottleneck_width=64, deep_stem=True, avg_down=True, avd=True)


@register_model("resnet18")
def resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision's basic-block design, [2, 2, 2, 2]; not in upstream); 11,689,512 params."""
    return _build("resnet18", dict(block="basic", layers=(2, 2, 2, 2)), pretrained, kwargs)


@register_model("resnet34")
def resnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34 (basic blocks, [3, 4, 6, 3]; not in upstream); 21,797,672 params."""
    return _build("resnet34", dict(block="basic", layers=(3, 4, 6, 3)), pretrained, kwargs)


@register_model("resnet50")
def resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 ([3, 4, 6, 3] bottlenecks, 7x7 stem), torchvision layout; 25,557,032 params."""
    return _build("resnet50", dict(layers=(3, 4, 6, 3)), pretrained, kwargs)


@register_model("resnet101")
def resnet101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-101 ([3, 4, 23, 3] bottlenecks, 7x7 stem)."""
    return _build("resnet101", dict(layers=(3, 4, 23, 3)), pretrained, kwargs)


@register_model("resnet152")
def resnet152(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-152 ([3, 8, 36, 3] bottlenecks, 7x7 stem)."""
    return _build("resnet152", dict(layers=(3, 8, 36, 3)), pretrained, kwargs)


@register_model("resnet50s")
def resnet50s(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNetS-50, PSPNet's ResNet: deep stem (3x3 convs 3->64->64->128), [3, 4, 6, 3]."""
    return _build("resnet50s", dict(layers=(3, 4, 6, 3), deep_stem=True), pretrained, kwargs)


@register_model("resnet101s")
def resnet101s(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNetS-101 (deep stem of width 64, [3, 4, 23, 3])."""
    return _build("resnet101s", dict(layers=(3, 4, 23, 3), deep_stem=True), pretrained, kwargs)


@register_model("resnet152s")
def resnet152s(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNetS-152 (deep stem of width 64, [3, 8, 36, 3])."""
    return _build("resnet152s", dict(layers=(3, 8, 36, 3), deep_stem=True), pretrained, kwargs)


@register_model("resnet50d")
def resnet50d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50-D (He et al., Bag of Tricks, CVPR 2019): deep stem of width 32, avg-down shortcut."""
    return _build(
        "resnet50d",
        dict(layers=(3, 4, 6, 3), deep_stem=True, stem_width=32, avg_down=True),
        pretrained,
        kwargs,
    )


@register_model("resnext50_32x4d")
def resnext50_32x4d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al., CVPR 2017): groups 32, bottleneck width 4, [3, 4, 6, 3]."""
    return _build(
        "resnext50_32x4d",
        dict(layers=(3, 4, 6, 3), groups=32, bottleneck_width=4),
        pretrained,
        kwargs,
    )


@register_model("resnext101_32x8d")
def resnext101_32x8d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d: groups 32, bottleneck width 8, [3, 4, 23, 3]."""
    return _build(
        "resnext101_32x8d",
        dict(layers=(3, 4, 23, 3), groups=32, bottleneck_width=8),
        pretrained,
        kwargs,
    )


@register_model("resnest50")
def resnest50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-50 (Zhang et al., arXiv:2004.08955): radix 2, deep stem 32, avg-down, avd after the conv."""
    return _build(
        "resnest50",
        dict(layers=(3, 4, 6, 3), stem_width=32, avd_first=False, **_RESNEST),
        pretrained,
        kwargs,
    )


@register_model("resnest101")
def resnest101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-101: radix 2, deep stem 64, avg-down, avd, [3, 4, 23, 3]."""
    return _build(
        "resnest101",
        dict(layers=(3, 4, 23, 3), stem_width=64, avd_first=False, **_RESNEST),
        pretrained,
        kwargs,
    )


@register_model("resnest200")
def resnest200(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-200: radix 2, deep stem 64, avg-down, avd, [3, 24, 36, 3]."""
    return _build(
        "resnest200",
        dict(layers=(3, 24, 36, 3), stem_width=64, avd_first=False, **_RESNEST),
        pretrained,
        kwargs,
    )


@register_model("resnest269")
def resnest269(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-269: radix 2, deep stem 64, avg-down, avd, [3, 30, 48, 8]."""
    return _build(
        "resnest269",
        dict(layers=(3, 30, 48, 8), stem_width=64, avd_first=False, **_RESNEST),
        pretrained,
        kwargs,
    )


@register_model("resnest50_fast")
def resnest50_fast(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-50-fast: resnest50 with the avd pool before the 3x3 conv (avd_first=True)."""
    return _build(
        "resnest50_fast",
        dict(layers=(3, 4, 6, 3), stem_width=32, avd_first=True, **_RESNEST),
        pretrained,
        kwargs,
    )


@register_model("resnest101_fast")
def resnest101_fast(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-101-fast: resnest101 with avd_first=True."""
    return _build(
        "resnest101_fast",
        dict(layers=(3, 4, 23, 3), stem_width=64, avd_first=True, **_RESNEST),
        pretrained,
        kwargs,
    )
