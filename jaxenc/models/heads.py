"""Segmentation heads of PyTorch-Encoding's ``encoding/models/sseg`` (and DANet's), NHWC, in Flax.

FCNHead (+ image-pool branch), PSPHead, EncModule / EncHead (EncNet), ASPP_Module / DeepLabV3Head,
FCFPNHead / UperNetHead, ATTENHead (CFNet) and DANetHead (PAM/CAM from DANet). Every
head maps features (NHWC, class axis last) to logits at the feature resolution; the
models in :mod:`jaxenc.models.segmentation` upsample them to the input size.

Names: every submodule is named as the upstream attribute, and every ``nn.Sequential`` /
``nn.ModuleList`` child by its index ("0", "1", ...), so an upstream ``state_dict`` converts one to
one with :func:`jaxenc.port.torch_to_flax` (e.g. FCNHead's ``conv5.0.weight``, ``conv5.1.running_var``,
``conv5.4.bias``). Layers without parameters (ReLU, Dropout, pooling) keep their index but create
nothing.

Conventions: ``__call__(..., train=False)``; in training the norms use batch statistics (mutable
``batch_stats``) and dropout draws from the ``dropout`` rng stream. ``norm_layer`` is a callable
``norm_layer(num_features, *, name, dtype, param_dtype)`` returning a module called as
``norm(x, train=train)`` (default :class:`jaxenc.nn.BatchNorm`; ``functools.partial(SyncBatchNorm,
axis_name="data")`` for synchronised statistics). ``up_kwargs`` is upstream's interpolation dict,
``{'mode': 'bilinear', 'align_corners': True}`` when None. ``dtype`` is the compute dtype (e.g.
bfloat16; norm statistics stay float32), ``param_dtype`` the parameter dtype.

Dropout follows upstream HEAD: element-wise ``nn.Dropout(0.1)`` before the classifiers of the
FCN/PSP/EncNet/DeepLab/FCFPN/ATTEN heads, channel-wise ``Dropout2d(0.5)`` at the end of the ASPP
projection, channel-wise ``Dropout2d(0.1)`` in DANet's classifiers.

Deliberate differences from upstream:
- UperNetHead does not mutate a shared default ``fpn_inchannels`` list (upstream doubles the last
  entry of its default list on every construction, so a second UperNet breaks).
- ATTENHead(with_global=False) works: the ACF module (``atten``) feeds the EncModule directly
  (upstream references an undefined name there).
- EncModule's BatchNorm over the K codewords of the (B, K, D) encoding runs on the transposed
  (B, D, K) tensor with K as the feature axis, which are the same statistics as torch's
  ``BatchNorm1d(K)``; so any ``norm_layer`` (also synchronised ones) works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.attention import ACFModule, CAM_Module, PAM_Module
from jaxenc.nn.customize import ConvNormReLU, PyramidPooling, check_up_kwargs
from jaxenc.nn.encoding import Encoding
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.resample import adaptive_avg_pool2d, interpolate_bilinear
from jaxenc.nn.torch_compat import Conv2d, torch_uniform_init
from jaxenc.port import register_torch_aliases
from jaxenc.validation import check_channels, check_positive_int, check_rank

Dtype = Any
NormLayer = Callable[..., nn.Module]

__all__ = [
    "FCNHead",
    "GlobalPooling",
    "AsppPooling",
    "PSPHead",
    "EncModule",
    "EncHead",
    "ASPP_Module",
    "ASPP",
    "DeepLabV3Head",
    "FCFPNHead",
    "UperNetHead",
    "ATTENHead",
    "DANetHead",
]

_NHWC = "N, H, W, C"


# --- shared building blocks ---------------------------------------------------------------------


def _kw(module: nn.Module) -> dict:
    return dict(dtype=module.dtype, param_dtype=module.param_dtype)


def _dropout(x: jax.Array, rate: float, train: bool, channelwise: bool) -> jax.Array:
    """``nn.Dropout(rate)`` (element-wise) or ``nn.Dropout2d(rate)`` (whole channels of each sample,
    the mask shared over H and W) in training; the identity otherwise. Call inside a compact method."""
    if not train or rate == 0.0:
        return x
    return nn.Dropout(rate, broadcast_dims=(1, 2) if channelwise else ())(x, deterministic=False)


def _upsample(x: jax.Array, size: tuple[int, int], align_corners: bool) -> jax.Array:
    if tuple(x.shape[1:3]) == tuple(size) and align_corners:
        return x  # align-corners resize to the same size is the identity
    return interpolate_bilinear(x, size, align_corners=align_corners)


def _features(x: jax.Array, in_channels: int | None, where: str, dtype) -> jax.Array:
    x = jnp.asarray(x)
    check_rank(x, 4, _NHWC, where)
    check_channels(x, in_channels, where)
    return x if dtype is None else x.astype(dtype)


class _ConvNormReLUList(nn.Module):
    """An ``nn.ModuleList`` of :class:`jaxenc.nn.customize.ConvNormReLU` blocks with one configuration; ``__call__(i, x)``
    runs block ``i`` (child name ``str(i)``)."""

    out_channels: int
    kernel_size: int = 1
    padding: int = 0
    norm_layer: NormLayer = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, index: int, x: jax.Array, train: bool = False) -> jax.Array:
        block = ConvNormReLU(
            self.out_channels,
            self.kernel_size,
            self.padding,
            norm_layer=self.norm_layer,
            name=str(index),
            **_kw(self),
        )
        return block(x, train=train)


class _ConvNormReLUDropConv(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = _kw(self)
        i = 0
        if self.pyramid:  # PSPHead: PyramidPooling is child "0"
            x = PyramidPooling(
                x.shape[-1], norm_layer=self.norm_layer, up_kwargs=self.up_kwargs, name="0", **kw
            )(x, train=train)
            i = 1
        y = Conv2d(self.inter_channels, 3, padding=1, bias=False, name=str(i), **kw)(x)
        y = self.norm_layer(self.inter_channels, name=str(i + 1), **kw)(y, train=train)
        y = jax.nn.relu(y)
        j = i + 3
        if self.with_global:  # FCNHead: ConcurrentModule([Identity(), GlobalPooling]) is child "3"
            y = _IdentityAndGlobalPool(
                self.inter_channels, self.norm_layer, self.up_kwargs, name=str(j), **kw
            )(y, train=train)
            j += 1
        y = _dropout(y, self.dropout, train, self.channelwise)
        return Conv2d(self.out_channels, 1, name=str(j + 1), **kw)(y)


class _Classifier(nn.Module):
    """Upstream ``nn.Sequential(Dropout(rate) or Dropout2d(rate), Conv2d(in, out, 1))``: child "1"."""

    out_channels: int
    dropout: float = 0.1
    channelwise: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _dropout(x, self.dropout, train, self.channelwise)
        return Conv2d(self.out_channels, 1, name="1", **_kw(self))(x)


class _GapSequential(nn.Module):
    """Upstream ``gap = nn.Sequential(AdaptiveAvgPool2d(1), Conv2d(in, out, 1, bias=False), norm, ReLU)``:
    children "1" (conv) and "2" (norm). Shapes: (N, H, W, C) -> (N, 1, 1, out_channels)."""

    out_channels: int
    norm_layer: NormLayer = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = _kw(self)
        y = adaptive_avg_pool2d(x, 1)
        y = Conv2d(self.out_channels, 1, bias=False, name="1", **kw)(y)
        y = self.norm_layer(self.out_channels, name="2", **kw)(y, train=train)
        return jax.nn.relu(y)


class GlobalPooling(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = type(self).__name__
        check_positive_int(self.out_channels, "out_channels", where)
        align = check_up_kwargs(self.up_kwargs, where)
        x = _features(x, self.in_channels, where, self.dtype)
        pool = _GapSequential(self.out_channels, self.norm_layer, name="gap", **_kw(self))(
            x, train=train
        )
        return interpolate_bilinear(pool, tuple(x.shape[1:3]), align_corners=align).astype(x.dtype)


class AsppPooling(GlobalPooling):
    """DeepLabV3's image pooling branch (upstream ``AsppPooling``): identical to :class:`GlobalPooling`."""


class _IdentityAndGlobalPool(nn.Module):
    """Upstream ``ConcurrentModule([Identity(), GlobalPooling(C, C)])``: concat(x, pool(x)); child "1"."""

    channels: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pool = GlobalPooling(
            self.channels, self.channels, self.norm_layer, self.up_kwargs, name="1", **_kw(self)
        )
        return jnp.concatenate([x, pool(x, train=train).astype(x.dtype)], axis=-1)


# --- FCN ------------------------------------------------------------------------------------------


class FCNHead(nn.Module):
    """Fully convolutional head (Long et al., "Fully Convolutional Networks for Semantic Segmentation",
    CVPR 2015), PyTorch-Encoding's ``FCNHead``; also the auxiliary head on c3 of every model.

    ``conv5``: 3x3 conv in -> in // 4 (no bias) + norm + ReLU, Dropout(0.1), 1x1 conv -> out_channels.
    ``with_global`` inserts a concatenated image-pool branch (:class:`GlobalPooling`, ``conv5.3.1``)
    after the ReLU, so the classifier (``conv5.5``) sees 2 * (in // 4) channels.

    Shapes: x (N, H, W, in_channels) -> (N, H, W, out_channels).
    """

    in_channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None
    with_global: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "FCNHead"
        check_positive_int(self.in_channels, "in_channels", where)
        check_positive_int(self.out_channels, "out_channels", where)
        if self.in_channels < 4:
            raise ValueError(
                f"{where}: in_channels must be >= 4 (the hidden width is in_channels // 4), got {self.in_channels}"
            )
        check_up_kwargs(self.up_kwargs, where)
        x = _features(x, self.in_channels, where, self.dtype)
        conv5 = _ConvNormReLUDropConv(
            self.in_channels // 4,
            self.out_channels,
            self.norm_layer,
            dropout=0.1,
            with_global=self.with_global,
            up_kwargs=self.up_kwargs,
            name="conv5",
            **_kw(self),
        )
        return conv5(x, train=train)


# --- PSP ------------------------------------------------------------------------------------------


class PSPHead(nn.Module):
    """PSPNet head (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017), upstream ``PSPHead``.

    ``conv5``: :class:`jaxenc.nn.PyramidPooling` (``conv5.0``, in -> 2·in channels), 3x3 conv
    2·in -> in // 4 (no bias) + norm + ReLU, Dropout(0.1), 1x1 conv -> out_channels (``conv5.5``).

    Shapes: x (N, H, W, in_channels) -> (N, H, W, out_channels). in_channels divisible by 4.
    """

    in_channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "PSPHead"
        check_positive_int(self.in_channels, "in_channels", where)
        check_positive_int(self.out_channels, "out_channels", where)
        if self.in_channels % 4:
            raise ValueError(
                f"{where}: in_channels must be divisible by 4 (pyramid levels of in_channels // 4), "
                f"got {self.in_channels}"
            )
        x = _features(x, self.in_channels, where, self.dtype)
        conv5 = _ConvNormReLUDropConv(
            self.in_channels // 4,
            self.out_channels,
            self.norm_layer,
            dropout=0.1,
            pyramid=True,
            up_kwargs=self.up_kwargs,
            name="conv5",
            **_kw(self),
        )
        return conv5(x, train=train)


# --- EncNet ---------------------------------------------------------------------------------------


class _EncodingSequential(nn.Module):
    """EncModule's ``encoding`` Sequential: "0" 1x1 conv (no bias), "1" norm, ReLU, "3" Encoding(D, K),
    "4" norm over the K codewords, ReLU, mean over K. Shapes: (B, H, W, D) -> (B, D)."""

    channels: int
    ncodes: int
    norm_layer: NormLayer = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = _kw(self)
        y = Conv2d(self.channels, 1, bias=False, name="0", **kw)(x)
        y = jax.nn.relu(self.norm_layer(self.channels, name="1", **kw)(y, train=train))
        e = Encoding(self.channels, self.ncodes, name="3", **kw)(y)  # (B, K, D)
        # torch BatchNorm1d(K) on (B, K, D): K is the feature axis; statistics over B and D.
        e = self.norm_layer(self.ncodes, name="4", **kw)(
            jnp.swapaxes(e, 1, 2), train=train
        )  # (B, D, K)
        e = jax.nn.relu(e)
        return jnp.mean(e, axis=-1)  # Mean(dim=1) over the codewords -> (B, D)


class _FcSigmoid(nn.Module):
    """EncModule's ``fc = nn.Sequential(nn.Linear(C, C), nn.Sigmoid())``: child "0"."""

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(_linear(self.features, x.shape[-1], "0", self)(x))


def _linear(features: int, fan_in: int, name: str, module: nn.Module) -> nn.Dense:
    """``torch.nn.Linear(fan_in, features)``: U(±1/sqrt(fan_in)) for weight and bias."""
    init = torch_uniform_init(fan_in)
    return nn.Dense(features, kernel_init=init, bias_init=init, name=name, **_kw(module))


class EncModule(nn.Module):
    """Context encoding module of EncNet (Zhang et al., "Context Encoding for Semantic Segmentation",
    CVPR 2018), upstream ``EncModule``.

    ``en = mean_K(ReLU(BN_K(Encoding(ReLU(BN(conv1x1(x)))))))`` (``encoding``, (B, C));
    ``gamma = sigmoid(fc(en))``; output ``ReLU(x + x * gamma)`` (channel-wise excitation), and with
    ``se_loss`` the semantic-encoding logits ``selayer(en)``.

    Shapes: x (B, H, W, in_channels) -> a tuple ``(y,)`` or ``(y, se)`` with y (B, H, W, in_channels)
    and se (B, nclass).
    """

    in_channels: int
    nclass: int
    ncodes: int = 32
    se_loss: bool = True
    norm_layer: NormLayer = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        where = "EncModule"
        for name in ("in_channels", "nclass", "ncodes"):
            check_positive_int(getattr(self, name), name, where)
        x = _features(x, self.in_channels, where, self.dtype)
        en = _EncodingSequential(
            self.in_channels, self.ncodes, self.norm_layer, name="encoding", **_kw(self)
        )(x, train=train)
        gamma = _FcSigmoid(self.in_channels, name="fc", **_kw(self))(en)
        y = jax.nn.relu(x + x * gamma[:, None, None, :].astype(x.dtype))
        if not self.se_loss:
            return (y,)
        return (y, _linear(self.nclass, self.in_channels, "selayer", self)(en))


def _lateral_fusion(
    module: nn.Module, feat: jax.Array, c2: jax.Array, c3: jax.Array, train: bool
) -> jax.Array:
    """EncHead / ATTENHead ``lateral``: connect.0 (c2 -> 512), connect.1 (c3 -> 512), then
    fusion(concat(feat, c2', c3')) -> 512. Call inside the head's compact method."""
    kw = _kw(module)
    connect = _ConvNormReLUList(512, 1, norm_layer=module.norm_layer, name="connect", **kw)
    c2 = connect(0, c2.astype(feat.dtype), train=train)
    c3 = connect(1, c3.astype(feat.dtype), train=train)
    if c2.shape[1:3] != feat.shape[1:3] or c3.shape[1:3] != feat.shape[1:3]:
        raise ValueError(
            f"{type(module).__name__}: lateral=True concatenates c2, c3 and c4 and needs them at one resolution "
            f"(a dilated backbone); got c2 {tuple(c2.shape)}, c3 {tuple(c3.shape)}, c4 head features {tuple(feat.shape)}"
        )
    fusion = ConvNormReLU(512, 3, padding=1, norm_layer=module.norm_layer, name="fusion", **kw)
    return fusion(jnp.concatenate([feat, c2, c3], axis=-1), train=train)


def _check_features(features: Sequence[jax.Array], need: int, where: str) -> None:
    if len(features) < need:
        raise ValueError(
            f"{where}: expected the backbone features (c1, c2, c3, c4), got {len(features)} arrays"
        )


class EncHead(nn.Module):
    """EncNet head (Zhang et al., CVPR 2018), upstream ``EncHead``.

    ``conv5`` (3x3 in -> 512 + norm + ReLU) on c4; with ``lateral`` (used for Pascal datasets),
    ``connect.0`` (1x1 c2 512 -> 512), ``connect.1`` (1x1 c3 1024 -> 512) and ``fusion`` (3x3 on the
    1536-channel concat); then :class:`EncModule` (512, K=32) and ``conv6`` (Dropout(0.1) + 1x1 ->
    out_channels).

    Call: ``head(c1, c2, c3, c4, train=False)`` (only c4, and c2, c3 with lateral, are used).
    Returns ``(logits,)`` or ``(logits, se)``: logits (N, h, w, out_channels) at c4's resolution,
    se (N, out_channels).
    """

    in_channels: int
    out_channels: int
    se_loss: bool = True
    lateral: bool = True
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, *features: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        where = "EncHead"
        _check_features(features, 3 if self.lateral else 1, where)
        kw = _kw(self)
        c4 = _features(features[-1], self.in_channels, where, self.dtype)
        feat = ConvNormReLU(512, 3, padding=1, norm_layer=self.norm_layer, name="conv5", **kw)(
            c4, train=train
        )
        if self.lateral:
            feat = _lateral_fusion(self, feat, features[1], features[2], train)
        outs = EncModule(
            512,
            self.out_channels,
            ncodes=32,
            se_loss=self.se_loss,
            norm_layer=self.norm_layer,
            name="encmodule",
            **kw,
        )(feat, train=train)
        logits = _Classifier(self.out_channels, 0.1, name="conv6", **kw)(outs[0], train=train)
        return (logits, *outs[1:])


# --- DeepLabV3 ------------------------------------------------------------------------------------


class _ProjectSequential(nn.Module):
    """ASPP ``project``: "0" 1x1 conv (no bias), "1" norm, ReLU, Dropout2d(0.5)."""

    out_channels: int
    norm_layer: NormLayer = BatchNorm
    dropout: float = 0.5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = _kw(self)
        y = Conv2d(self.out_channels, 1, bias=False, name="0", **kw)(x)
        y = jax.nn.relu(self.norm_layer(self.out_channels, name="1", **kw)(y, train=train))
        return _dropout(y, self.dropout, train, channelwise=True)


class ASPP_Module(nn.Module):  # noqa: N801 (upstream name)
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "ASPP_Module"
        check_positive_int(self.in_channels, "in_channels", where)
        if self.in_channels < 8:
            raise ValueError(
                f"{where}: in_channels must be >= 8 (branches have in_channels // 8), got {self.in_channels}"
            )
        rates = tuple(self.atrous_rates)
        if len(rates) != 3 or any(
            isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates
        ):
            raise ValueError(
                f"{where}: atrous_rates must be three positive integers, got {self.atrous_rates!r}"
            )
        x = _features(x, self.in_channels, where, self.dtype)
        kw = _kw(self)
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


class _BlockSequential(nn.Module):
    """DeepLabV3Head ``block`` and FCFPNHead ``conv5``: "0" 3x3 conv -> channels (no bias), "1" norm,
    ReLU, Dropout(0.1), "4" 1x1 conv -> out_channels."""

    channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = _kw(self)
        y = Conv2d(self.channels, 3, padding=1, bias=False, name="0", **kw)(x)
        y = jax.nn.relu(self.norm_layer(self.channels, name="1", **kw)(y, train=train))
        y = _dropout(y, 0.1, train, channelwise=False)
        return Conv2d(self.out_channels, 1, name="4", **kw)(y)


class DeepLabV3Head(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_positive_int(self.out_channels, "out_channels", "DeepLabV3Head")
        kw = _kw(self)
        y = ASPP_Module(
            self.in_channels,
            tuple(self.atrous_rates),
            self.norm_layer,
            self.up_kwargs,
            name="aspp",
            **kw,
        )(x, train=train)
        return _BlockSequential(
            self.in_channels // 8, self.out_channels, self.norm_layer, name="block", **kw
        )(y, train=train)


# --- FCFPN / UperNet ------------------------------------------------------------------------------


class FCFPNHead(nn.Module):
    """Fully convolutional FPN head (upstream ``FCFPNHead``; Lin et al., "Feature Pyramid Networks for
    Object Detection", CVPR 2017).

    ``c4conv`` (3x3 c4 -> fpn_dim); top-down path for i = 2, 1, 0: ``fpn_lateral.i`` (1x1 c_{i+1} ->
    fpn_dim + norm + ReLU) added to the bilinearly upsampled running feature, ``fpn_out.i`` (3x3
    fpn_dim) upsampled to c1's size; ``conv5`` (3x3 4·fpn_dim -> 512 + norm + ReLU, Dropout(0.1),
    1x1 -> out_channels) on concat[c4', c3', c2', c1'].

    Call: ``head(c1, c2, c3, c4, train=False)`` -> ``(logits,)``, logits (N, H1, W1, out_channels)
    at c1's resolution (stride 4).
    """

    out_channels: int
    norm_layer: NormLayer = BatchNorm
    fpn_inchannels: Sequence[int] = (256, 512, 1024, 2048)
    fpn_dim: int = 256
    up_kwargs: Mapping[str, Any] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    _with_ppm = False

    @nn.compact
    def __call__(self, *inputs: jax.Array, train: bool = False) -> tuple[jax.Array]:
        where = type(self).__name__
        check_positive_int(self.out_channels, "out_channels", where)
        check_positive_int(self.fpn_dim, "fpn_dim", where)
        align = check_up_kwargs(self.up_kwargs, where)
        fpn_in = tuple(self.fpn_inchannels)
        if len(inputs) != len(fpn_in):
            raise ValueError(
                f"{where}: expected {len(fpn_in)} feature maps (fpn_inchannels={fpn_in}), got {len(inputs)}"
            )
        inputs = [_features(f, c, where, self.dtype) for f, c in zip(inputs, fpn_in)]
        kw = _kw(self)
        c4 = inputs[-1]
        if self._with_ppm:
            c4 = PyramidPooling(
                fpn_in[-1],
                norm_layer=self.norm_layer,
                up_kwargs=self.up_kwargs,
                name="extramodule",
                **kw,
            )(c4, train=train)
        feat = ConvNormReLU(
            self.fpn_dim, 3, padding=1, norm_layer=self.norm_layer, name="c4conv", **kw
        )(c4, train=train)
        c1_size = tuple(inputs[0].shape[1:3])
        fpn_features = [_upsample(feat, c1_size, align)]
        lateral = _ConvNormReLUList(
            self.fpn_dim, 1, norm_layer=self.norm_layer, name="fpn_lateral", **kw
        )
        fpn_out = _ConvNormReLUList(
            self.fpn_dim, 3, padding=1, norm_layer=self.norm_layer, name="fpn_out", **kw
        )
        for i in reversed(range(len(inputs) - 1)):
            feat_i = lateral(i, inputs[i], train=train)
            feat = _upsample(feat, tuple(feat_i.shape[1:3]), align) + feat_i
            fpn_features.append(_upsample(fpn_out(i, feat, train=train), c1_size, align))
        y = jnp.concatenate(fpn_features, axis=-1)
        conv5 = _BlockSequential(512, self.out_channels, self.norm_layer, name="conv5", **kw)
        return (conv5(y, train=train),)


class UperNetHead(FCFPNHead):
    """UperNet head (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018),
    upstream ``UperNetHead``: :class:`FCFPNHead` with a pyramid pooling module (``extramodule``,
    c4 -> 2·c4 channels) in front of ``c4conv``.

    ``fpn_inchannels`` are the backbone's channels (c4 included, e.g. 2048); upstream's argument
    doubles the last entry in place (mutating its shared default list) — not copied.
    Call and returns as :class:`FCFPNHead`.
    """

    _with_ppm = True


# --- ATTEN (CFNet) --------------------------------------------------------------------------------


class _GlobalAndACF(nn.Module):
    """ATTENHead ``atten_layers = ConcurrentModule([GlobalPooling(C, C), atten])``: children "0", "1";
    output concat(pool(x), acf(x))."""

    channels: int
    nheads: int
    nmixs: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = _kw(self)
        pool = GlobalPooling(
            self.channels, self.channels, self.norm_layer, self.up_kwargs, name="0", **kw
        )(x, train=train)
        acf = _acf(self, name="1")(x, train=train)
        return jnp.concatenate([pool.astype(x.dtype), acf.astype(x.dtype)], axis=-1)


def _acf(module: nn.Module, name: str) -> ACFModule:
    c, h, m = module.channels, module.nheads, module.nmixs
    return ACFModule(
        h, m, c, c // h * m, c // h, norm_layer=module.norm_layer, name=name, **_kw(module)
    )


class ATTENHead(nn.Module):
    """ATTEN head of CFNet (Zhang et al., "Co-occurrent Features in Semantic Segmentation", CVPR 2019),
    upstream ``ATTENHead``.

    ``conv5`` (3x3 in -> in // 4 = C + norm + ReLU) on c4, optional lateral fusion as in
    :class:`EncHead`; with ``with_global``, ``atten_layers`` = concat[:class:`GlobalPooling` (C),
    :class:`jaxenc.nn.ACFModule` (nheads, nmixs, d_k = C // nheads · nmixs, d_v = C // nheads)]
    (2C channels), else the ACF module alone (``atten``); with ``with_enc`` an :class:`EncModule`
    (K=32); ``conv6``: Dropout(0.1) + 1x1 -> out_channels.

    Upstream registers the ACF module twice (``atten`` and ``atten_layers.1``); its state_dict
    repeats those tensors under both names and :func:`jaxenc.port.torch_to_flax` drops the alias.
    ``with_global=False`` (which upstream cannot build: NameError) applies the ACF module alone,
    as the submodule ``atten``; it has no upstream checkpoint to convert.

    Call: ``head(c1, c2, c3, c4, train=False)`` -> ``(logits,)`` or ``(logits, se)`` (se with
    ``with_enc`` and ``se_loss``). c4's H and W must be even (the ACF keys are 2x pooled).
    """

    in_channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None
    nheads: int = 8
    nmixs: int = 1
    with_global: bool = True
    with_enc: bool = True
    se_loss: bool = False
    lateral: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def channels(self) -> int:
        return self.in_channels // 4

    @nn.compact
    def __call__(self, *features: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        where = "ATTENHead"
        for name in ("in_channels", "out_channels", "nheads", "nmixs"):
            check_positive_int(getattr(self, name), name, where)
        _check_features(features, 3 if self.lateral else 1, where)
        kw = _kw(self)
        c4 = _features(features[-1], self.in_channels, where, self.dtype)
        inter = self.channels
        feat = ConvNormReLU(inter, 3, padding=1, norm_layer=self.norm_layer, name="conv5", **kw)(
            c4, train=train
        )
        if self.lateral:
            feat = _lateral_fusion(self, feat, features[1], features[2], train)
        if self.with_global:
            feat = _GlobalAndACF(
                inter,
                self.nheads,
                self.nmixs,
                self.norm_layer,
                self.up_kwargs,
                name="atten_layers",
                **kw,
            )(feat, train=train)
        else:
            feat = _acf(self, name="atten")(feat, train=train)
        outs = (feat,)
        if self.with_enc:
            outs = EncModule(
                feat.shape[-1],
                self.out_channels,
                ncodes=32,
                se_loss=self.se_loss,
                norm_layer=self.norm_layer,
                name="encmodule",
                **kw,
            )(feat, train=train)
        logits = _Classifier(self.out_channels, 0.1, name="conv6", **kw)(outs[0], train=train)
        return (logits, *outs[1:])


# Upstream's ``self.atten`` is the same module as ``self.atten_layers[1]``.
register_torch_aliases(ATTENHead, {"atten": "atten_layers.1"})


# --- DANet ----------------------------------------------------------------------------------------


class DANetHead(nn.Module):
    """Dual attention head (Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019;
    junfu1115/DANet ``DANetHead``).

    Two branches on x: ``conv5a`` (3x3 in -> in // 4 + norm + ReLU) -> ``sa`` (:class:`jaxenc.nn.PAM_Module`)
    -> ``conv51``; ``conv5c`` -> ``sc`` (:class:`jaxenc.nn.CAM_Module`) -> ``conv52``. Classifiers
    (Dropout2d(0.1) + 1x1 -> out_channels): ``conv8`` on their sum, ``conv6`` on the position branch,
    ``conv7`` on the channel branch.

    Shapes: x (N, H, W, in_channels) -> ``(sasc, sa, sc)``, each (N, H, W, out_channels).
    """

    in_channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        where = "DANetHead"
        check_positive_int(self.in_channels, "in_channels", where)
        check_positive_int(self.out_channels, "out_channels", where)
        if self.in_channels < 32:
            raise ValueError(
                f"{where}: in_channels must be >= 32 (PAM needs in_channels // 4 >= 8), got {self.in_channels}"
            )
        x = _features(x, self.in_channels, where, self.dtype)
        kw = _kw(self)
        inter = self.in_channels // 4

        def block(name):
            return ConvNormReLU(inter, 3, padding=1, norm_layer=self.norm_layer, name=name, **kw)

        sa_conv = block("conv51")(
            PAM_Module(inter, name="sa", **kw)(block("conv5a")(x, train=train)), train=train
        )
        sc_conv = block("conv52")(
            CAM_Module(inter, name="sc", **kw)(block("conv5c")(x, train=train)), train=train
        )
        sa_out = _Classifier(self.out_channels, 0.1, channelwise=True, name="conv6", **kw)(
            sa_conv, train=train
        )
        sc_out = _Classifier(self.out_channels, 0.1, channelwise=True, name="conv7", **kw)(
            sc_conv, train=train
        )
        sasc = _Classifier(self.out_channels, 0.1, channelwise=True, name="conv8", **kw)(
            sa_conv + sc_conv, train=train
        )
        return sasc, sa_out, sc_out
