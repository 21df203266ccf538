"""Segmentation heads of PyTorch-Encoding's ``encoding/models/sseg`` (and DANet's), NHWC, in Flax.

FCNHead, PSPHead, FCFPNHead / UperNetHead and DANetHead here; ASPP / DeepLabV3Head in
:mod:`jaxenc.models.aspp`; EncModule / EncHead / ATTENHead in :mod:`jaxenc.models.enc_heads`; the
shared pieces (GlobalPooling ...) in :mod:`jaxenc.models.head_blocks`. All are re-exported here.
Every head maps NHWC features to logits (class axis last) at the feature resolution. Every submodule
is named as the upstream attribute and every ``nn.Sequential`` child by its index, so an upstream
``state_dict`` converts one to one with :func:`jaxenc.port.torch_to_flax`.

Conventions: ``__call__(..., train=False)``; ``norm_layer(num_features, *, name, dtype, param_dtype)``
(default :class:`jaxenc.nn.BatchNorm`); ``up_kwargs`` is upstream's interpolation dict
(``{'mode': 'bilinear', 'align_corners': True}`` when None); ``dtype`` the compute dtype.
Dropout follows upstream HEAD. Deviation: UperNetHead does not mutate a shared default
``fpn_inchannels`` list (upstream's second UperNet breaks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models.aspp import ASPP, ASPP_Module, AsppPooling, DeepLabV3Head
from jaxenc.models.enc_heads import ATTENHead, EncHead, EncModule
from jaxenc.models.head_blocks import (
    BlockSequential,
    Classifier,
    ConvNormReLUDropConv,
    ConvNormReLUList,
    GlobalPooling,
    NormLayer,
    feature_input,
    upsample,
)
from jaxenc.nn import BatchNorm, CAM_Module, PAM_Module, PyramidPooling
from jaxenc.nn.customize import ConvNormReLU, check_up_kwargs
from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.module_utils import check_width
from jaxenc.validation import check_positive_int

Dtype = Any

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


def _conv5(head: nn.Module, x: jax.Array, where: str, train: bool, **options: bool) -> jax.Array:
    """FCNHead / PSPHead ``conv5`` (:class:`ConvNormReLUDropConv`, hidden width in // 4, Dropout(0.1))
    on the checked features; ``options`` its ``with_global`` / ``pyramid``."""
    x = feature_input(x, head.in_channels, where, head.dtype)
    conv5 = ConvNormReLUDropConv(
        head.in_channels // 4,
        head.out_channels,
        head.norm_layer,
        dropout=0.1,
        up_kwargs=head.up_kwargs,
        name="conv5",
        **options,
        **dtype_kwargs(head),
    )
    return conv5(x, train=train)


class FCNHead(DtypeFields):
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "FCNHead"
        check_width(
            self.in_channels, "in_channels", 4, "the hidden width is in_channels // 4", where
        )
        check_positive_int(self.out_channels, "out_channels", where)
        check_up_kwargs(self.up_kwargs, where)
        return _conv5(self, x, where, train, with_global=self.with_global)


# --- PSP ------------------------------------------------------------------------------------------


class PSPHead(DtypeFields):
    """PSPNet head (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017), upstream ``PSPHead``.

    ``conv5``: :class:`jaxenc.nn.PyramidPooling` (``conv5.0``, in -> 2·in channels), 3x3 conv
    2·in -> in // 4 (no bias) + norm + ReLU, Dropout(0.1), 1x1 conv -> out_channels (``conv5.5``).

    Shapes: x (N, H, W, in_channels) -> (N, H, W, out_channels). in_channels divisible by 4.
    """

    in_channels: int
    out_channels: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None

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
        return _conv5(self, x, where, train, pyramid=True)


# --- FCFPN / UperNet ------------------------------------------------------------------------------


class FCFPNHead(DtypeFields):
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
        inputs = [feature_input(f, c, where, self.dtype) for f, c in zip(inputs, fpn_in)]
        kw = dtype_kwargs(self)
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
        fpn_features = [upsample(feat, c1_size, align)]
        lateral = ConvNormReLUList(
            self.fpn_dim, 1, norm_layer=self.norm_layer, name="fpn_lateral", **kw
        )
        fpn_out = ConvNormReLUList(
            self.fpn_dim, 3, padding=1, norm_layer=self.norm_layer, name="fpn_out", **kw
        )
        for i in reversed(range(len(inputs) - 1)):
            feat_i = lateral(i, inputs[i], train=train)
            feat = upsample(feat, tuple(feat_i.shape[1:3]), align) + feat_i
            fpn_features.append(upsample(fpn_out(i, feat, train=train), c1_size, align))
        y = jnp.concatenate(fpn_features, axis=-1)
        conv5 = BlockSequential(512, self.out_channels, self.norm_layer, name="conv5", **kw)
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


# --- DANet ----------------------------------------------------------------------------------------


class DANetHead(DtypeFields):
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        where = "DANetHead"
        check_width(self.in_channels, "in_channels", 32, "PAM needs in_channels // 4 >= 8", where)
        check_positive_int(self.out_channels, "out_channels", where)
        x = feature_input(x, self.in_channels, where, self.dtype)
        kw = dtype_kwargs(self)
        inter = self.in_channels // 4

        def block(name):
            return ConvNormReLU(inter, 3, padding=1, norm_layer=self.norm_layer, name=name, **kw)

        sa_conv = block("conv51")(
            PAM_Module(inter, name="sa", **kw)(block("conv5a")(x, train=train)), train=train
        )
        sc_conv = block("conv52")(
            CAM_Module(inter, name="sc", **kw)(block("conv5c")(x, train=train)), train=train
        )
        sa_out = Classifier(self.out_channels, 0.1, channelwise=True, name="conv6", **kw)(
            sa_conv, train=train
        )
        sc_out = Classifier(self.out_channels, 0.1, channelwise=True, name="conv7", **kw)(
            sc_conv, train=train
        )
        sasc = Classifier(self.out_channels, 0.1, channelwise=True, name="conv8", **kw)(
            sa_conv + sc_conv, train=train
        )
        return sasc, sa_out, sc_out
