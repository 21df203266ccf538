"""PyTorch-Encoding's semantic segmentation models (``encoding/models/sseg``) in Flax, NHWC.

:class:`BaseNet` holds the backbone (``pretrained``: a dilated registered backbone returning c1..c4),
a ``head`` and, with ``aux``, an ``auxlayer`` (:class:`FCNHead` on c3). Heads take their input widths
from the backbone, so the basic-block ResNet-18/34 build small models too. ``model(x, train=False)``:
x (B, H, W, 3) -> a tuple of logits (B, H, W, nclass) (+ se (B, nclass) for the SE-loss models),
upsampled bilinearly (align_corners=True); ``evaluate(x)`` returns the first output. Submodules are
named as upstream (``pretrained.layer1.0.conv1``, ``head.conv5.0``, ``auxlayer.conv5.4``), so an
upstream checkpoint converts one to one with :func:`jaxenc.port.torch_to_flax`.

Registered names: upstream's model-zoo names with their presets, and one generic
``<model>_<backbone>`` name per model class (Pascal VOC's 21 classes unless ``nclass`` or
``dataset`` is given). Adding a model: a :class:`BaseNet` subclass decorated with
:func:`_segmentation_model`.

Deviations from upstream: no implicit downloads (``pretrained=True`` raises; upstream issue #395);
encnet_resnet101s_coco really has its lateral fusion; UperNet and FCFPN honour ``base_size``,
``crop_size``, ``mean``, ``std`` and the backbone options, and reject ``aux=True``; the default norm
is :class:`jaxenc.nn.BatchNorm` everywhere; DANet accepts ``aux=True``; ATTEN(with_global=False)
works; unknown options raise a ValueError; ``remat="block"`` also rematerialises head and aux head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models import registry
from jaxenc.models.heads import (
    ATTENHead,
    DANetHead,
    DeepLabV3Head,
    EncHead,
    FCFPNHead,
    FCNHead,
    PSPHead,
    UperNetHead,
)
from jaxenc.models.model_utils import check_image_batch, check_remat, dataset_nclass, remat_call
from jaxenc.models.registry import register_model
from jaxenc.nn.customize import check_up_kwargs
from jaxenc.nn.fields import dtype_kwargs
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.resample import interpolate_bilinear
from jaxenc.validation import check_positive_int

Dtype = Any
NormLayer = Callable[..., nn.Module]

__all__ = [
    "ATTEN",
    "BaseNet",
    "DANet",
    "DeepLabV3",
    "EncNet",
    "FCFPN",
    "FCN",
    "PSP",
    "UperNet",
    "SEGMENTATION_DATASETS",
    "get_atten",
    "get_backbone",
    "get_danet",
    "get_deeplab",
    "get_encnet",
    "get_fcfpn",
    "get_fcn",
    "get_psp",
    "get_segmentation_model",
    "get_upernet",
]

#: Number of classes of upstream's segmentation datasets (``encoding.datasets``), by dataset name.
# fmt: off
SEGMENTATION_DATASETS: dict[str, int] = {
    "pascal_voc": 21,
    "pascal_aug": 21,
    "pcontext": 59,
    "ade20k": 150,
    "citys": 19,
    "cityscapes": 19,
    "coco": 21,
}
# fmt: on


def get_backbone(name: str, **kwargs: Any):
    """The named backbone (upstream ``sseg.base.get_backbone``), built WITHOUT weights: any constructor
    registered with :func:`jaxenc.models.registry.register_backbone` (the ResNets, ResNet-18/34 included:
    the heads take their input widths from the backbone).

    ``kwargs`` are :class:`jaxenc.models.resnet.ResNet` fields (``dilated``, ``norm_layer``, ``dtype``,
    ``dropblock_prob`` ...). Upstream's ``pretrained=True`` download is not done (issue #395).
    """
    return registry.get_backbone(name, **kwargs)


_MODELS: dict[str, type[BaseNet]] = {}  # get_segmentation_model's names
_CONSTRUCTORS: dict[str, Callable[..., BaseNet]] = {}  # upstream's get_<model> functions
# jaxenc's generic names: one per model class, default dataset Pascal VOC (21 classes).
_GENERIC_NAMES: dict[str, tuple[Callable[..., BaseNet], dict[str, Any]]] = {}


def _segmentation_model(key: str, generic_backbone: str) -> Callable[[type], type]:
    """Class decorator: the model becomes ``get_segmentation_model(key, ...)``, gets its upstream-style
    constructor ``get_<key>`` and the registered generic name ``<key>_<generic_backbone>``."""

    def decorate(cls: type) -> type:
        def build(
            dataset: str = "pascal_voc",
            backbone: str = "resnet50s",
            nclass: int | None = None,
            pretrained: bool = False,
            **kwargs: Any,
        ) -> BaseNet:
            return get_segmentation_model(
                key,
                dataset=dataset,
                backbone=backbone,
                nclass=nclass,
                pretrained=pretrained,
                **kwargs,
            )

        build.__name__ = build.__qualname__ = f"get_{key}"
        build.__doc__ = (
            f"Upstream ``get_{key}(dataset, backbone, ...)``: a :class:`{cls.__name__}` (no weights; "
            f"see :func:`get_segmentation_model`)."
        )
        _MODELS[key] = cls
        _CONSTRUCTORS[key] = build
        name = f"{key}_{generic_backbone}"
        _GENERIC_NAMES[name] = (build, dict(backbone=generic_backbone))
        register_model(name, backbone=generic_backbone)(build)
        return cls

    return decorate


class BaseNet(nn.Module):
    """Segmentation base (upstream ``BaseNet``): backbone ``pretrained`` + ``head`` (+ ``auxlayer``).

    Fields: ``nclass``; ``backbone`` (a name from :func:`get_backbone`); ``aux`` (FCNHead(1024) on c3);
    ``se_loss`` (EncNet/ATTEN semantic-encoding output); ``dilated`` (output stride 8 backbone);
    ``norm_layer`` (``norm_layer(num_features, *, name, dtype, param_dtype)``, used in the backbone and
    the heads); ``base_size``, ``crop_size``, ``mean``, ``std`` (evaluation metadata, as upstream);
    ``up_kwargs`` (``{'mode': 'bilinear', 'align_corners': True}`` when None); ``backbone_kwargs``
    (extra ResNet fields, e.g. ``{'dropblock_prob': 0.1}``); ``dtype`` (compute dtype), ``param_dtype``;
    ``remat`` ("none" | "block": backbone blocks, head and aux head rematerialised, recomputed in the
    backward pass to save activation memory; same variables and results).

    ``__call__(x, train=False)``: x (B, H, W, 3) -> tuple of outputs (see the module docstring).
    """

    nclass: int
    backbone: str = "resnet50s"
    aux: bool = True
    se_loss: bool = False
    dilated: bool = True
    norm_layer: NormLayer = BatchNorm
    base_size: int = 520
    crop_size: int = 480
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    up_kwargs: Mapping[str, Any] | None = None
    backbone_kwargs: Mapping[str, Any] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    # Number of leading head outputs that are spatial logits (upsampled to the input size).
    _n_spatial = 1

    def _validate(self) -> None:
        where = type(self).__name__
        check_positive_int(self.nclass, "nclass", where)
        check_up_kwargs(self.up_kwargs, where)
        check_remat(self.remat, where)
        for name in ("base_size", "crop_size"):
            check_positive_int(getattr(self, name), name, where)

    def make_head(self) -> nn.Module:
        raise NotImplementedError

    def head_forward(self, features: tuple[jax.Array, ...], train: bool) -> tuple[jax.Array, ...]:
        """The head's outputs (a tuple) from the backbone features (c1, c2, c3, c4)."""
        return (self.call_head(features[-1], train=train),)

    def call_head(self, *inputs: jax.Array, train: bool) -> Any:
        """``self.head(*inputs, train=train)``, rematerialised as a whole with ``remat="block"``."""
        return remat_call(self.head, self.remat, *inputs, train=train)

    def setup(self) -> None:
        self._validate()
        options = dict(self.backbone_kwargs or {})
        clash = sorted(set(options) & {"dilated", "norm_layer", "dtype", "param_dtype", "remat"})
        if clash:
            raise ValueError(
                f"{type(self).__name__}: backbone_kwargs must not set {clash}; use the model's own fields"
            )
        try:
            self.pretrained = get_backbone(
                self.backbone,
                dilated=self.dilated,
                norm_layer=self.norm_layer,
                remat=self.remat,
                **dtype_kwargs(self),
                **options,
            )
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        self.head = self.make_head()
        if self.aux:
            self.auxlayer = FCNHead(
                self.widths[2], self.nclass, self.norm_layer, **dtype_kwargs(self)
            )

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """Channels of the backbone features c1..c4: (256, 512, 1024, 2048) for bottleneck ResNets,
        (64, 128, 256, 512) for basic-block ones (``stage_planes`` times the block's expansion). Valid once ``setup`` built the backbone."""
        expansion = 4 if self.pretrained.block == "bottleneck" else 1
        return tuple(expansion * planes for planes in self.pretrained.stage_planes)

    def base_forward(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        """Backbone features (c1, c2, c3, c4): the layer1..layer4 outputs."""
        return self.pretrained(x, train=train, return_features=True)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        x = check_image_batch(x, type(self).__name__)
        size = tuple(x.shape[1:3])
        align = check_up_kwargs(self.up_kwargs, type(self).__name__)
        features = self.base_forward(x, train=train)
        outputs = list(self.head_forward(features, train))
        for i in range(self._n_spatial):
            outputs[i] = interpolate_bilinear(outputs[i], size, align_corners=align)
        if self.aux:
            aux = remat_call(self.auxlayer, self.remat, features[2], train=train)
            outputs.append(interpolate_bilinear(aux, size, align_corners=align))
        return tuple(outputs)

    def evaluate(self, x: jax.Array) -> jax.Array:
        """Inference logits (B, H, W, nclass): the first output (upstream ``BaseNet.evaluate`` without target)."""
        return self(x, train=False)[0]


@_segmentation_model("fcn", generic_backbone="resnest50")
class FCN(BaseNet):
    """FCN (Long et al., "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015) on a
    dilated ResNet: :class:`FCNHead` (2048) on c4, optional image-pool branch (``with_global``)."""

    with_global: bool = False

    def make_head(self) -> nn.Module:
        return FCNHead(
            self.widths[3],
            self.nclass,
            self.norm_layer,
            self.up_kwargs,
            self.with_global,
            **dtype_kwargs(self),
        )


@_segmentation_model("psp", generic_backbone="resnet50s")
class PSP(BaseNet):
    """PSPNet (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017): :class:`PSPHead` on c4."""

    def make_head(self) -> nn.Module:
        return PSPHead(
            self.widths[3], self.nclass, self.norm_layer, self.up_kwargs, **dtype_kwargs(self)
        )


@_segmentation_model("encnet", generic_backbone="resnet50s")
class EncNet(BaseNet):
    """EncNet (Zhang et al., "Context Encoding for Semantic Segmentation", CVPR 2018): :class:`EncHead`
    (context encoding with K=32 codewords, channel excitation, SE-loss output; ``lateral`` c2/c3 fusion).
    Outputs (main, [se], [aux])."""

    se_loss: bool = True
    lateral: bool = False

    def make_head(self) -> nn.Module:
        return EncHead(
            self.widths[3],
            self.nclass,
            se_loss=self.se_loss,
            lateral=self.lateral,
            norm_layer=self.norm_layer,
            up_kwargs=self.up_kwargs,
            **dtype_kwargs(self),
        )

    def head_forward(self, features, train):
        return self.call_head(*features, train=train)


@_segmentation_model("deeplab", generic_backbone="resnest50")
class DeepLabV3(BaseNet):
    """DeepLabV3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
    arXiv:1706.05587): :class:`DeepLabV3Head` (ASPP with rates ``atrous_rates``) on c4."""

    atrous_rates: Sequence[int] = (12, 24, 36)

    def make_head(self) -> nn.Module:
        return DeepLabV3Head(
            self.widths[3],
            self.nclass,
            self.norm_layer,
            self.up_kwargs,
            tuple(self.atrous_rates),
            **dtype_kwargs(self),
        )


class _FPNNet(BaseNet):
    aux: bool = False
    dilated: bool = False

    def _validate(self) -> None:
        super()._validate()
        if self.aux:
            raise ValueError(
                f"{type(self).__name__}: aux=True is not supported (no auxiliary head); use aux=False"
            )

    def head_forward(self, features, train):
        return self.call_head(*features, train=train)


@_segmentation_model("upernet", generic_backbone="resnet50s")
class UperNet(_FPNNet):
    """UperNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018):
    :class:`UperNetHead` (pyramid pooling on c4 + FPN over c1..c4), non-dilated backbone (stride 32),
    logits at stride 4 upsampled to the input. No aux head."""

    def make_head(self) -> nn.Module:
        return UperNetHead(
            self.nclass, self.norm_layer, self.widths, 256, self.up_kwargs, **dtype_kwargs(self)
        )


@_segmentation_model("fcfpn", generic_backbone="resnet50s")
class FCFPN(_FPNNet):
    """FCN with a feature pyramid (upstream ``FCFPN``): :class:`FCFPNHead` over c1..c4 of a
    non-dilated backbone. No aux head."""

    def make_head(self) -> nn.Module:
        return FCFPNHead(
            self.nclass, self.norm_layer, self.widths, 256, self.up_kwargs, **dtype_kwargs(self)
        )


@_segmentation_model("atten", generic_backbone="resnest50")
class ATTEN(BaseNet):
    """CFNet's ATTEN model (Zhang et al., "Co-occurrent Features in Semantic Segmentation", CVPR 2019):
    :class:`ATTENHead` (``nheads``-head ACF attention, global pooling, EncModule) on c4. Input H and W
    must be multiples of 16 (the ACF pools the stride-8 features by 2). Outputs (main, [se], [aux])."""

    nheads: int = 8
    nmixs: int = 1
    with_global: bool = True
    with_enc: bool = True
    with_lateral: bool = False

    def make_head(self) -> nn.Module:
        return ATTENHead(
            self.widths[3],
            self.nclass,
            self.norm_layer,
            self.up_kwargs,
            nheads=self.nheads,
            nmixs=self.nmixs,
            with_global=self.with_global,
            with_enc=self.with_enc,
            se_loss=self.se_loss,
            lateral=self.with_lateral,
            **dtype_kwargs(self),
        )

    def head_forward(self, features, train):
        return self.call_head(*features, train=train)


@_segmentation_model("danet", generic_backbone="resnet50s")
class DANet(BaseNet):
    """DANet (Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019; junfu1115/DANet):
    :class:`DANetHead` on c4. Outputs (fused, position-branch, channel-branch logits, [aux]), all
    upsampled to the input size."""

    aux: bool = False
    _n_spatial = 3

    def make_head(self) -> nn.Module:
        return DANetHead(self.widths[3], self.nclass, self.norm_layer, **dtype_kwargs(self))

    def head_forward(self, features, train):
        return self.call_head(features[-1], train=train)


get_fcn = _CONSTRUCTORS["fcn"]
get_psp = _CONSTRUCTORS["psp"]
get_encnet = _CONSTRUCTORS["encnet"]
get_deeplab = _CONSTRUCTORS["deeplab"]
get_upernet = _CONSTRUCTORS["upernet"]
get_fcfpn = _CONSTRUCTORS["fcfpn"]
get_atten = _CONSTRUCTORS["atten"]
get_danet = _CONSTRUCTORS["danet"]


def get_segmentation_model(
    name: str,
    dataset: str = "pascal_voc",
    backbone: str = "resnet50s",
    nclass: int | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> BaseNet:
    """Build a segmentation model (upstream ``get_segmentation_model``), without weights.

    Args:
      name: 'fcn', 'psp', 'encnet', 'deeplab', 'upernet', 'fcfpn', 'atten' or 'danet'.
      dataset: sets ``nclass`` when it is None (:data:`SEGMENTATION_DATASETS`), and for EncNet the
        lateral fusion when ``lateral`` is not given (datasets whose name starts with 'p').
      backbone: a :func:`get_backbone` name.
      nclass: number of classes (overrides the dataset's).
      pretrained: must be False: weights come from ``jaxenc.models.load_pretrained`` (no implicit
        downloads; upstream issue #395).
      kwargs: fields of the model class (``aux``, ``se_loss``, ``norm_layer``, ``dtype``, ...).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _MODELS:
        raise ValueError(
            f"get_segmentation_model: unknown model {name!r}; choose one of {sorted(_MODELS)}"
        )
    cls = _MODELS[key]
    where = f"get_segmentation_model({key!r})"
    if pretrained:
        raise ValueError(
            f"{where}: pretrained=True does not download weights here (no implicit downloads, upstream issue "
            "#395); build the model, then load its variables with jaxenc.models.load_pretrained(<model name>, ...)"
        )
    if nclass is None:
        nclass = dataset_nclass(dataset, SEGMENTATION_DATASETS, where)
    if cls is EncNet and kwargs.get("lateral") is None:
        kwargs["lateral"] = isinstance(dataset, str) and dataset.lower().startswith("p")
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "nclass", "backbone"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid options: {sorted(fields)}")
    backbones = registry.backbone_names()
    if not isinstance(backbone, str) or backbone.lower() not in backbones:
        raise ValueError(
            f"{where}: unknown backbone {backbone!r}; segmentation backbones: {', '.join(backbones)}"
        )
    return cls(nclass=nclass, backbone=backbone.lower(), **kwargs)


_ADE = dict(dataset="ade20k")
_PCONTEXT = dict(dataset="pcontext")

# Upstream's model_zoo names (``encoding/models/model_zoo.py``, lower-cased) and their presets.
_UPSTREAM_NAMES: dict[str, tuple[Callable[..., BaseNet], dict[str, Any]]] = {
    "encnet_resnet101s_coco": (
        get_encnet,
        dict(
            dataset="coco",
            backbone="resnet101s",
            aux=True,
            base_size=520,
            crop_size=480,
            lateral=True,
        ),
    ),
    "fcn_resnet50s_pcontext": (get_fcn, dict(_PCONTEXT, backbone="resnet50s", aux=False)),
    "encnet_resnet50s_pcontext": (
        get_encnet,
        dict(_PCONTEXT, backbone="resnet50s", aux=True, base_size=520, crop_size=480),
    ),
    "encnet_resnet101s_pcontext": (
        get_encnet,
        dict(_PCONTEXT, backbone="resnet101s", aux=True, base_size=520, crop_size=480),
    ),
    "encnet_resnet50s_ade": (
        get_encnet,
        dict(_ADE, backbone="resnet50s", aux=True, base_size=520, crop_size=480),
    ),
    "encnet_resnet101s_ade": (
        get_encnet,
        dict(_ADE, backbone="resnet101s", aux=True, base_size=640, crop_size=576),
    ),
    "fcn_resnet50s_ade": (get_fcn, dict(_ADE, backbone="resnet50s")),
    "psp_resnet50s_ade": (get_psp, dict(_ADE, backbone="resnet50s")),
    "fcn_resnest50_ade": (get_fcn, dict(_ADE, backbone="resnest50", aux=True)),
    "fcn_resnest50_pcontext": (get_fcn, dict(_PCONTEXT, backbone="resnest50", aux=True)),
    **{
        f"deeplab_resnest{depth}_{acronym}": (
            get_deeplab,
            dict(dataset=dataset, backbone=f"resnest{depth}", aux=True),
        )
        for acronym, dataset in (("ade", "ade20k"), ("pcontext", "pcontext"))
        for depth in (50, 101, 200, 269)
    },
}

#: Every segmentation name registered in :mod:`jaxenc.models.registry` by this module.
SEGMENTATION_MODEL_NAMES: tuple[str, ...] = tuple(_UPSTREAM_NAMES) + tuple(_GENERIC_NAMES)

for _name, (_fn, _presets) in _UPSTREAM_NAMES.items():
    register_model(_name, **_presets)(_fn)
del _name, _fn, _presets

__all__ += ["SEGMENTATION_MODEL_NAMES"]
