"""PyTorch-Encoding's WideResNet-38/50 (pre-activation wide ResNet with activated BN) in Flax, NHWC.

Wu et al., "Wider or Deeper: Revisiting the ResNet Model for Visual Recognition", Pattern Recognition
2019 (the ResNet-38/50 "model A" design); Rota Bulò et al., "In-Place Activated BatchNorm for
Memory-Optimized Training of DNNs", CVPR 2018 (the activated BN "ABN" = BN + leaky ReLU 0.01, with
which the pretrained weights were trained).

Mirrors upstream ``encoding/models/backbone/wideresnet.py``. Submodule
names are upstream's torch attribute names (``mod1``, ``mod2.0.bn1``, ``mod6.0.downsample.0``,
``bn_out``, ``fc``), so :func:`jaxenc.port.torch_to_flax` converts upstream's ``wideresnet38`` /
``wideresnet50`` state_dicts one to one.

Network (x: (B, H, W, 3)):

======  =============================================================  ========  ================
module  what                                                           channels  stride (dilated)
======  =============================================================  ========  ================
mod1    3x3 conv, stride 1, no bias                                    64        1
pool2   3x3 max pool, stride 2, padding 1 (-inf padding)               64        2
mod2    ``layers[0]`` :class:`WideBasicBlock` (planes 128)             128       2
pool3   3x3 max pool, stride 2, padding 1                              128       4
mod3    ``layers[1]`` basic blocks (256), stride 1                     256       4
mod4    ``layers[2]`` basic blocks (512), stride 2                     512       8
mod5    ``layers[3]`` basic blocks (512, expansion 2), stride 2        1024      16 (8, d=2)
mod6    ``layers[4]`` :class:`WideBottleneck` (512, x4), dropout 0.3   2048      32 (8, d=4)
mod7    ``layers[5]`` bottlenecks (1024, x4), dropout 0.5, stride 1    4096      32 (8, d=4)
bn_out  ABN(4096), then global average pool and ``fc`` -> num_classes  4096      32 (8)
======  =============================================================  ========  ================

Semantics settled against upstream at HEAD:

- Pre-activation blocks: ``bn1`` (ABN) acts on the block input; the shortcut is ``downsample.0``
  (a bare 1x1 conv with the stage stride, no norm) applied to ``bn1(x)`` when the block has one, else
  the raw input ``x``. There is no activation after the residual add; ``bn_out`` activates mod7's
  output.
- Dilation, per upstream's ``_make_layer(stage, block, planes, n, stride, dilation)``: the first
  block of a stage gets (dilation, previous_dilation) = (1, d) for d in {1, 2}, (2, 4) for d = 4 in
  mod6, and (4, 4) for mod7; the other blocks get (d, d). A :class:`WideBasicBlock` uses
  ``dilation`` in conv1 and ``previous_dilation`` in conv2 (so mod5's first dilated block has a
  dilation-1 conv1 and a dilation-2 conv2); a :class:`WideBottleneck` dilates its 3x3 ``conv2`` with
  ``dilation`` and ignores ``previous_dilation``. Padding equals the dilation throughout.
- ``dilated=True`` (output stride 8): mod4 keeps stride 2; mod5 has stride 1 and dilation 2; mod6 and
  mod7 have stride 1 and dilation 4. A shortcut projection exists when the stride is not 1 or the
  channel count changes (the first block of every stage here, mod3's and mod7's with stride 1).
- Initialisation: upstream has no init loop, so every conv and ``fc`` keep torch's defaults
  (U(+-1/sqrt(fan_in)) for weights and biases) and every norm scale 1, bias 0.

Deliberate differences from upstream (docs/DESIGN.md, "Decisions on upstream bugs"):

- ABN (``norm_layer`` default :data:`ABN`: :class:`jaxenc.nn.SyncBatchNorm` with
  ``activation="leaky_relu", slope=0.01``) applies its leaky ReLU in training AND inference; upstream's
  in-place ABN drops it in inference (and its backward is broken, so upstream cannot train it). Pass
  ``norm_layer=functools.partial(SyncBatchNorm, activation="leaky_relu", slope=0.01, axis_name="data")``
  for statistics synchronised over a device axis.
- Basic blocks have no dropout: upstream never gives them any, and its BasicBlock with ``dropout > 0``
  would call a misspelled attribute (``self.drops``) and fail. The bottleneck dropout rates (0.3 in
  mod6, 0.5 in mod7, upstream's hard-coded values; elementwise ``nn.Dropout`` after ``bn3``) are the
  ``dropout`` field, so they can be changed (e.g. ``(0.0, 0.0)``).
- ``__call__(..., return_features=True)`` returns (mod3, mod4, mod5, bn_out(mod7)) outputs without
  creating ``fc``. Upstream's segmentation ``BaseNet.base_forward`` returns (None, None, mod5,
  bn_out(mod7)) for this backbone; the first two are the stride-4 and stride-8 maps that play c1/c2.
- Invalid options (``layers`` not 6 positive ints, a non-bool ``dilated``, dropout rates outside
  [0, 1)) raise a ValueError naming the option.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models.registry import build_named, register_model
from jaxenc.models.resnet import _check_int, _Stage, check_remat
from jaxenc.nn.norm import SyncBatchNorm
from jaxenc.nn.resample import max_pool2d
from jaxenc.nn.torch_compat import Conv2d, torch_uniform_init
from jaxenc.validation import check_probability

Dtype = Any

__all__ = ["ABN", "WideBasicBlock", "WideBottleneck", "WideResNet", "wideresnet38", "wideresnet50"]

ABN = functools.partial(SyncBatchNorm, activation="leaky_relu", slope=0.01)
"""PyTorch-Encoding's activated BN: batch norm then leaky ReLU (slope 0.01), in training and inference."""


class _Projection(nn.Module):
    """Upstream's shortcut ``nn.Sequential``: one 1x1 conv (child "0"), no norm.

    Shapes: (N, H, W, C_in) -> (N, H/stride, W/stride, out_channels).
    """

    out_channels: int
    stride: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv2d(
            self.out_channels,
            1,
            stride=self.stride,
            bias=False,
            name="0",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


def _preactivate(module: nn.Module, x: jax.Array, out_channels: int, train: bool, where: str):
    """(bn1(x), shortcut): the shortcut is ``downsample`` of the pre-activated input, or ``x`` itself."""
    if not module.downsample and (module.stride != 1 or x.shape[-1] != out_channels):
        raise ValueError(
            f"{where}: without downsample the block needs stride 1 and {out_channels} input channels "
            f"(planes * expansion), got stride {module.stride} and input shape {tuple(x.shape)}"
        )
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    pre = module.norm_layer(x.shape[-1], name="bn1", **kw)(x, train=train)
    if module.downsample:
        return pre, _Projection(out_channels, module.stride, name="downsample", **kw)(pre)
    return pre, x


class WideBasicBlock(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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


class WideBottleneck(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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
    layers = self.layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 6:
        raise ValueError(f"{where}: layers must be 6 block counts (mod2..mod7), got {layers!r}")
    for i, n in enumerate(layers):
        _check_int(n, f"layers[{i}]", where)
    _check_int(self.num_classes, "num_classes", where)
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
    if self.norm_layer is None or not callable(self.norm_layer):
        raise ValueError(
            f"{where}: norm_layer must be a callable building a norm module, got {self.norm_layer!r}"
        )
    check_remat(self.remat, where)


class WideResNet(nn.Module):
    """PyTorch-Encoding's WideResNet (ResNet-38 / ResNet-50 of Wu et al.), NHWC.

    See the module docstring for the stage table, the dilation rules and the differences from upstream.

    Fields: ``layers`` (blocks in mod2..mod7, 6 ints), ``num_classes`` (upstream's ``classes``),
    ``dilated`` (output stride 8 instead of 32), ``dropout`` (rates of mod6's and mod7's bottlenecks,
    upstream's fixed (0.3, 0.5)), ``norm_layer`` (a callable ``norm_layer(num_features, *, name, dtype,
    param_dtype)``, default :data:`ABN`), ``dtype`` (compute dtype, e.g. bfloat16), ``param_dtype``,
    ``remat`` ("none" | "block": every block rematerialised, recomputed in the backward pass to save
    activation memory; same variables and results, see :func:`jaxenc.models.resnet.remat_call`).

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
    ) -> tuple[_Stage, int]:
        """Upstream's ``_make_layer`` for stage ``mod{index}``: the first block strides and projects."""
        common = dict(
            planes=planes,
            expansion=expansion,
            norm_layer=self.norm_layer,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
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
        return _Stage(
            block, tuple(configs), remat=self.remat, name=f"mod{index}"
        ), planes * expansion

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, return_features: bool = False):
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"WideResNet: expected an NHWC image batch (B, H, W, 3), got shape {tuple(x.shape)}"
            )
        if self.dtype is not None:
            x = x.astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

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

        acc = jnp.promote_types(x.dtype, jnp.float32)
        x = jnp.mean(x.astype(acc), axis=(1, 2)).astype(x.dtype)
        fan_in = x.shape[-1]
        return nn.Dense(
            self.num_classes,
            kernel_init=torch_uniform_init(fan_in),
            bias_init=torch_uniform_init(fan_in),
            name="fc",
            **kw,
        )(x)


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
