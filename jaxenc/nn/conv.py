"""Convolution variants of holocron.nn (pylocron 0.3.0), NHWC: NormConv2d, Add2d, SlimConv2d, PyConv2d,
Involution2d, and the functional ops ``norm_conv2d``, ``add2d``, ``involution``.

Parameter names follow the torch modules, so :func:`jaxenc.port.torch_to_flax` maps an upstream
``state_dict`` directly (``weight``/``bias`` of NormConv2d and Add2d are the Flax ``kernel``/``bias``;
submodules carry the torch attribute names, PyConv2d's levels are ``"0"``, ``"1"``, ...).

Deliberate differences from upstream (docs/DESIGN.md, "Decisions on upstream bugs"):
- NormConv2d / Add2d honour ``groups``: each group's window (C_in/groups * kh * kw values) is
  normalised by its own statistics and compared with that group's filters. Upstream accepts
  ``groups`` but ignores it and fails for groups > 1.
- NormConv2d and Add2d(normalize_slices=True) are differentiable with respect to their input;
  upstream normalises the unfolded windows in place, so autograd fails there whenever the input
  requires a gradient (any layer but the first).
- Invalid configurations that upstream turns into a shape error deep in the forward pass (or,
  for PyConv2d, into silently fewer output channels) raise a ValueError naming the argument.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxenc.kernels.involution_op import involution, strided_taps
from jaxenc.nn.module_utils import cast_input
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.regularization import DropBlock2D
from jaxenc.nn.torch_compat import (
    Conv2d,
    ConvNdFields,
    conv2d_nhwc,
    conv_args,
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
    "ConvBnAct",
    "Involution2d",
    "NormConv2d",
    "PyConv2d",
    "RFConv2d",
    "SlimConv2d",
    "SplAtConv2d",
    "add2d",
    "involution",
    "norm_conv2d",
    "r_softmax",
    "rSoftMax",
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
    args = _check_window_op(x, weight, bias, stride, padding, dilation, groups, "norm_conv2d")
    stride, padding, dilation, groups = args
    return _window_op(
        x,
        weight,
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        adder=False,
        normalize=True,
        eps=float(eps),
    )


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
    stride, padding, dilation, groups = _check_window_op(
        x, weight, bias, stride, padding, dilation, groups, "add2d"
    )
    return _window_op(
        x,
        weight,
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        adder=True,
        normalize=bool(normalize_slices),
        eps=float(eps),
    )


class NormConv2d(ConvNdFields):
    """holocron.nn.NormConv2d: convolution over windows normalised by their own mean and variance.

    Kim et al., "Normalized Convolutional Neural Network", arXiv:2005.05274. See :func:`norm_conv2d`.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', out_channels), H' as torch's Conv2d.
    Parameters: ``kernel`` (kh, kw, in_channels/groups, out_channels) == torch ``weight``,
    ``bias`` (out_channels). A non-'zeros' ``padding_mode`` pads first, as torch's conv does.
    ``groups`` works (upstream ignores it and fails for groups > 1).
    """

    eps: float = 1e-14
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, args = torch_conv_inputs(self, x)
        return norm_conv2d(x, kernel, bias, eps=self.eps, **args)


class Add2d(ConvNdFields):
    """holocron.nn.Add2d: AdderNet layer, the negative L1 distance between windows and filters.

    Chen et al., "AdderNet: Do We Really Need Multiplications in Deep Learning?", CVPR 2020. See
    :func:`add2d`.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', out_channels). Parameters as
    :class:`NormConv2d`; ``groups`` works.
    """

    normalize_slices: bool = False
    eps: float = 1e-14
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, args = torch_conv_inputs(self, x)
        return add2d(x, kernel, bias, normalize_slices=self.normalize_slices, eps=self.eps, **args)


# --------------------------------------------------------------------------------------------------
# SlimConv2d


class SlimConv2d(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

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
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv_kwargs = dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
            **common,
        )

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


class PyConv2d(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

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
                out_i,
                k_i,
                stride=self.stride,
                padding=pad_i,
                dilation=self.dilation,
                groups=groups_i,
                bias=self.bias,
                padding_mode=self.padding_mode,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=str(i),
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
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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


# --------------------------------------------------------------------------------------------------
# PyTorch-Encoding: RFConv2d, SplAtConv2d (+ rSoftMax), ConvBnAct


def _c_div(a: np.ndarray, b: int) -> np.ndarray:
    """C integer division (truncation toward zero), as the upstream kernel computes counts."""
    return np.sign(a) * (np.abs(a) // b)


def _rectify_axis(size: int, out_size: int, kernel: int, stride: int, pad: int, dilation: int):
    """Upstream's per-axis (pool size, tap count per output position) for one spatial axis.

    Restates ``conv_rectify_cuda_frame``: the window is ``kernel + 2 (dilation - 1)`` long (the
    "effective kernel" ``encoding.functions.rectify`` passes; the true dilated extent only for
    kernel 3), clipped to the padded and then to the unpadded input, and its taps are counted every
    ``dilation`` from the clipped start.
    """
    k_eff = kernel + 2 * (dilation - 1)
    start = np.arange(out_size, dtype=np.int64) * stride - pad
    end = np.minimum(np.minimum(start + k_eff, size + pad), size)
    start = np.maximum(start, 0)
    count = _c_div(end - start - 1, dilation) + 1
    pool = (k_eff - 1) // dilation + 1
    return pool, count


def _rectify_scale(
    in_hw, out_hw, kernel_size, stride, padding, dilation, average_mode: bool, where: str
):
    """The (H_out, W_out) float32 factor RFConv2d multiplies its convolution output with.

    Default mode ``pool / cnt``, ``average_mode`` ``1 / cnt``, with upstream's pool size and count
    (see :class:`RFConv2d`), in float32 as the CUDA kernel computes them.
    """
    pool_h, count_h = _rectify_axis(
        in_hw[0], out_hw[0], kernel_size[0], stride[0], padding[0], dilation[0]
    )
    pool_w, count_w = _rectify_axis(
        in_hw[1], out_hw[1], kernel_size[1], stride[1], padding[1], dilation[1]
    )
    count = count_h[:, None] * count_w[None, :]
    if count.min() < 1:
        raise ValueError(
            f"{where}: padding={tuple(padding)} is so large that some outputs of an input of size "
            f"{tuple(in_hw)} cover no input pixel (kernel_size={tuple(kernel_size)}, dilation={tuple(dilation)}); "
            "the rectification would divide by zero"
        )
    numerator = np.float32(1.0) if average_mode else np.float32(pool_h * pool_w)
    return numerator / count.astype(np.float32)


class RFConv2d(ConvNdFields):
    """PyTorch-Encoding's rectified convolution: a zero-padded conv re-weighted at the borders.

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955 (rectified convolution,
    its section on the border effect of zero padding).

    y = conv(x) + bias (torch ``Conv2d``, parameters ``kernel`` (kh, kw, in/groups, out) == torch
    ``weight`` and ``bias``), then, when ``padding > 0`` or ``average_mode``, every output position p is
    multiplied by ``k_h k_w / cnt(p)`` (default) or ``1 / cnt(p)`` (``average_mode``: every output is
    an average over its valid taps, interior ones included), ``cnt(p)`` being the number of kernel
    taps inside the unpadded input. Interior outputs are unchanged in the default mode; border
    outputs are scaled up as if the padded taps had carried the mean of the real ones. The factors
    depend only on static shapes and are precomputed (numpy); the gradient is scaled the same way.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', out_channels), H' as torch's Conv2d.

    Upstream's numbers are reproduced exactly, including its count quirk: it counts taps in a window
    of ``k + 2 (dilation - 1)`` (exact only for ``k = 3``) starting at the clipped window start, with
    ``pool = ((k + 2(d - 1) - 1) // d + 1)²`` in place of ``k²``. So with dilation 1 the factor is
    exactly ``k² / cnt`` for every kernel size; with dilation > 1 and ``k != 3`` (e.g. k = 5, d = 2:
    window 7 instead of 9, pool 16 instead of 25) the border factors are not ``k² / cnt`` (and
    ``k = 1`` with dilation > 1 counts phantom taps); for ``k = 3`` they are exact whenever the input
    is at least ``2 * dilation`` along the axis (smaller inputs clip a window at both ends and
    miscount). A non-'zeros' ``padding_mode`` pads first and is still rectified as if the padding
    were zeros (as upstream). Upstream's CPU kernel loops over the INPUT channels when it rescales
    the output (wrong whenever in_channels != out_channels); this follows its CUDA kernel.
    """

    average_mode: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "RFConv2d"
        check_rank(x, 4, "N, H, W, C", where)
        kernel_size, stride, padding, dilation = conv_args(
            self.kernel_size, self.stride, self.padding, self.dilation, where
        )
        in_hw = tuple(x.shape[1:3])
        out_hw = conv_output_hw(x.shape, kernel_size, stride, padding, dilation, where)
        x, kernel, bias, args = torch_conv_inputs(self, x)
        y = conv2d_nhwc(x, kernel, bias, **args)
        if padding == (0, 0) and not self.average_mode:
            return y
        scale = _rectify_scale(
            in_hw, out_hw, kernel_size, stride, padding, dilation, self.average_mode, where
        )
        acc = jnp.promote_types(y.dtype, jnp.float32)
        return (y.astype(acc) * scale[:, :, None]).astype(y.dtype)


def r_softmax(x: jax.Array, radix: int, cardinality: int) -> jax.Array:
    """Split-attention weights over the last axis (ResNeSt's rSoftMax), radix-major out.

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955.

    x (..., R*C) with the channels ordered [cardinal group g][split r][c'] (a grouped 1x1 conv's
    output): radix > 1 applies a softmax over the R splits of each (g, c') and returns the channels
    ordered [r][g][c']; radix == 1 is a sigmoid (an SE block). Computed in float32, returned in x's
    dtype, with x's shape (upstream flattens to (B, R*C)).
    """
    where = "rSoftMax"
    radix = check_positive_int(radix, "radix", where)
    cardinality = check_positive_int(cardinality, "cardinality", where)
    x = jnp.asarray(x)
    a = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if radix == 1:
        return jax.nn.sigmoid(a).astype(x.dtype)
    check_divisible(x.shape[-1], radix * cardinality, "the last axis", "radix * cardinality", where)
    lead = x.shape[:-1]
    a = a.reshape(*lead, cardinality, radix, -1)
    a = jax.nn.softmax(a, axis=-2)
    return jnp.swapaxes(a, -3, -2).reshape(x.shape).astype(x.dtype)


class rSoftMax(nn.Module):  # noqa: N801 (upstream's class name)
    """Module form of :func:`r_softmax` (PyTorch-Encoding's ``rSoftMax(radix, cardinality)``).

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955.

    Shapes: (..., R*C) -> (..., R*C), in ``dtype`` when given. No parameters.
    """

    radix: int
    cardinality: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        return r_softmax(cast_input(x, self.dtype), self.radix, self.cardinality)


class SplAtConv2d(nn.Module):
    """Split-Attention convolution (ResNeSt), PyTorch-Encoding's ``SplAtConv2d``.

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955.

    ``u = relu(dropblock(bn0(conv(x))))`` with ``conv`` a k x k convolution in -> channels*radix with
    ``groups*radix`` groups (radix-major output: channel r*channels + c, group r*groups + g; an
    :class:`RFConv2d` when ``rectify`` and padding > 0); the R splits u_r (channels each) are summed and
    average-pooled, ``fc1`` (1x1, channels -> inter = max(in_channels*radix // reduction_factor, 32),
    ``groups`` groups) -> ``bn1`` -> relu -> ``fc2`` (1x1, inter -> channels*radix) -> :func:`r_softmax`
    give per-split weights a_r, and the output is sum_r a_r * u_r.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', channels), H' as the conv's. Submodules ``conv``,
    ``bn0``, ``fc1``, ``bn1``, ``fc2``, ``dropblock``, ``rsoftmax`` as upstream, so converting a torch
    state_dict is a plain OIHW -> HWIO transpose. ``group_width`` (upstream's later keyword) sets the
    conv's groups to channels*radix // group_width. ``padding_mode`` is upstream's ``**kwargs`` to the conv.

    ``norm_layer``: None (no bn0/bn1, as upstream's ``use_bn``) or a callable such that
    ``norm_layer(num_features, name=...)`` builds a module called as ``bn(x, train=train)``, e.g.
    :class:`jaxenc.nn.BatchNorm` or a ``functools.partial`` of it; training with it needs N > 1 (bn1
    normalises one value per sample). ``dropblock_prob > 0`` adds ``DropBlock2D(dropblock_prob, 3)``
    (:class:`jaxenc.nn.regularization.DropBlock2D`, constant probability).
    ``__call__(x, train=False)``.

    Differences from upstream: ``norm_layer=None`` works (upstream calls it and fails); the dropblock
    works without ``reset_dropblock`` (upstream asserts it was called).
    """

    in_channels: int
    channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = (1, 1)
    padding: int | tuple[int, int] = (0, 0)
    dilation: int | tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    radix: int = 2
    reduction_factor: int = 4
    group_width: int | None = None
    rectify: bool = False
    rectify_avg: bool = False
    norm_layer: Callable[..., nn.Module] | None = None
    dropblock_prob: float = 0.0
    padding_mode: str = "zeros"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _conv_groups(
        self, c_in: int, channels: int, radix: int, cardinality: int, where: str
    ) -> int:
        if self.group_width is None:
            total = cardinality * radix
        else:
            width = check_positive_int(self.group_width, "group_width", where)
            check_divisible(
                channels // width, cardinality, "channels // group_width", "groups", where
            )
            check_divisible(c_in, width, "in_channels", "group_width", where)
            check_divisible(channels * radix, width, "channels * radix", "group_width", where)
            total = channels * radix // width
        check_divisible(c_in, total, "in_channels", "the conv's groups (groups * radix)", where)
        return total

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "SplAtConv2d"
        check_rank(x, 4, "N, H, W, C", where)
        c_in = check_channels(x, self.in_channels, where)
        kernel_size, stride, padding, dilation = conv_args(
            self.kernel_size, self.stride, self.padding, self.dilation, where
        )
        channels = check_positive_int(self.channels, "channels", where)
        radix = check_positive_int(self.radix, "radix", where)
        cardinality = check_positive_int(self.groups, "groups", where)
        reduction = check_positive_int(self.reduction_factor, "reduction_factor", where)
        check_divisible(channels, cardinality, "channels", "groups", where)
        inter = max(c_in * radix // reduction, 32)
        inter_name = "inter_channels (max(in_channels * radix // reduction_factor, 32))"
        check_divisible(inter, cardinality, inter_name, "groups", where)
        conv_groups = self._conv_groups(c_in, channels, radix, cardinality, where)
        if self.norm_layer is not None and not callable(self.norm_layer):
            raise TypeError(
                f"{where}: norm_layer must be None or a callable building a norm module, got {self.norm_layer!r}"
            )
        drop = self.dropblock_prob
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop <= 1.0:
            raise ValueError(
                f"{where}: dropblock_prob must be a probability in [0, 1], got {drop!r}"
            )

        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv_kwargs = dict(
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=conv_groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
            name="conv",
            **common,
        )
        if self.rectify and padding != (0, 0):
            conv = RFConv2d(
                c_in, channels * radix, kernel_size, average_mode=self.rectify_avg, **conv_kwargs
            )
        else:
            conv = Conv2d(channels * radix, kernel_size, in_channels=c_in, **conv_kwargs)
        u = conv(x)
        if self.norm_layer is not None:
            u = self.norm_layer(channels * radix, name="bn0")(u, train=train)
        if drop > 0.0:
            u = DropBlock2D(drop, 3, name="dropblock")(u, train=train)
        u = jax.nn.relu(u)
        compute = u.dtype
        n, h, w, _ = u.shape
        acc = jnp.promote_types(compute, jnp.float32)
        splits = u.reshape(n, h, w, radix, channels).astype(acc)  # radix-major channels

        gap = jnp.mean(jnp.sum(splits, axis=3), axis=(1, 2), keepdims=True).astype(compute)
        gap = Conv2d(inter, 1, groups=cardinality, in_channels=channels, name="fc1", **common)(gap)
        if self.norm_layer is not None:
            gap = self.norm_layer(inter, name="bn1")(gap, train=train)
        gap = jax.nn.relu(gap)
        atten = Conv2d(channels * radix, 1, groups=cardinality, name="fc2", **common)(gap)
        atten = rSoftMax(radix, cardinality, name="rsoftmax")(atten)
        atten = atten.reshape(n, 1, 1, radix, channels).astype(acc)
        return jnp.sum(atten * splits, axis=3).astype(compute)


class ConvBnAct(nn.Module):
    """PyTorch-Encoding's ``ConvBnAct``: conv (plain, rectified or split-attention), BatchNorm, ReLU.

    Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955 (the building block of its
    stems and heads).

    radix == 0: ``conv`` (a torch Conv2d, or :class:`RFConv2d` with ``average_mode=rectify_avg`` when
    ``rectify``), then ``bn`` (:class:`jaxenc.nn.BatchNorm`, whatever ``norm_layer`` is: upstream always
    uses nn.BatchNorm2d here) and ``relu`` when ``act``. radix > 0: only ``conv`` =
    :class:`SplAtConv2d` (with ``radix``, ``rectify``, ``rectify_avg``, ``group_width`` and ``norm_layer``);
    upstream adds no BN or activation after it. Submodule names as the upstream nn.Sequential.

    Shapes: x (N, H, W, in_channels) -> (N, H', W', out_channels). ``__call__(x, train=False)``.
    """

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    radix: int = 0
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    rectify: bool = False
    rectify_avg: bool = False
    group_width: int | None = None
    act: bool = True
    norm_layer: Callable[..., nn.Module] | None = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "ConvBnAct"
        if isinstance(self.radix, bool) or not isinstance(self.radix, int) or self.radix < 0:
            raise ValueError(
                f"{where}: radix must be a non-negative integer (0: no split attention), got {self.radix!r}"
            )
        conv_kwargs = dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )
        in_out = (self.in_channels, self.out_channels, self.kernel_size)
        if self.radix > 0:
            split = dict(radix=self.radix, rectify=self.rectify, rectify_avg=self.rectify_avg)
            return SplAtConv2d(
                *in_out,
                norm_layer=self.norm_layer,
                group_width=self.group_width,
                **split,
                **conv_kwargs,
            )(x, train=train)
        if self.rectify:
            y = RFConv2d(*in_out, average_mode=self.rectify_avg, **conv_kwargs)(x)
        else:
            y = Conv2d(
                self.out_channels, self.kernel_size, in_channels=self.in_channels, **conv_kwargs
            )(x)
        y = BatchNorm(self.out_channels, name="bn", dtype=self.dtype)(y, train=train)
        return jax.nn.relu(y) if self.act else y
