"""Deep TEN, the texture encoding network (Zhang, Xue & Dana, "Deep TEN: Texture Encoding Network",
CVPR 2017), PyTorch-Encoding's ``encoding/models/deepten.py``, in Flax, NHWC.

A non-dilated ResNet-S backbone (``pretrained``: resnet50s/101s/152s) followed by ``head``:
1x1 conv 2048 -> 128 with bias ("0"), norm ("1"), ReLU, :class:`jaxenc.nn.Encoding` (D=128, K=32)
("3"), flatten to 4096 (K-major, as torch's ``View(-1, 128 * 32)`` of the (B, K, D) encoding),
L2 normalisation, Linear 4096 -> nclass ("6"). Registered as ``deepten_resnet50_minc`` (MINC-2500,
23 classes).

Names follow upstream, so its checkpoint converts one to one with :func:`jaxenc.port.torch_to_flax`.
Upstream's DeepTen keeps the backbone's ImageNet classifier (``pretrained.fc``, unused in the
forward pass) in its state_dict; it exists here too (created at ``init``, never applied), so the
conversion stays strict. Unlike upstream, the backbone is never downloaded implicitly (upstream
always builds it with ``pretrained=True``): load weights from the model store
(``jaxenc.models.load_pretrained``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models.model_utils import check_remat, dataset_nclass, dtype_kwargs, remat_call
from jaxenc.models.registry import get_model, register_model
from jaxenc.nn.encoding import Encoding
from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.lp_norm import lp_normalize
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.torch_compat import Conv2d, torch_uniform_init
from jaxenc.validation import check_positive_int

Dtype = Any

__all__ = [
    "CLASSIFICATION_DATASETS",
    "DeepTen",
    "DeepTEN",
    "get_deepten",
    "get_deepten_resnet50_minc",
]

# Upstream's backbone argument: 'resnet50' means the deep-stem resnet50s (the 's' names are accepted too).
# fmt: off
_BACKBONES = {
    "resnet50": "resnet50s", "resnet101": "resnet101s", "resnet152": "resnet152s",
    "resnet50s": "resnet50s", "resnet101s": "resnet101s", "resnet152s": "resnet152s",
}
# fmt: on

#: Number of classes of upstream's recognition datasets usable with DeepTen.
CLASSIFICATION_DATASETS = {"minc": 23}


class _DeepTenHead(DtypeFields):
    """Upstream ``head = nn.Sequential(Conv2d(2048, 128, 1), BatchNorm2d(128), ReLU, Encoding(128, 32),
    View(-1, 4096), Normalize(), Linear(4096, nclass))``: children "0", "1", "3", "6"."""

    nclass: int
    n_codes: int = 32
    norm_layer: Callable[..., nn.Module] = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        y = Conv2d(128, 1, name="0", **kw)(x)
        y = jax.nn.relu(self.norm_layer(128, name="1", **kw)(y, train=train))
        e = Encoding(128, self.n_codes, name="3", **kw)(y)  # (B, K, D)
        e = lp_normalize(e.reshape(e.shape[0], 128 * self.n_codes), 2.0, -1)
        init = torch_uniform_init(128 * self.n_codes)
        return nn.Dense(self.nclass, kernel_init=init, bias_init=init, name="6", **kw)(e)


class DeepTen(nn.Module):
    """Deep TEN (Zhang et al., CVPR 2017): ResNet-S features + residual encoding + L2 norm + linear.

    Fields: ``nclass``; ``backbone`` ('resnet50', 'resnet101', 'resnet152' as upstream, meaning the
    deep-stem ResNet-S; the 's' names work too); ``norm_layer`` (backbone and head norm, default
    :class:`jaxenc.nn.BatchNorm`); ``dtype`` (compute dtype), ``param_dtype``; ``remat`` ("none" |
    "block": backbone blocks and the head rematerialised, recomputed in the backward pass to save
    activation memory; same variables and results, see :func:`jaxenc.models.model_utils.remat_call`).

    ``__call__(x, train=False)``: x (B, H, W, 3) -> logits (B, nclass). Training uses batch statistics
    (``batch_stats`` mutable).
    """

    nclass: int
    backbone: str = "resnet50"
    norm_layer: Callable[..., nn.Module] = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    def setup(self) -> None:
        check_positive_int(self.nclass, "nclass", "DeepTen")
        check_remat(self.remat, "DeepTen")
        key = self.backbone.lower() if isinstance(self.backbone, str) else None
        if key not in _BACKBONES:
            raise ValueError(
                f"DeepTen: unknown backbone {self.backbone!r}; choose one of {sorted(_BACKBONES)}"
            )
        kw = dtype_kwargs(self)
        self.pretrained = get_model(
            _BACKBONES[key], dilated=False, norm_layer=self.norm_layer, remat=self.remat, **kw
        )
        self.head = _DeepTenHead(self.nclass, norm_layer=self.norm_layer, **kw)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.is_initializing():
            # Creates the backbone's (unused) ImageNet ``fc``, which upstream's state_dict carries.
            self.pretrained(x, train=train)
        c4 = self.pretrained(x, train=train, return_features=True)[-1]
        return remat_call(self.head, self.remat, c4, train=train)


DeepTEN = DeepTen


def get_deepten(
    dataset: str = "minc",
    backbone: str = "resnet50",
    nclass: int | None = None,
    pretrained: bool = False,
    *,
    num_classes: int | None = None,
    **kwargs: Any,
) -> DeepTen:
    """Upstream ``get_deepten(dataset, backbone, ...)``: a :class:`DeepTen` without weights.

    ``nclass`` defaults to the dataset's (MINC-2500: 23); ``num_classes`` is accepted as its alias
    (the name the classification networks use, so ``get_model(name, num_classes=...)`` works for every
    recognition name). ``pretrained=True`` raises: load weights with
    ``jaxenc.models.load_pretrained('deepten_resnet50_minc', ...)`` (no implicit downloads).
    """
    if num_classes is not None:
        if nclass is not None and nclass != num_classes:
            raise ValueError(
                f"get_deepten: nclass={nclass} and num_classes={num_classes} disagree (they are aliases)"
            )
        nclass = num_classes
    if pretrained:
        raise ValueError(
            "get_deepten: pretrained=True does not download weights here (no implicit downloads); build the "
            "model, then load its variables with jaxenc.models.load_pretrained('deepten_resnet50_minc', ...)"
        )
    if nclass is None:
        nclass = dataset_nclass(dataset, CLASSIFICATION_DATASETS, "get_deepten")
    unknown = sorted(set(kwargs) - {"norm_layer", "dtype", "param_dtype", "remat"})
    if unknown:
        raise ValueError(
            f"get_deepten: unknown option(s) {unknown}; valid options: ['dtype', 'norm_layer', 'param_dtype', 'remat']"
        )
    return DeepTen(nclass=nclass, backbone=backbone, **kwargs)


@register_model("deepten_resnet50_minc", dataset="minc", backbone="resnet50")
def get_deepten_resnet50_minc(pretrained: bool = False, **kwargs: Any) -> DeepTen:
    """Deep TEN with a ResNet-50-S backbone for MINC-2500 (23 classes), upstream's ``deepten_resnet50_minc``."""
    return get_deepten(pretrained=pretrained, **kwargs)
