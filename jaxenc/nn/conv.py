"""Convolution variants of holocron.nn (pylocron 0.3.0), NHWC: NormConv2d, Add2d, SlimConv2d,
PyConv2d, Involution2d and the functional ``norm_conv2d``, ``add2d``, ``involution``.

PyTorch-Encoding's convolutions live in :mod:`~jaxenc.nn.rectified_conv` (RFConv2d),
:mod:`~jaxenc.nn.split_attn` (SplAtConv2d, rSoftMax) and :mod:`~jaxenc.nn.conv_bn_act` (ConvBnAct);
they stay importable from here. Parameter names follow the torch modules (``weight`` is the Flax
``kernel``; PyConv2d's levels are ``"0"``, ``"1"``, ...), so :func:`jaxenc.port.torch_to_flax`
maps an upstream ``state_dict`` directly.

Deviations from upstream (docs/DESIGN.md, "Decisions on upstream bugs"):
- NormConv2d / Add2d honour ``groups`` (each group's windows normalised on their own); upstream
  ignores it and fails for groups > 1.
- NormConv2d and Add2d(normalize_slices=True) are differentiable w.r.t. their input (upstream
  normalises the unfolded windows in place, which breaks autograd).
- Invalid configurations raise a ValueError naming the argument (upstream: a deep shape error or,
  for PyConv2d, silently fewer output channels).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.kernels.involution_op import involution, strided_taps
from jaxenc.nn.conv_bn_act import ConvBnAct as ConvBnAct
from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.rectified_conv import RFConv2d as RFConv2d
from jaxenc.nn.split_attn import SplAtConv2d as SplAtConv2d
from jaxenc.nn.split_attn import r_softmax as r_softmax
from jaxenc.nn.split_attn import rSoftMax as rSoftMax
from jaxenc.nn.torch_compat import (
    Conv2d,
    ConvNdFields,
    conv_args,
    conv_options,
    pad_nhwc,
    torch_conv_inputs,
)
from jaxenc.validation import (
    check_channels,
    check_divisible,
    check_positive_int,
    check_rank,
    conv_output_hw,
)

__all__ = [
    "Add2d",
    "Involution2d",
    "NormConv2d",
    "PyConv2d",
    "SlimConv2d",
    "add2d",
    "involution",
    "norm_conv2d",
]

Dtype = Any


# --------------------------------------------------------------------------------------------------
# Sliding windows


def _check_window_op(x, weight, bias, stride, padding, dilation, groups, where):
    """Validate the arguments of norm_conv2d / add2d; return (stride, padding, dilation, groups) as pairs/int."""
    check_rank(x, 4, "N, H, W, C", where)
    check_rank(weight, 4, "kh, kw, C_in/groups, C_out", where, name="weight")
    kh, kw, cg, c_out = weight.shape
    _, stride, padding, dilation = conv_args((kh, kw), stride, padding, dilation, where)
    groups = check_positive_int(groups, "groups", where)
    c_in = x.shape[-1]
    check_divisible(c_in, groups, "in_channels", "groups", where)
    check_divisible(c_out, groups, "out_channels", "groups", where)
    if cg * groups != c_in:
        raise ValueError(
            f"{where}: weight has {cg} input channels per group (shape {tuple(weight.shape)}), but the input has "
            f"{c_in} channels and groups={groups}, i.e. {c_in // groups} per group"
        )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{where}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    conv_output_hw(x.shape, (kh, kw), stride, padding, dilation, where)
    return stride, padding, dilation, groups


def _normalise_windows(windows: jax.Array, eps: float) -> jax.Array:
    """(v - mean(v)) / sqrt(var(v) + eps) per window v = axes (3, 5) of (B, H', W', kh*kw, G, C/G), float32.

    Two passes (mean, then the mean of squared deviations), as torch computes it: a one-pass
    E[v^2] - E[v]^2 loses the variance of windows whose mean is large against their spread.
    """
    v = windows.astype(jnp.float32)
    mean = jnp.mean(v, axis=(3, 5), keepdims=True)
    centred = v - mean
    var = jnp.mean(centred * centred, axis=(3, 5), keepdims=True)
    return centred * jax.lax.rsqrt(var + eps)


# Compiled as one program even when called eagerly (arguments already validated).
@functools.partial(
    jax.jit,
    static_argnames=("stride", "padding", "dilation", "groups", "adder", "normalize", "eps"),
)
def _window_op(x, weight, bias, *, stride, padding, dilation, groups, adder, normalize, eps):
    kh, kw, cg, c_out = weight.shape
    out_dtype = jnp.result_type(x, weight)
    out_hw = conv_output_hw(x.shape, (kh, kw), stride, padding, dilation, "window op")
    taps = strided_taps(pad_nhwc(x, padding), (kh, kw), stride, dilation, out_hw)
    # (B, H', W', kh*kw, G, C_in/G): torch's unfold, grouped; the same memory as upstream's unfold.
    windows = jnp.stack(taps, axis=3).reshape(*x.shape[:1], *out_hw, kh * kw, groups, cg)
    if normalize:
        windows = _normalise_windows(windows, eps).astype(out_dtype)
    filters = weight.astype(out_dtype).reshape(kh * kw, cg, groups, c_out // groups)
    if adder:
        # (B, H', W', K2, G, C/G, 1) against (K2, G, C/G, O/G): in the forward pass XLA fuses the
        # difference into the reduction, so the window x filter space is not stored.
        diff = windows.astype(jnp.float32)[..., None] - filters.transpose(0, 2, 1, 3).astype(
            jnp.float32
        )
        y = -jnp.sum(jnp.abs(diff), axis=(3, 5))
    else:
        y = jnp.einsum("bhwkgc,kcgo->bhwgo", windows, filters, preferred_element_type=jnp.float32)
    y = y.reshape(*y.shape[:3], c_out)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def _checked_window_op(x, weight, bias, args, where, adder, normalize, eps):
    """Validate ``args`` = (stride, padding, dilation, groups), then run :func:`_window_op`."""
    stride, padding, dilation, groups = _check_window_op(x, weight, bias, *args, where)
    return _window_op(
        x,
        weight,
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        adder=adder,
        normalize=bool(normalize),
        eps=float(eps),
    )


def norm_conv2d(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    eps: float = 1e-14,
) -> jax.Array:
    """Normalised convolution (holocron ``F.norm_conv2d``), with working ``groups``.

    Kim et al., "Normalized Convolutional Neural Network", arXiv:2005.05274.

    Every sliding window of a group (its C_in/groups * kh * kw values, zero padding included) is
    normalised by its own mean and biased variance, then multiplied with that group's filters:
    ``out = <(v - mean(v)) / sqrt(var(v) + eps), W_o> + bias_o``.

    Shapes: x (N, H, W, C_in); weight (kh, kw, C_in/groups, C_out) (Flax HWIO, torch's
    ``weight.permute(2, 3, 1, 0)``); bias (C_out,) -> (N, H', W', C_out), H' as torch's conv.
    Statistics and the dot product accumulate in float32; the result has x's dtype (promoted with
    the weight's).
    """
    args = (stride, padding, dilation, groups)
    return _checked_window_op(x, weight, bias, args, "norm_conv2d", False, True, eps)


def add2d(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    normalize_slices: bool = False,
    eps: float = 1e-14,
) -> jax.Array:
    """Adder "convolution" (holocron ``F.add2d``), with working ``groups``.

    Chen et al., "AdderNet: Do We Really Need Multiplications in Deep Learning?", CVPR 2020.

    ``out_o = -sum |v - W_o| + bias_o`` over each window v of a group (C_in/groups * kh * kw
    values, zero padding included) and that group's filters W_o; with ``normalize_slices`` the
    windows are first normalised as in :func:`norm_conv2d`.

    Shapes: x (N, H, W, C_in); weight (kh, kw, C_in/groups, C_out); bias (C_out,) ->
    (N, H', W', C_out). The L1 distance is reduced in float32; the result has x's dtype
    (promoted with the weight's).
    """
    args = (stride, padding, dilation, groups)
    return _checked_window_op(x, weight, bias, args, "add2d", True, normalize_slices, eps)


class NormConv2d(ConvNdFields, DtypeFields):
    """holocron.nn.NormConv2d: convolution over windows normalised by their own mean and variance.

    Kim et al., "Normalized Convolutional Neural Network", arXiv:2005.05274. See :func:`norm_conv2d`.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', out_channels), H' as torch's Conv2d.
    Parameters: ``kernel`` (kh, kw, in_channels/groups, out_channels) == torch ``weight``,
    ``bias`` (out_channels). A non-'zeros' ``padding_mode`` pads first, as torch's conv does.
    ``groups`` works (upstream ignores it and fails for groups > 1).
    """

    eps: float = 1e-14

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, args = torch_conv_inputs(self, x)
        return norm_conv2d(x, kernel, bias, eps=self.eps, **args)


class Add2d(ConvNdFields, DtypeFields):
    """holocron.nn.Add2d: AdderNet layer, the negative L1 distance between windows and filters.

    Chen et al., "AdderNet: Do We Really Need Multiplications in Deep Learning?", CVPR 2020. See
    :func:`add2d`.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', out_channels). Parameters as
    :class:`NormConv2d`; ``groups`` works.
    """

    normalize_slices: bool = False
    eps: float = 1e-14

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, args = torch_conv_inputs(self, x)
        return add2d(x, kernel, bias, normalize_slices=self.normalize_slices, eps=self.eps, **args)


# --------------------------------------------------------------------------------------------------
# SlimConv2d


class SlimConv2d(DtypeFields):
    """holocron.nn.SlimConv2d: channel reweighting, weight flipping and two convolution pathways.

    Qiu et al., "SlimConv: Reducing Channel Redundancy in Convolutional Neural Networks by Weights
    Flipping", arXiv:2003.07469.

    w = sigmoid(fc2(relu(bn(fc1(mean_HW(x)))))); the top path convolves the sum of the two channel
    halves of x*w, the bottom path the same sum of x*flip(w) through a 1x1 then a kxk convolution.
    Shapes: x (N, H, W, C) -> (N, H', W', C/2 + C/4), with C = in_channels (8 -> 6 channels).
    Submodules ``fc1``, ``bn``, ``fc2``, ``conv_top``, ``conv_bot1``, ``conv_bot2`` as upstream;
    ``train`` switches the BatchNorm between batch and running statistics (training needs N > 1).
    """

    in_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    r: int = 32
    L: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "SlimConv2d"
        check_rank(x, 4, "N, H, W, C", where)
        c = check_channels(x, self.in_channels, where)
        if c < 4 or c % 2:
            raise ValueError(
                f"{where}: in_channels must be even and >= 4 (the paths use C/2 and C/4 channels), got {c}"
            )
        conv_args(self.kernel_size, self.stride, self.padding, self.dilation, where)
        groups = check_positive_int(self.groups, "groups", where)
        check_divisible(c // 2, groups, "in_channels // 2", "groups", where)
        check_divisible(c // 4, groups, "in_channels // 4", "groups", where)
        mid = max(
            c // check_positive_int(self.r, "r", where), check_positive_int(self.L, "L", where)
        )
        if train and x.shape[0] < 2:
            raise ValueError(
                f"{where}: training needs a batch of at least 2 samples (its BatchNorm normalises one value per "
                f"sample and channel), got shape {tuple(x.shape)}"
            )
        common = dtype_kwargs(self)
        conv_kwargs = conv_options(self, groups=groups)

        z = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32)
        z = Conv2d(mid, 1, name="fc1", **common)(z)
        z = BatchNorm(mid, name="bn", dtype=self.dtype)(z, train=train)
        z = Conv2d(c, 1, name="fc2", **common)(jax.nn.relu(z))
        w = jax.nn.sigmoid(z.astype(jnp.float32))

        compute = self.dtype or jnp.result_type(x, self.param_dtype)
        half = c // 2

        def fold(weights):
            xw = x.astype(jnp.float32) * weights
            return (xw[..., :half] + xw[..., half:]).astype(compute)

        top = Conv2d(half, self.kernel_size, name="conv_top", **conv_kwargs)(fold(w))
        bottom = Conv2d(c // 4, 1, name="conv_bot1", **common)(fold(w[..., ::-1]))
        bottom = Conv2d(c // 4, self.kernel_size, name="conv_bot2", **conv_kwargs)(bottom)
        return jnp.concatenate([top, bottom], axis=-1)


# --------------------------------------------------------------------------------------------------
# PyConv2d


def _pyconv_levels(
    out_channels: int,
    kernel_size: tuple[int, int],
    num_levels: int,
    padding: tuple[int, int],
    groups,
    where: str,
) -> list[tuple[int, tuple[int, int], tuple[int, int], int]]:
    """(out_channels, kernel_size, padding, groups) of every pyramid level, upstream's split."""
    if groups is not None:
        if (
            isinstance(groups, (str, bytes))
            or not isinstance(groups, Sequence)
            or len(groups) != num_levels
        ):
            raise ValueError(
                f"{where}: groups must be None or a list of num_levels={num_levels} ints (one per level), "
                f"got {groups!r}"
            )
        groups = [check_positive_int(g, f"groups[{i}]", where) for i, g in enumerate(groups)]
    if num_levels == 1:
        return [(out_channels, kernel_size, padding, groups[0] if groups else 1)]
    e = int(math.log2(num_levels))
    rem = num_levels - 2**e
    outs = [out_channels // 2 ** (e + 1)] * (2 * rem) + [out_channels // 2**e] * (
        num_levels - 2 * rem
    )
    if sum(outs) != out_channels or min(outs) < 1:
        raise ValueError(
            f"{where}: out_channels={out_channels} cannot be split over num_levels={num_levels}: the pyramid gives "
            f"levels {outs} (sum {sum(outs)}); use a multiple of {2 ** (e + 1) if rem else 2**e}"
        )
    if groups is None:
        groups = [1] + [min(2 ** (i + 1), outs[i]) for i in range(1, num_levels)]
    return [
        (
            outs[i],
            (kernel_size[0] + 2 * i, kernel_size[1] + 2 * i),
            (padding[0] + i, padding[1] + i),
            groups[i],
        )
        for i in range(num_levels)
    ]


class PyConv2d(DtypeFields):
    """holocron.nn.PyConv2d: a pyramid of convolutions with growing kernels, concatenated on channels.

    Duta et al., "Pyramidal Convolution: Rethinking Convolutional Neural Networks for Visual
    Recognition", arXiv:2006.11538.

    Level i uses kernel ``kernel_size + 2i``, padding ``padding + i`` and (by default) groups 1 for
    level 0 and min(2^(i+1), out_i) after; out_channels is split as upstream (e.g. 4 levels: 4
    equal parts; 3 levels: 1/4, 1/4, 1/2). ``stride``, ``dilation``, ``bias`` and ``padding_mode``
    (upstream's ``**kwargs``) go to every level.
    Shapes: x (N, H, W, in_channels) -> (N, H', W', out_channels). Levels are submodules "0", "1", ...
    (torch keys ``0.weight``, ``1.bias``, ...).
    """

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    num_levels: int = 2
    padding: int | tuple[int, int] = 0
    groups: Sequence[int] | None = None
    stride: int | tuple[int, int] = 1
    dilation: int | tuple[int, int] = 1
    bias: bool = True
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "PyConv2d"
        check_rank(x, 4, "N, H, W, C", where)
        c = check_channels(x, self.in_channels, where)
        kernel_size, stride, padding, dilation = conv_args(
            self.kernel_size, self.stride, self.padding, self.dilation, where
        )
        check_positive_int(self.out_channels, "out_channels", where)
        levels = _pyconv_levels(
            self.out_channels,
            kernel_size,
            check_positive_int(self.num_levels, "num_levels", where),
            padding,
            self.groups,
            where,
        )
        sizes = [
            conv_output_hw(x.shape, k_i, stride, pad_i, dilation, where)
            for _, k_i, pad_i, _ in levels
        ]
        if len(set(sizes)) > 1:
            # Level i grows the kernel by 2i and the padding by i, which keeps sizes equal only at dilation 1.
            raise ValueError(
                f"{where}: the pyramid levels give different output sizes {sizes} for input (H, W)="
                f"{tuple(x.shape[1:3])} (kernel sizes {[lv[1] for lv in levels]}, paddings {[lv[2] for lv in levels]}, "
                f"dilation={dilation}, stride={stride}); they cannot be concatenated"
            )
        outputs = []
        for i, (out_i, k_i, pad_i, groups_i) in enumerate(levels):
            for what, size in (("in_channels", c), ("out_channels", out_i)):
                if size % groups_i:
                    raise ValueError(
                        f"{where}: level {i} has {what}={size}, not divisible by its groups={groups_i} "
                        f"(levels as (out_channels, groups): {[(lv[0], lv[3]) for lv in levels]})"
                    )
            conv = Conv2d(
                out_i, k_i, name=str(i), **conv_options(self, padding=pad_i, groups=groups_i)
            )
            outputs.append(conv(x))
        return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)


# --------------------------------------------------------------------------------------------------
# Involution


class Involution2d(nn.Module):
    """holocron.nn.Involution2d: convolution with kernels generated from the input at each position.

    Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition", CVPR 2021.

    The kernel source (x, average-pooled by ``stride`` when stride > 1) goes through ``reduce``
    (1x1 conv, C -> C / reduction_ratio) and ``span`` (1x1 conv -> K*K*groups, channel g*K*K + i*K + j;
    no BN or ReLU between them, as upstream), then :func:`jaxenc.kernels.involution` applies those
    kernels (``impl``: "auto" = Pallas kernels on a GPU verified in
    ``kernels/verified.json``, XLA elsewhere; "pallas"; "xla").
    Shapes: x (N, H, W, C) -> (N, floor(H / stride), floor(W / stride), C); the padding must give the
    involution that output size, as upstream requires (padding = dilation * (kernel_size - 1) // 2
    for odd kernels and even sizes; upstream's other working combinations work too).
    """

    in_channels: int
    kernel_size: int
    padding: int | tuple[int, int] = 0
    stride: int | tuple[int, int] = 1
    groups: int = 1
    dilation: int | tuple[int, int] = 1
    reduction_ratio: float = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "Involution2d"
        check_rank(x, 4, "N, H, W, C", where)
        c = check_channels(x, self.in_channels, where)
        k = check_positive_int(self.kernel_size, "kernel_size", where)
        (_, _), stride, padding, dilation = conv_args(
            k, self.stride, self.padding, self.dilation, where
        )
        groups = check_positive_int(self.groups, "groups", where)
        check_divisible(c, groups, "in_channels", "groups", where)
        ratio = self.reduction_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or ratio <= 0
            or c % ratio
        ):
            raise ValueError(
                f"{where}: reduction_ratio must be a positive number dividing in_channels={c}, got {ratio!r}"
            )
        n, h, w, _ = x.shape
        # The kernels are generated on torch's AvgPool2d(stride, stride) grid (floor(H / stride)); the
        # involution's own output grid must coincide with it.
        pooled_hw = (h // stride[0], w // stride[1])
        ho, wo = conv_output_hw(x.shape, (k, k), stride, padding, dilation, where)
        if (ho, wo) != pooled_hw:
            hint = tuple(d * (k - 1) // 2 for d in dilation)
            raise ValueError(
                f"{where}: with kernel_size={k}, padding={padding}, dilation={dilation}, stride={stride} the "
                f"involution output is {ho}x{wo} but the kernels are generated at {pooled_hw[0]}x{pooled_hw[1]} "
                f"(floor(H/stride) x floor(W/stride)) for input shape {tuple(x.shape)}; use "
                f"padding={hint[0] if hint[0] == hint[1] else hint}"
                + ("" if k % 2 else " with an odd kernel_size")
            )

        source = x
        if stride != (1, 1):
            cropped = x[:, : ho * stride[0], : wo * stride[1]].astype(jnp.float32)
            source = (
                cropped.reshape(n, ho, stride[0], wo, stride[1], c)
                .mean(axis=(2, 4))
                .astype(x.dtype)
            )
        common = dtype_kwargs(self)
        kernels = Conv2d(int(c // ratio), 1, name="reduce", **common)(source)
        kernels = Conv2d(k * k * groups, 1, name="span", **common)(kernels)
        kernels = kernels.reshape(n, ho, wo, groups, k, k)
        compute = self.dtype or jnp.result_type(x, self.param_dtype)
        return involution(
            x.astype(compute),
            kernels,
            kernel_size=k,
            stride=stride,
            padding=padding,
            dilation=dilation,
            impl=self.impl,
        )
