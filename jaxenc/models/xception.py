"""PyTorch-Encoding's modified aligned Xception (Xception-65 / Xception-71) in Flax, NHWC.

Chollet, "Xception", CVPR 2017; Chen et al., "Encoder-Decoder with Atrous Separable Convolution"
(DeepLabV3+), ECCV 2018: the modified aligned Xception (deeper middle flow, strided separable convs
instead of max pools, BN after each depthwise conv, atrous convs for output stride 16/8). Upstream:
``encoding/models/backbone/xception.py``; submodule names are its torch attribute names, Sequential
indices included (``block1.rep.0.conv1``, ``midflow.block4.rep.1.pointwise``, ``block2.0.rep.0``
(Xception71)), so :func:`jaxenc.port.torch_to_flax` converts a ``state_dict`` one to one; the index
of every unit in a block's ``rep`` is given by :func:`rep_layout`.

Semantics: ``SeparableConv2d`` is zero "fixed padding", depthwise conv, norm, pointwise 1x1, no
biases; an ``XceptionBlock`` is ``rep`` + shortcut (1x1 conv + norm when the shape changes), no ReLU
after the add; the strided unit is always stride 2, dilation 1. ``return_features=True`` returns
(c1, c2, c3, c4) = (ReLU(block1), block2, midflow, ReLU(bn5)) outputs without creating ``fc``.
Every conv kernel ~ He fan-out (upstream's ``_init_weight``), ``fc`` torch's Linear default.

Deviations from upstream: the shortcut reads the un-activated block input, as the papers do
(``inplace_relu=True`` reproduces upstream's in-place ReLU rewriting it); ``output_stride`` not in
(8, 16, 32) raises a ValueError; ``num_classes`` and ``num_middle_blocks`` are fields; blocks accept
stride 1 or 2 only; ``SeparableConv2d``'s ``norm_layer`` defaults to BatchNorm; ``pretrained=True``
raises (weights come from :func:`jaxenc.models.load_pretrained`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.models.model_utils import (
    Stage,
    check_image_batch,
    check_norm_layer,
    check_remat,
    dtype_kwargs,
    he_conv,
    pooled_classifier,
    remat_call,
)
from jaxenc.models.registry import build_named, register_model
from jaxenc.nn import BatchNorm
from jaxenc.nn.fields import DtypeFields
from jaxenc.validation import check_channels, check_positive_int

Dtype = Any

__all__ = [
    "SeparableConv2d",
    "Xception65",
    "Xception71",
    "XceptionBlock",
    "rep_layout",
    "xception65",
    "xception71",
]

# output_stride -> (entry block3 stride, middle-flow dilation, block20 stride, (block20 dilation,
# conv3..conv5 dilation)), upstream's table.
# fmt: off
_OUTPUT_STRIDES = {
    32: (2, 1, 2, (1, 1)),
    16: (2, 1, 1, (1, 2)),
    8: (1, 2, 1, (2, 4)),
}
# fmt: on


def rep_layout(
    inplanes: int,
    planes: int,
    reps: int,
    stride: int = 1,
    dilation: int = 1,
    start_with_relu: bool = True,
    grow_first: bool = True,
    is_last: bool = False,
) -> tuple:
    """The entries of upstream ``Block.rep`` in order; an entry's index is its torch Sequential index.

    Entries: ``("relu",)``, ``("sep", in, out, stride, dilation)`` (a :class:`SeparableConv2d`) and
    ``("norm", channels)``. Upstream's list: with ``grow_first`` a unit in->planes (led by a ReLU only
    when ``start_with_relu``); ``reps - 1`` units filters->filters (led by a ReLU when ``grow_first or
    start_with_relu``); without ``grow_first`` a ReLU-led unit in->planes; then a ReLU-led stride-2,
    dilation-1 unit when ``stride != 1``, or a ReLU-led unit at the block's dilation when ``is_last``.
    E.g. block1 (start_with_relu=False, stride 2): sep 0, norm 1, relu 2, sep 3, norm 4, relu 5, sep 6,
    norm 7; a middle-flow block: relu 0, sep 1, norm 2, relu 3, sep 4, norm 5, relu 6, sep 7, norm 8.
    """
    rep: list[tuple] = []

    def unit(cin: int, cout: int, s: int, d: int, relu: bool) -> None:
        if relu:
            rep.append(("relu",))
        rep.append(("sep", cin, cout, s, d))
        rep.append(("norm", cout))

    filters = inplanes
    if grow_first:
        unit(inplanes, planes, 1, dilation, start_with_relu)
        filters = planes
    for _ in range(reps - 1):
        unit(filters, filters, 1, dilation, grow_first or start_with_relu)
    if not grow_first:
        unit(inplanes, planes, 1, dilation, True)
    if stride != 1:
        unit(planes, planes, 2, 1, True)
    elif is_last:
        unit(planes, planes, 1, dilation, True)
    return tuple(rep)


def _fixed_padding(x: jax.Array, kernel_size: int, dilation: int) -> jax.Array:
    """Zero-pad H and W so a stride-1 conv keeps the size: total k_eff - 1, total // 2 before."""
    total = kernel_size + (kernel_size - 1) * (dilation - 1) - 1
    begin = total // 2
    return jnp.pad(x, ((0, 0), (begin, total - begin), (begin, total - begin), (0, 0)))


class SeparableConv2d(DtypeFields):
    """Upstream's SeparableConv2d: fixed padding, depthwise conv, norm, pointwise 1x1 conv.

    Children ``conv1`` (depthwise, groups = inplanes), ``bn`` (``norm_layer(inplanes)``) and
    ``pointwise``. Both kernels ~ N(0, sqrt(2 / (kh * kw * out_channels))), as upstream's network init.

    Shapes: x (N, H, W, inplanes) -> (N, ceil(H / stride), ceil(W / stride), planes) (the fixed padding
    keeps the size at stride 1 for any kernel size and dilation). ``__call__(x, train=False)``.
    """

    inplanes: int
    planes: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    bias: bool = False
    norm_layer: Callable[..., nn.Module] = BatchNorm

    def __post_init__(self):
        where = "SeparableConv2d"
        for name in ("inplanes", "planes", "kernel_size", "stride", "dilation"):
            check_positive_int(getattr(self, name), name, where)
        check_norm_layer(self.norm_layer, where)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_channels(x, self.inplanes, "SeparableConv2d", "inplanes")
        kw = dtype_kwargs(self)
        conv = functools.partial(he_conv, bias=self.bias, **kw)
        x = _fixed_padding(x, self.kernel_size, self.dilation)
        depthwise = dict(stride=self.stride, dilation=self.dilation, groups=self.inplanes)
        x = conv(
            self.inplanes, self.kernel_size, in_channels=self.inplanes, **depthwise, name="conv1"
        )(x)
        x = self.norm_layer(self.inplanes, name="bn", **kw)(x, train=train)
        return conv(self.planes, 1, name="pointwise")(x)


class _Rep(DtypeFields):
    """A block's ``rep`` ``nn.Sequential``, children named by their index in :func:`rep_layout`."""

    layout: tuple
    norm_layer: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        for i, entry in enumerate(self.layout):
            if entry[0] == "relu":
                x = jax.nn.relu(x)
            elif entry[0] == "sep":
                _, cin, cout, stride, dilation = entry
                x = SeparableConv2d(
                    cin, cout, 3, stride, dilation, norm_layer=self.norm_layer, name=str(i), **kw
                )(x, train=train)
            else:
                x = self.norm_layer(entry[1], name=str(i), **kw)(x, train=train)
        return x


class XceptionBlock(DtypeFields):
    """Upstream's Xception ``Block``: ``rep`` + shortcut, no activation after the add.

    ``rep``: the units of :func:`rep_layout` (ReLU, :class:`SeparableConv2d`, norm) as children named
    by their torch index; shortcut ``skip`` (1x1 conv, stride ``stride``, He fan-out init) + ``skipbn``
    when ``planes != inplanes or stride != 1``, else the identity. The shortcut reads the un-activated
    input (the papers' block); ``inplace_relu=True`` feeds it ReLU(input) whenever ``rep`` starts with a
    ReLU, as upstream's in-place ReLU does (module docstring).

    Shapes: x (N, H, W, inplanes) -> (N, ceil(H / stride), ceil(W / stride), planes).
    ``__call__(x, train=False)``.
    """

    inplanes: int
    planes: int
    reps: int
    stride: int = 1
    dilation: int = 1
    norm_layer: Callable[..., nn.Module] = BatchNorm
    start_with_relu: bool = True
    grow_first: bool = True
    is_last: bool = False
    inplace_relu: bool = False

    def __post_init__(self):
        where = "XceptionBlock"
        for name in ("inplanes", "planes", "reps", "dilation"):
            check_positive_int(getattr(self, name), name, where)
        if isinstance(self.stride, bool) or self.stride not in (1, 2):
            raise ValueError(
                f"{where}: stride must be 1 or 2 (upstream's strided separable conv is fixed at 2), "
                f"got {self.stride!r}"
            )
        check_norm_layer(self.norm_layer, where)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_channels(x, self.inplanes, "XceptionBlock", "inplanes")
        kw = dtype_kwargs(self)
        layout = rep_layout(
            self.inplanes,
            self.planes,
            self.reps,
            self.stride,
            self.dilation,
            self.start_with_relu,
            self.grow_first,
            self.is_last,
        )
        if self.inplace_relu and layout[0][0] == "relu":
            x = jax.nn.relu(x)  # upstream's in-place ReLU rewrites the input the shortcut reads
        out = _Rep(layout, self.norm_layer, name="rep", **kw)(x, train=train)
        if self.planes != self.inplanes or self.stride != 1:
            skip = he_conv(self.planes, 1, stride=self.stride, name="skip", **kw)(x)
            skip = self.norm_layer(self.planes, name="skipbn", **kw)(skip, train=train)
        else:
            skip = x
        return out + skip.astype(out.dtype)


def _blocks(configs: tuple, remat: str, name: str) -> Stage:
    """An ``nn.Sequential`` of :class:`XceptionBlock` children: ``configs`` = ((name, field items), ...)."""
    names, fields = zip(*configs)
    return Stage(XceptionBlock, fields, remat=remat, names=names, name=name)


def _validate_xception(self: _AlignedXception) -> None:
    """Check the fields (a function: Flax wraps module methods, even during construction)."""
    where = type(self).__name__
    if isinstance(self.output_stride, bool) or self.output_stride not in _OUTPUT_STRIDES:
        raise ValueError(
            f"{where}: output_stride must be one of (8, 16, 32), got {self.output_stride!r}"
        )
    check_positive_int(self.num_classes, "num_classes", where)
    check_positive_int(self.num_middle_blocks, "num_middle_blocks", where)
    check_norm_layer(self.norm_layer, where)
    check_remat(self.remat, where)


class _AlignedXception(nn.Module):
    """Shared body of :class:`Xception65` and :class:`Xception71` (they differ in block2 only)."""

    output_stride: int = 32
    norm_layer: Callable[..., nn.Module] = BatchNorm  # upstream's second argument
    num_classes: int = 1000
    num_middle_blocks: int = 16
    inplace_relu: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    _VARIANT = 65

    def __post_init__(self):
        _validate_xception(self)
        super().__post_init__()

    def _block_config(self, inplanes: int, planes: int, reps: int, **kwargs: Any) -> tuple:
        config = dict(inplanes=inplanes, planes=planes, reps=reps, norm_layer=self.norm_layer)
        config.update(inplace_relu=self.inplace_relu, **dtype_kwargs(self), **kwargs)
        return tuple(config.items())

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, return_features: bool = False):
        where = type(self).__name__
        x = check_image_batch(x, where, self.dtype)
        kw = dtype_kwargs(self)
        norm = self.norm_layer
        entry3_stride, middle_dilation, exit_stride, (exit_dilation, conv_dilation) = (
            _OUTPUT_STRIDES[self.output_stride]
        )

        def block(name: str, inplanes: int, planes: int, reps: int, **kwargs: Any) -> XceptionBlock:
            return XceptionBlock(
                **dict(self._block_config(inplanes, planes, reps, **kwargs)), name=name
            )

        # Entry flow
        x = he_conv(32, 3, stride=2, padding=1, name="conv1", **kw)(x)
        x = jax.nn.relu(norm(32, name="bn1", **kw)(x, train=train))
        x = he_conv(64, 3, padding=1, name="conv2", **kw)(x)
        x = jax.nn.relu(norm(64, name="bn2", **kw)(x, train=train))
        x = remat_call(
            block("block1", 64, 128, 2, stride=2, start_with_relu=False), self.remat, x, train=train
        )
        c1 = x = jax.nn.relu(x)
        if self._VARIANT == 65:
            block2 = block("block2", 128, 256, 2, stride=2, start_with_relu=False)
            x = remat_call(block2, self.remat, x, train=train)
        else:
            configs = (
                ("0", self._block_config(128, 256, 2, stride=1, start_with_relu=False)),
                ("1", self._block_config(256, 256, 2, stride=2, start_with_relu=False)),
                ("2", self._block_config(256, 728, 2, stride=1, start_with_relu=False)),
            )
            x = _blocks(configs, self.remat, "block2")(x, train=train)
        c2 = x
        block3 = block("block3", x.shape[-1], 728, 2, stride=entry3_stride, is_last=True)
        x = remat_call(block3, self.remat, x, train=train)

        # Middle flow
        middle = tuple(
            (f"block{i}", self._block_config(728, 728, 3, dilation=middle_dilation))
            for i in range(4, 4 + self.num_middle_blocks)
        )
        c3 = x = _blocks(middle, self.remat, "midflow")(x, train=train)

        # Exit flow
        block20 = block(
            "block20",
            728,
            1024,
            2,
            stride=exit_stride,
            dilation=exit_dilation,
            grow_first=False,
            is_last=True,
        )
        x = remat_call(block20, self.remat, x, train=train)
        x = jax.nn.relu(x)
        for i, (cin, cout) in enumerate(((1024, 1536), (1536, 1536), (1536, 2048)), start=3):
            x = SeparableConv2d(
                cin, cout, 3, 1, conv_dilation, norm_layer=norm, name=f"conv{i}", **kw
            )(x, train=train)
            x = jax.nn.relu(norm(cout, name=f"bn{i}", **kw)(x, train=train))

        if return_features:
            return c1, c2, c3, x

        return pooled_classifier(self, x, self.num_classes)


class Xception65(_AlignedXception):
    """Modified aligned Xception-65 (DeepLabV3+'s backbone), upstream's ``Xception65``, NHWC.

    Fields (upstream's ``output_stride`` and ``norm_layer`` first): ``output_stride`` (32, 16 or 8),
    ``norm_layer`` (a callable ``norm_layer(num_features, *, name, dtype, param_dtype)``, default
    :class:`jaxenc.nn.BatchNorm`; ``functools.partial(jaxenc.nn.SyncBatchNorm, axis_name="data")`` for
    synchronised statistics), ``num_classes`` (fc width, 1000), ``num_middle_blocks`` (16 =
    block4..block19; fewer for reduced configurations), ``inplace_relu`` (False: shortcuts read the
    un-activated block input as in the papers; True: upstream's in-place ReLU behaviour), ``dtype``
    (compute dtype, e.g. bfloat16), ``param_dtype``, ``remat`` ("none" | "block": every
    :class:`XceptionBlock` rematerialised, recomputed in the backward pass to save activation memory;
    same variables and results, see :func:`jaxenc.models.model_utils.remat_call`).

    ``__call__(x, train=False, *, return_features=False)``: x (B, H, W, 3) -> logits (B, num_classes);
    with ``return_features`` the tuple (c1, c2, c3, c4) of shapes (B, H/4, W/4, 128),
    (B, H/8, W/8, 256), (B, H/s3, W/s3, 728), (B, H/s4, W/s4, 2048) (sizes rounded up) with
    (s3, s4) = (16, 32), (16, 16), (8, 8) at output stride 32, 16, 8; ``fc`` is then not created.
    ``train`` uses batch statistics (``batch_stats`` mutable).
    """

    _VARIANT = 65


class Xception71(_AlignedXception):
    """Modified aligned Xception-71, upstream's ``Xception71``: Xception65 with block2 an
    ``nn.Sequential`` of three blocks (128->256, 256->256 stride 2, 256->728; children ``block2.0`` ..
    ``block2.2``) and block3 728->728 (a shortcut conv only when strided, i.e. not at output stride 8).

    Fields and ``__call__`` as :class:`Xception65`; c2 has 728 channels (stride 8).
    """

    _VARIANT = 71


# --------------------------------------------------------------------------------------------------
# Named constructors


def _build(model: str, cls: type, pretrained: bool, overrides: dict[str, Any]) -> _AlignedXception:
    return build_named(model, cls, pretrained, {}, overrides)


@register_model("xception65")
def xception65(pretrained: bool = False, **kwargs: Any) -> Xception65:
    """Aligned Xception-65 (upstream's ``xception65``); 39,916,312 params with 1000 classes."""
    return _build("xception65", Xception65, pretrained, kwargs)


@register_model("xception71")
def xception71(pretrained: bool = False, **kwargs: Any) -> Xception71:
    """Aligned Xception-71 (upstream's ``Xception71`` class; the constructor is jaxenc's); 41,730,424
    params with 1000 classes at output stride 32 or 16 (block3 has no shortcut conv at 8)."""
    return _build("xception71", Xception71, pretrained, kwargs)
