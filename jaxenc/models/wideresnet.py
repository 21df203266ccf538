"""PyTorch-Encoding's WideResNet-38/50 (pre-activation wide ResNet with activated BN) in Flax, NHWC.

Wu et al., "Wider or Deeper: Revisiting the ResNet Model for Visual Recognition", Pattern Recognition
2019 (ResNet-38/50 "model A"); Rota Bulò et al., CVPR 2018 (activated BN "ABN" = BN + leaky ReLU 0.01).
Upstream: ``encoding/models/backbone/wideresnet.py``; submodule names are its torch attribute names
(``mod1``, ``mod2.0.bn1``, ``mod6.0.downsample.0``, ``bn_out``, ``fc``), so
:func:`jaxenc.port.torch_to_flax` converts its ``state_dict`` one to one. The stage table is in the
README.

Semantics: pre-activation blocks (``bn1`` acts on the block input; the shortcut is ``downsample.0``,
a bare strided 1x1 conv of ``bn1(x)``, else ``x``; no activation after the add; ``bn_out`` activates
mod7's output). Dilation follows upstream's ``_make_layer``: a stage's first block gets (dilation,
previous_dilation) = (1, d) for d in {1, 2}, (2, 4) in mod6, (4, 4) in mod7. Torch's default init.

Deviations from upstream: ABN applies its leaky ReLU in inference too (upstream's in-place ABN drops
it); basic blocks have no dropout (upstream's would fail on ``self.drops``); the bottleneck dropout
rates (0.3, 0.5) are the ``dropout`` field; ``return_features=True`` returns (mod3, mod4, mod5,
bn_out(mod7)) without creating ``fc``; invalid options raise a ValueError naming the option.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models.model_utils import (
    Stage,
    check_block_counts,
    check_image_batch,
    check_norm_layer,
    check_remat,
    dtype_kwargs,
    pooled_classifier,
)
from jaxenc.models.registry import build_named, register_model
from jaxenc.nn import Conv2d, SyncBatchNorm, max_pool2d
from jaxenc.nn.fields import DtypeFields
from jaxenc.validation import check_int, check_probability

Dtype = Any

__all__ = ["ABN", "WideBasicBlock", "WideBottleneck", "WideResNet", "wideresnet38", "wideresnet50"]

ABN = functools.partial(SyncBatchNorm, activation="leaky_relu", slope=0.01)
"""PyTorch-Encoding's activated BN: batch norm then leaky ReLU (slope 0.01), in training and inference."""


class _Projection(DtypeFields):
    """Upstream's shortcut ``nn.Sequential``: one 1x1 conv (child "0"), no norm.

    Shapes: (N, H, W, C_in) -> (N, H/stride, W/stride, out_channels).
    """

    out_channels: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = Conv2d(
            self.out_channels, 1, stride=self.stride, bias=False, name="0", **dtype_kwargs(self)
        )
        return conv(x)


def _preactivate(module: nn.Module, x: jax.Array, out_channels: int, train: bool, where: str):
    """(bn1(x), shortcut): the shortcut is ``downsample`` of the pre-activated input, or ``x`` itself."""
    if not module.downsample and (module.stride != 1 or x.shape[-1] != out_channels):
        raise ValueError(
            f"{where}: without downsample the block needs stride 1 and {out_channels} input channels "
            f"(planes * expansion), got stride {module.stride} and input shape {tuple(x.shape)}"
        )
    kw = dtype_kwargs(module)
    pre = module.norm_layer(x.shape[-1], name="bn1", **kw)(x, train=train)
    if module.downsample:
        return pre, _Projection(out_channels, module.stride, name="downsample", **kw)(pre)
    return pre, x


class WideBasicBlock(DtypeFields):
    """WideResNet's pre-activation basic block (upstream ``BasicBlock``).

    bn1 (ABN) -> conv1 3x3 (stride, padding = dilation = ``dilation``, -> planes) -> bn2 (ABN) ->
    conv2 3x3 (padding = dilation = ``previous_dilation``, -> planes * expansion) -> + shortcut, where
    the shortcut is ``downsample.0`` (1x1 conv, stride) of bn1's output when ``downsample``, else the
    input. No dropout (see the module docstring).

    Shapes: x (N, H, W, C_in) -> (N, H/stride, W/stride, planes * expansion).
    ``__call__(x, train=False)``.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    previous_dilation: int = 1
    expansion: int = 1
    downsample: bool = False
    norm_layer: Callable[..., nn.Module] = ABN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        out_channels = self.planes * self.expansion
        out, residual = _preactivate(self, x, out_channels, train, "WideBasicBlock")
        d, pd = self.dilation, self.previous_dilation
        out = Conv2d(
            self.planes,
            3,
            stride=self.stride,
            padding=d,
            dilation=d,
            bias=False,
            name="conv1",
            **kw,
        )(out)
        out = self.norm_layer(self.planes, name="bn2", **kw)(out, train=train)
        out = Conv2d(out_channels, 3, padding=pd, dilation=pd, bias=False, name="conv2", **kw)(out)
        return out + residual.astype(out.dtype)


class WideBottleneck(DtypeFields):
    """WideResNet's pre-activation bottleneck (upstream ``Bottleneck``, "BottleneckV1b").

    bn1 (ABN) -> conv1 1x1 (-> planes) -> bn2 (ABN) -> conv2 3x3 (stride, padding = dilation,
    -> planes * expansion // 2) -> bn3 (ABN) -> dropout (``dropout`` rate, elementwise) -> conv3 1x1
    (-> planes * expansion) -> + shortcut (``downsample.0`` of bn1's output, or the input).

    Shapes: x (N, H, W, C_in) -> (N, H/stride, W/stride, planes * expansion).
    ``__call__(x, train=False)``; dropout draws from the ``dropout`` rng stream when ``train``.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    expansion: int = 4
    dropout: float = 0.0
    downsample: bool = False
    norm_layer: Callable[..., nn.Module] = ABN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        out_channels = self.planes * self.expansion
        mid = out_channels // 2
        out, residual = _preactivate(self, x, out_channels, train, "WideBottleneck")
        out = Conv2d(self.planes, 1, bias=False, name="conv1", **kw)(out)
        out = self.norm_layer(self.planes, name="bn2", **kw)(out, train=train)
        d = self.dilation
        out = Conv2d(
            mid, 3, stride=self.stride, padding=d, dilation=d, bias=False, name="conv2", **kw
        )(out)
        out = self.norm_layer(mid, name="bn3", **kw)(out, train=train)
        if self.dropout > 0.0:
            out = nn.Dropout(self.dropout, name="drop")(out, deterministic=not train)
        out = Conv2d(out_channels, 1, bias=False, name="conv3", **kw)(out)
        return out + residual.astype(out.dtype)


def _validate(self: WideResNet) -> None:
    """Check :class:`WideResNet`'s fields (a function: Flax wraps module methods)."""
    where = "WideResNet"
    check_block_counts(self.layers, 6, "layers", "block counts (mod2..mod7)", where)
    check_int(self.num_classes, "num_classes", where, minimum=1)
    if not isinstance(self.dilated, bool):
        raise ValueError(
            f"{where}: dilated must be False (output stride 32) or True (output stride 8), got {self.dilated!r}"
        )
    rates = self.dropout
    if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or len(rates) != 2:
        raise ValueError(f"{where}: dropout must be a pair of rates (mod6, mod7), got {rates!r}")
    for stage, p in zip(("mod6", "mod7"), rates):
        if check_probability(p, f"dropout[{stage}]", where) == 1.0:
            raise ValueError(
                f"{where}: dropout[{stage}] must be < 1 (it would drop every feature), got {p!r}"
            )
    check_norm_layer(self.norm_layer, where)
    check_remat(self.remat, where)


class WideResNet(nn.Module):
    """PyTorch-Encoding's WideResNet (ResNet-38 / ResNet-50 of Wu et al.), NHWC.

    See the module docstring for the dilation rules and the differences from upstream.

    Fields: ``layers`` (blocks in mod2..mod7, 6 ints), ``num_classes`` (upstream's ``classes``),
    ``dilated`` (output stride 8 instead of 32), ``dropout`` (rates of mod6's and mod7's bottlenecks,
    upstream's fixed (0.3, 0.5)), ``norm_layer`` (a callable ``norm_layer(num_features, *, name, dtype,
    param_dtype)``, default :data:`ABN`), ``dtype`` (compute dtype, e.g. bfloat16), ``param_dtype``,
    ``remat`` ("none" | "block": every block rematerialised, recomputed in the backward pass to save
    activation memory; same variables and results, see :func:`jaxenc.models.model_utils.remat_call`).

    ``__call__(x, train=False, *, return_features=False)``: x (B, H, W, 3) -> logits (B, num_classes).
    With ``return_features`` the tuple (mod3, mod4, mod5, bn_out(mod7)) of shapes (B, H/4, W/4, 256),
    (B, H/8, W/8, 512), (B, H/16, W/16, 1024), (B, H/32, W/32, 4096) (H/8 and W/8 for the last two
    when dilated; sizes rounded as torch's convs and pools round), without ``fc`` parameters.
    ``train`` uses batch statistics (``batch_stats`` mutable) and the ``dropout`` rng stream.
    """

    layers: Sequence[int] = (3, 3, 6, 3, 1, 1)
    num_classes: int = 1000
    dilated: bool = False
    dropout: Sequence[float] = (0.3, 0.5)
    norm_layer: Callable[..., nn.Module] = ABN
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    def __post_init__(self):
        _validate(self)
        super().__post_init__()

    def _stage_plan(self) -> list[tuple[type, int, int, int, int, float]]:
        """(block, planes, expansion, stride, dilation, dropout) of mod2..mod7, as upstream's constructor."""
        d6, d7 = (float(p) for p in self.dropout)
        head = [
            (WideBasicBlock, 128, 1, 1, 1, 0.0),
            (WideBasicBlock, 256, 1, 1, 1, 0.0),
            (WideBasicBlock, 512, 1, 2, 1, 0.0),
        ]
        if self.dilated:
            return head + [
                (WideBasicBlock, 512, 2, 1, 2, 0.0),
                (WideBottleneck, 512, 4, 1, 4, d6),
                (WideBottleneck, 1024, 4, 1, 4, d7),
            ]
        return head + [
            (WideBasicBlock, 512, 2, 2, 1, 0.0),
            (WideBottleneck, 512, 4, 2, 1, d6),
            (WideBottleneck, 1024, 4, 1, 1, d7),
        ]

    def _stage(
        self,
        index: int,
        inplanes: int,
        block: type,
        planes: int,
        expansion: int,
        n: int,
        stride: int,
        dilation: int,
        dropout: float,
    ) -> tuple[Stage, int]:
        """Upstream's ``_make_layer`` for stage ``mod{index}``: the first block strides and projects."""
        common = dict(planes=planes, expansion=expansion, norm_layer=self.norm_layer)
        common.update(dtype_kwargs(self))
        if block is WideBottleneck:
            common["dropout"] = dropout
        if dilation in (1, 2):
            first_dilation = 1
        elif index < 7:
            first_dilation = 2
        else:  # mod7's first block is dilated at once
            first_dilation = dilation
        first = dict(
            stride=stride,
            dilation=first_dilation,
            downsample=stride != 1 or inplanes != planes * expansion,
        )
        rest = dict(dilation=dilation)
        if block is WideBasicBlock:
            first["previous_dilation"] = dilation
            rest["previous_dilation"] = dilation
        configs = [tuple({**common, **first}.items())]
        configs += [tuple({**common, **rest}.items()) for _ in range(1, n)]
        return Stage(
            block, tuple(configs), remat=self.remat, name=f"mod{index}"
        ), planes * expansion

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, return_features: bool = False):
        x = check_image_batch(x, "WideResNet", self.dtype)
        kw = dtype_kwargs(self)

        def max_pool(v):
            return max_pool2d(v, 3, 2, 1)

        x = Conv2d(64, 3, padding=1, bias=False, name="mod1", **kw)(x)
        x = max_pool(x)  # pool2
        outputs = {}
        inplanes = 64
        for i, (block, planes, expansion, stride, dilation, drop) in enumerate(self._stage_plan()):
            index = i + 2
            if index == 3:
                x = max_pool(x)  # pool3
            stage, inplanes = self._stage(
                index, inplanes, block, planes, expansion, self.layers[i], stride, dilation, drop
            )
            x = stage(x, train=train)
            outputs[index] = x
        x = self.norm_layer(inplanes, name="bn_out", **kw)(x, train=train)

        if return_features:
            return outputs[3], outputs[4], outputs[5], x

        return pooled_classifier(self, x, self.num_classes)


# --------------------------------------------------------------------------------------------------
# Named constructors


def _build(
    model: str, layers: tuple[int, ...], pretrained: bool, overrides: dict[str, Any]
) -> WideResNet:
    return build_named(
        model,
        WideResNet,
        pretrained,
        {"layers": layers},
        overrides,
        tuple_fields=("layers", "dropout"),
    )


@register_model("wideresnet38")
def wideresnet38(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WideResNet-38: layers (3, 3, 6, 3, 1, 1); 109,167,912 parameters with 1000 classes.

    ``kwargs`` override :class:`WideResNet` fields (``dilated=True``, ``num_classes=...``, ``norm_layer``).
    """
    return _build("wideresnet38", (3, 3, 6, 3, 1, 1), pretrained, kwargs)


@register_model("wideresnet50")
def wideresnet50(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WideResNet-50: layers (3, 3, 6, 6, 3, 1); 153,231,656 parameters with 1000 classes.

    ``kwargs`` override :class:`WideResNet` fields (``dilated=True``, ``num_classes=...``, ``norm_layer``).
    """
    return _build("wideresnet50", (3, 3, 6, 6, 3, 1), pretrained, kwargs)
