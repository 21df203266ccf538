"""EncNet's context encoding heads and CFNet's ATTEN head, upstream ``encoding/models/sseg/encnet.py``
and ``atten.py``, NHWC.

Zhang et al., "Context Encoding for Semantic Segmentation", CVPR 2018; Zhang et al., "Co-occurrent
Features in Semantic Segmentation", CVPR 2019. Names follow upstream. Deviations: EncModule's norm over
the K codewords runs on the transposed (B, D, K) tensor (the statistics of torch's ``BatchNorm1d(K)``,
so any ``norm_layer`` works); ``ATTENHead(with_global=False)`` works (upstream: NameError).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models.head_blocks import (
    Classifier,
    GlobalPooling,
    NormLayer,
    check_feature_count,
    conv_norm_relu,
    feature_input,
    lateral_fusion,
)
from jaxenc.nn import ACFModule, BatchNorm, Encoding
from jaxenc.nn.customize import ConvNormReLU
from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.module_utils import torch_linear
from jaxenc.port import register_torch_aliases
from jaxenc.validation import check_positive_int

Dtype = Any

__all__ = ["ATTENHead", "EncHead", "EncModule"]


class _EncodingSequential(DtypeFields):
    """EncModule's ``encoding`` Sequential: "0" 1x1 conv (no bias), "1" norm, ReLU, "3" Encoding(D, K),
    "4" norm over the K codewords, ReLU, mean over K. Shapes: (B, H, W, D) -> (B, D)."""

    channels: int
    ncodes: int
    norm_layer: NormLayer = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        y = conv_norm_relu(self, x, self.channels, 1, ("0", "1"), train)
        e = Encoding(self.channels, self.ncodes, name="3", **kw)(y)  # (B, K, D)
        # torch BatchNorm1d(K) on (B, K, D): K is the feature axis; statistics over B and D.
        e = self.norm_layer(self.ncodes, name="4", **kw)(
            jnp.swapaxes(e, 1, 2), train=train
        )  # (B, D, K)
        e = jax.nn.relu(e)
        return jnp.mean(e, axis=-1)  # Mean(dim=1) over the codewords -> (B, D)


class _FcSigmoid(DtypeFields):
    """EncModule's ``fc = nn.Sequential(nn.Linear(C, C), nn.Sigmoid())``: child "0"."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(torch_linear(self.features, x.shape[-1], True, "0", self)(x))


class EncModule(DtypeFields):
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        where = "EncModule"
        for name in ("in_channels", "nclass", "ncodes"):
            check_positive_int(getattr(self, name), name, where)
        x = feature_input(x, self.in_channels, where, self.dtype)
        en = _EncodingSequential(
            self.in_channels, self.ncodes, self.norm_layer, name="encoding", **dtype_kwargs(self)
        )(x, train=train)
        gamma = _FcSigmoid(self.in_channels, name="fc", **dtype_kwargs(self))(en)
        y = jax.nn.relu(x + x * gamma[:, None, None, :].astype(x.dtype))
        if not self.se_loss:
            return (y,)
        return (y, torch_linear(self.nclass, self.in_channels, True, "selayer", self)(en))


def _conv5_features(
    head: nn.Module, features: tuple[jax.Array, ...], width: int, where: str, train: bool
) -> jax.Array:
    """EncHead / ATTENHead trunk: c4 -> ``conv5`` (3x3 -> ``width`` + norm + ReLU), then with
    ``head.lateral`` the fusion of c2 and c3. Call inside the head's compact method."""
    check_feature_count(features, 3 if head.lateral else 1, where)
    c4 = feature_input(features[-1], head.in_channels, where, head.dtype)
    conv5 = ConvNormReLU(
        width, 3, padding=1, norm_layer=head.norm_layer, name="conv5", **dtype_kwargs(head)
    )
    feat = conv5(c4, train=train)
    if head.lateral:
        feat = lateral_fusion(head, feat, features[1], features[2], train)
    return feat


def _encode_and_classify(
    head: nn.Module, feat: jax.Array, train: bool, with_enc: bool = True
) -> tuple[jax.Array, ...]:
    """``encmodule`` (:class:`EncModule`, K=32; skipped without ``with_enc``) and ``conv6``
    (Dropout(0.1) + 1x1) on its first output: ``(logits,)`` or ``(logits, se)``."""
    kw = dtype_kwargs(head)
    outs = (feat,)
    if with_enc:
        encode = EncModule(
            feat.shape[-1],
            head.out_channels,
            ncodes=32,
            se_loss=head.se_loss,
            norm_layer=head.norm_layer,
            name="encmodule",
            **kw,
        )
        outs = encode(feat, train=train)
    logits = Classifier(head.out_channels, 0.1, name="conv6", **kw)(outs[0], train=train)
    return (logits, *outs[1:])


class EncHead(DtypeFields):
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

    @nn.compact
    def __call__(self, *features: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        feat = _conv5_features(self, features, 512, "EncHead", train)
        return _encode_and_classify(self, feat, train)


# --- ATTEN (CFNet) --------------------------------------------------------------------------------


class _GlobalAndACF(DtypeFields):
    """ATTENHead ``atten_layers = ConcurrentModule([GlobalPooling(C, C), atten])``: children "0", "1";
    output concat(pool(x), acf(x))."""

    channels: int
    nheads: int
    nmixs: int
    norm_layer: NormLayer = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        pool = GlobalPooling(
            self.channels, self.channels, self.norm_layer, self.up_kwargs, name="0", **kw
        )(x, train=train)
        acf = _acf(self, name="1")(x, train=train)
        return jnp.concatenate([pool.astype(x.dtype), acf.astype(x.dtype)], axis=-1)


def _acf(module: nn.Module, name: str) -> ACFModule:
    c, h, m = module.channels, module.nheads, module.nmixs
    return ACFModule(
        h, m, c, c // h * m, c // h, norm_layer=module.norm_layer, name=name, **dtype_kwargs(module)
    )


class ATTENHead(DtypeFields):
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

    @property
    def channels(self) -> int:
        return self.in_channels // 4

    @nn.compact
    def __call__(self, *features: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        where = "ATTENHead"
        for name in ("in_channels", "out_channels", "nheads", "nmixs"):
            check_positive_int(getattr(self, name), name, where)
        kw = dtype_kwargs(self)
        inter = self.channels
        feat = _conv5_features(self, features, inter, where, train)
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
        return _encode_and_classify(self, feat, train, with_enc=self.with_enc)


# Upstream's ``self.atten`` is the same module as ``self.atten_layers[1]``.
register_torch_aliases(ATTENHead, {"atten": "atten_layers.1"})
