"""PyTorch-Encoding's configurable ResNet family (ResNet, ResNet-S/D, ResNeXt, ResNeSt) in Flax, NHWC.

He et al., CVPR 2016 (ResNet); He et al., "Bag of Tricks", CVPR 2019 (deep stem, avg-down: ResNet-D);
Xie et al., CVPR 2017 (ResNeXt); Zhang et al., arXiv:2004.08955 (ResNeSt: radix, avd); Yu & Koltun,
ICLR 2016 (dilated output stride 8/16). Upstream: ``encoding/models/backbone/resnet.py`` at HEAD (the
``is_first`` version). Blocks live in :mod:`jaxenc.models.resnet_blocks`; submodule names are
upstream's torch attribute names, so :func:`jaxenc.port.torch_to_flax` converts a ``state_dict`` one
to one. Named constructors are registered as models and segmentation backbones; weights come from
the model store (``jaxenc.models.load_pretrained``), never from a constructor.

Semantics: ``radix == 1`` is a plain 3x3 conv + ``bn2``, ``radix > 1`` :class:`jaxenc.nn.SplAtConv2d`
(the ``resnest`` pip package's ``radix=0`` is this ``radix=1``); avd (3x3 average pool, stride) is
active when ``avd and (stride > 1 or is_first)``; output strides 4/8/16/32 for c1..c4, 4/8/8/8 with
``dilated=True`` or ``dilation=4``, 4/8/16/16 with ``dilation=2``; DropBlock (block 3) in layer3 and
layer4 only; every conv kernel ~ He fan-out, ``fc`` torch's Linear default.

Deviations from upstream (docs/DESIGN.md): ``last_gamma=True`` works (upstream's init loop undoes
it); ``dilation`` not in (1, 2, 4) and ``radix < 1`` raise; :class:`BasicBlock` (ResNet-18/34) exists;
``return_features=True`` returns (c1, c2, c3, c4) without creating ``fc``; ``remat="block"``
rematerialises every block and the stem (:func:`jaxenc.models.model_utils.remat_apply`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models.model_utils import (
    REMAT_MODES,
    Stage,
    check_block_counts,
    check_image_batch,
    check_norm_layer,
    check_remat,
    dtype_kwargs,
    field_values,
    he_conv,
    he_fan_out_normal,
    pooled_classifier,
    remat_apply,
    remat_call,
)
from jaxenc.models.registry import build_named, register_backbone
from jaxenc.models.resnet_blocks import BasicBlock, Bottleneck, DeepStem, he_reinit_convs
from jaxenc.nn import BatchNorm, RFConv2d, max_pool2d
from jaxenc.validation import check_int, check_probability

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
# ResNet fields handed on unchanged to the deep stem, to every block, and to bottlenecks only.
_STEM_FIELDS = ("stem_width", "rectified_conv", "rectify_avg", "norm_layer", "dtype", "param_dtype")
_BLOCK_FIELDS = ("avg_down", "rectified_conv", "rectify_avg", "norm_layer", "last_gamma")
_BOTTLENECK_FIELDS = ("radix", "bottleneck_width", "avd", "avd_first")


def _validate_resnet(self: ResNet) -> None:
    """Check :class:`ResNet`'s fields (a function: Flax wraps module methods, even during construction)."""
    where = "ResNet"
    if self.block not in _BLOCKS:
        raise ValueError(f"{where}: block must be one of {_BLOCKS}, got {self.block!r}")
    check_block_counts(self.layers, 4, "layers", "block counts (layer1..layer4)", where)
    check_block_counts(self.stage_planes, 4, "stage_planes", "widths (layer1..layer4)", where)
    for name in ("num_classes", "radix", "groups", "bottleneck_width", "stem_width"):
        check_int(getattr(self, name), name, where, minimum=1)
    if isinstance(self.dilation, bool) or self.dilation not in (1, 2, 4):
        raise ValueError(
            f"{where}: dilation must be 1 (output stride 32), 2 (16) or 4 (8, as dilated=True), got {self.dilation!r}"
        )
    if check_probability(self.final_drop, "final_drop", where) == 1.0:
        raise ValueError(
            f"{where}: final_drop must be < 1 (it would drop every feature), got {self.final_drop!r}"
        )
    check_probability(self.dropblock_prob, "dropblock_prob", where)
    check_norm_layer(self.norm_layer, where)
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
    kw = dtype_kwargs(module)
    stem_out = 2 * module.stem_width if module.deep_stem else 64
    if module.deep_stem:
        x = DeepStem(**field_values(module, _STEM_FIELDS), name="conv1")(x, train=train)
    elif module.rectified_conv:
        rf = dict(average_mode=module.rectify_avg, name="conv1", **kw)
        x = RFConv2d(3, 64, 7, stride=2, padding=3, bias=False, **rf)(x)
        he_reinit_convs(module, "conv1")
    else:
        x = he_conv(64, 7, stride=2, padding=3, name="conv1", **kw)(x)
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
    ) -> tuple[Stage, int]:
        """Upstream's ``_make_layer``: the first block strides (and projects), the rest keep the shape."""
        expansion = _EXPANSION[self.block]
        common = dict(planes=planes, dropblock_prob=dropblock_prob, **dtype_kwargs(self))
        common.update(field_values(self, _BLOCK_FIELDS))
        first = dict(stride=stride, downsample=stride != 1 or inplanes != planes * expansion)
        first["dilation"] = 2 if dilation == 4 else 1
        if self.block == "bottleneck":
            cls = Bottleneck
            common.update(field_values(self, _BOTTLENECK_FIELDS), cardinality=self.groups)
            first["is_first"] = is_first
        else:
            cls = BasicBlock
        configs = [tuple({**common, **first}.items())]
        configs += [tuple({**common, "dilation": dilation}.items()) for _ in range(1, n)]
        return Stage(cls, tuple(configs), remat=self.remat, name=name), planes * expansion

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, return_features: bool = False):
        x = check_image_batch(x, "ResNet", self.dtype)
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

        return pooled_classifier(self, x, self.num_classes, self.final_drop, train)


# --------------------------------------------------------------------------------------------------
# Named constructors: each is registered as a model and a segmentation backbone.


def _backbone(
    name: str, **presets: Any
) -> Callable[[Callable[..., ResNet]], Callable[..., ResNet]]:
    """Turn the decorated stub (signature and docstring only) into the registered constructor
    ``name``: a :class:`ResNet` from ``presets`` and the caller's field overrides."""

    def decorate(stub: Callable[..., ResNet]) -> Callable[..., ResNet]:
        @functools.wraps(stub)
        def build(pretrained: bool = False, **kwargs: Any) -> ResNet:
            return build_named(
                name, ResNet, pretrained, presets, kwargs, tuple_fields=("layers", "stage_planes")
            )

        return register_backbone(name)(build)

    return decorate


_RESNEST = dict(radix=2, groups=1, bottleneck_width=64, deep_stem=True, avg_down=True, avd=True)
_RESNEST50 = dict(_RESNEST, layers=(3, 4, 6, 3), stem_width=32)
_RESNEST101 = dict(_RESNEST, layers=(3, 4, 23, 3), stem_width=64)


@_backbone("resnet18", block="basic", layers=(2, 2, 2, 2))
def resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision's basic-block design, [2, 2, 2, 2]; not in upstream); 11,689,512 params."""


@_backbone("resnet34", block="basic", layers=(3, 4, 6, 3))
def resnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34 (basic blocks, [3, 4, 6, 3]; not in upstream); 21,797,672 params."""


@_backbone("resnet50", layers=(3, 4, 6, 3))
def resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 ([3, 4, 6, 3] bottlenecks, 7x7 stem), torchvision layout; 25,557,032 params."""


@_backbone("resnet101", layers=(3, 4, 23, 3))
def resnet101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-101 ([3, 4, 23, 3] bottlenecks, 7x7 stem)."""


@_backbone("resnet152", layers=(3, 8, 36, 3))
def resnet152(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-152 ([3, 8, 36, 3] bottlenecks, 7x7 stem)."""


@_backbone("resnet50s", layers=(3, 4, 6, 3), deep_stem=True)
def resnet50s(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNetS-50, PSPNet's ResNet: deep stem (3x3 convs 3->64->64->128), [3, 4, 6, 3]."""


@_backbone("resnet101s", layers=(3, 4, 23, 3), deep_stem=True)
def resnet101s(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNetS-101 (deep stem of width 64, [3, 4, 23, 3])."""


@_backbone("resnet152s", layers=(3, 8, 36, 3), deep_stem=True)
def resnet152s(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNetS-152 (deep stem of width 64, [3, 8, 36, 3])."""


@_backbone("resnet50d", layers=(3, 4, 6, 3), deep_stem=True, stem_width=32, avg_down=True)
def resnet50d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50-D (He et al., Bag of Tricks, CVPR 2019): deep stem of width 32, avg-down shortcut."""


@_backbone("resnext50_32x4d", layers=(3, 4, 6, 3), groups=32, bottleneck_width=4)
def resnext50_32x4d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al., CVPR 2017): groups 32, bottleneck width 4, [3, 4, 6, 3]."""


@_backbone("resnext101_32x8d", layers=(3, 4, 23, 3), groups=32, bottleneck_width=8)
def resnext101_32x8d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d: groups 32, bottleneck width 8, [3, 4, 23, 3]."""


@_backbone("resnest50", **_RESNEST50, avd_first=False)
def resnest50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-50 (Zhang et al., arXiv:2004.08955): radix 2, deep stem 32, avg-down, avd after the conv."""


@_backbone("resnest101", **_RESNEST101, avd_first=False)
def resnest101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-101: radix 2, deep stem 64, avg-down, avd, [3, 4, 23, 3]."""


@_backbone("resnest200", **_RESNEST, layers=(3, 24, 36, 3), stem_width=64, avd_first=False)
def resnest200(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-200: radix 2, deep stem 64, avg-down, avd, [3, 24, 36, 3]."""


@_backbone("resnest269", **_RESNEST, layers=(3, 30, 48, 8), stem_width=64, avd_first=False)
def resnest269(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-269: radix 2, deep stem 64, avg-down, avd, [3, 30, 48, 8]."""


@_backbone("resnest50_fast", **_RESNEST50, avd_first=True)
def resnest50_fast(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-50-fast: resnest50 with the avd pool before the 3x3 conv (avd_first=True)."""


@_backbone("resnest101_fast", **_RESNEST101, avd_first=True)
def resnest101_fast(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeSt-101-fast: resnest101 with avd_first=True."""
