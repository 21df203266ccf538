"""jaxenc.nn.conv, PyTorch-Encoding family: RFConv2d, SplAtConv2d (+ rSoftMax / r_softmax), ConvBnAct.

PyTorch-Encoding is not installable (CUDA extensions), so the references below restate its modules
in torch with the upstream attribute names and parameter shapes (upstream encoding/nn/splat.py, rectify.py, customize.py, lib/gpu/rectify_cuda.cu):
their state_dicts convert with ``torch_to_flax`` and ``check_module_parity`` compares values, input
and parameter gradients and BatchNorm statistics. The rectification factors are restated from the
CUDA kernel as a plain per-position loop (independent of jaxenc's vectorised numpy), and checked
against torch's own average pooling where upstream's counts are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import F, _pair, torch
from parity import assert_close, check_module_parity, nchw, nhwc, random_input, randomise_batchnorm

from jaxenc.nn.conv_bn_act import ConvBnAct
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.rectified_conv import RFConv2d
from jaxenc.nn.split_attn import SplAtConv2d, r_softmax, rSoftMax
from jaxenc.port import torch_to_flax

# --------------------------------------------------------------------------------------------------
# Torch references (upstream maths, upstream names)


def _upstream_rectify_factors(in_hw, out_hw, kernel_size, stride, padding, dilation, average):
    """encoding.functions.rectify + conv_rectify_cuda_frame, one output position at a time."""
    # rectify() passes an "effective kernel" k + 2 (d - 1) to the kernel ("assuming kernel_size is 3").
    kh, kw = (k + 2 * (d - 1) for k, d in zip(kernel_size, dilation))
    (h, w), (sh, sw), (ph, pw), (dh, dw) = in_hw, stride, padding, dilation
    pool = ((kh - 1) // dh + 1) * ((kw - 1) // dw + 1)
    out = np.empty(out_hw, np.float32)
    for oh in range(out_hw[0]):
        for ow in range(out_hw[1]):
            hs, ws = oh * sh - ph, ow * sw - pw
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            count = (int((he - hs - 1) / dh) + 1) * (
                int((we - ws - 1) / dw) + 1
            )  # C division truncates
            out[oh, ow] = np.float32(1.0 if average else pool) / np.float32(count)
    return out


class TorchRFConv2d(torch.nn.Conv2d):
    """encoding.nn.RFConv2d (CUDA semantics)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        average_mode=False,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
        )
        self.rectify = average_mode or self.padding[0] > 0 or self.padding[1] > 0
        self.average = average_mode

    def forward(self, x):
        y = super().forward(x)
        if self.rectify:
            f = _upstream_rectify_factors(
                x.shape[-2:],
                y.shape[-2:],
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.average,
            )
            y = y * torch.from_numpy(f)  # the autograd backward scales the gradient the same way
        return y


class TorchRSoftMax(torch.nn.Module):
    def __init__(self, radix, cardinality):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality

    def forward(self, x):
        batch = x.size(0)
        if self.radix > 1:
            x = x.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
            return F.softmax(x, dim=1).reshape(batch, -1)
        return torch.sigmoid(x)


class TorchSplAtConv2d(torch.nn.Module):
    """encoding.nn.SplAtConv2d. Upstream calls norm_layer(...) even when it is None (and crashes);
    here None means no bn0/bn1, which is what its ``use_bn`` flag intends. Its DropBlock2D is the
    identity in eval mode and saves no state, so the reference uses nn.Identity (eval only)."""

    def __init__(
        self,
        in_channels,
        channels,
        kernel_size,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups=1,
        bias=True,
        radix=2,
        reduction_factor=4,
        group_width=None,
        rectify=False,
        rectify_avg=False,
        norm_layer=None,
        dropblock_prob=0.0,
        **kwargs,
    ):
        super().__init__()
        padding = _pair(padding)
        self.rectify = rectify and (padding[0] > 0 or padding[1] > 0)
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix, self.cardinality, self.channels = radix, groups, channels
        self.dropblock_prob = dropblock_prob
        total_groups = groups * radix if group_width is None else channels * radix // group_width
        if self.rectify:
            self.conv = TorchRFConv2d(
                in_channels,
                channels * radix,
                kernel_size,
                stride,
                padding,
                dilation,
                groups=total_groups,
                bias=bias,
                average_mode=rectify_avg,
                **kwargs,
            )
        else:
            self.conv = torch.nn.Conv2d(
                in_channels,
                channels * radix,
                kernel_size,
                stride,
                padding,
                dilation,
                groups=total_groups,
                bias=bias,
                **kwargs,
            )
        self.use_bn = norm_layer is not None
        if self.use_bn:
            self.bn0 = norm_layer(channels * radix)
        self.fc1 = torch.nn.Conv2d(channels, inter_channels, 1, groups=groups)
        if self.use_bn:
            self.bn1 = norm_layer(inter_channels)
        self.fc2 = torch.nn.Conv2d(inter_channels, channels * radix, 1, groups=groups)
        if dropblock_prob > 0.0:
            self.dropblock = torch.nn.Identity()
        self.rsoftmax = TorchRSoftMax(radix, groups)

    def forward(self, x):
        x = self.conv(x)
        if self.use_bn:
            x = self.bn0(x)
        if self.dropblock_prob > 0.0:
            assert not self.training, "the reference DropBlock is eval-only"
            x = self.dropblock(x)
        x = F.relu(x)
        batch, channel = x.shape[:2]
        if self.radix > 1:
            splits = torch.split(x, channel // self.radix, dim=1)
            gap = sum(splits)
        else:
            gap = x
        gap = F.adaptive_avg_pool2d(gap, 1)
        gap = self.fc1(gap)
        if self.use_bn:
            gap = self.bn1(gap)
        gap = F.relu(gap)
        atten = self.rsoftmax(self.fc2(gap)).view(batch, -1, 1, 1)
        if self.radix > 1:
            atten = torch.split(atten, channel // self.radix, dim=1)
            return sum(a * s for a, s in zip(atten, splits))
        return atten * x


class TorchConvBnAct(torch.nn.Sequential):
    """encoding.nn.ConvBnAct."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        radix=0,
        groups=1,
        bias=True,
        padding_mode="zeros",
        rectify=False,
        rectify_avg=False,
        group_width=None,
        act=True,
        norm_layer=torch.nn.BatchNorm2d,
    ):
        super().__init__()
        common = dict(
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )
        if radix > 0:
            conv = TorchSplAtConv2d(
                in_channels,
                out_channels,
                radix=radix,
                rectify=rectify,
                rectify_avg=rectify_avg,
                norm_layer=norm_layer,
                group_width=group_width,
                **common,
            )
        elif rectify:
            conv = TorchRFConv2d(in_channels, out_channels, average_mode=rectify_avg, **common)
        else:
            conv = torch.nn.Conv2d(in_channels, out_channels, **common)
        self.add_module("conv", conv)
        if radix == 0:
            self.add_module("bn", torch.nn.BatchNorm2d(out_channels))
            if act:
                self.add_module("relu", torch.nn.ReLU())


# --------------------------------------------------------------------------------------------------
# rSoftMax


@pytest.mark.parametrize("radix", [1, 2, 4])
@pytest.mark.parametrize("cardinality", [1, 2])
def test_r_softmax_matches_upstream(radix, cardinality):
    channels = 6 * cardinality
    x = random_input((3, radix * channels), seed=radix * 10 + cardinality)
    with torch.no_grad():
        expected = TorchRSoftMax(radix, cardinality)(torch.tensor(x)).numpy()
    assert_close(r_softmax(x, radix, cardinality), expected, what="r_softmax")
    # Module form on the (B, 1, 1, R*C) NHWC attention map keeps the shape.
    y = rSoftMax(radix, cardinality).apply({}, x[:, None, None, :])
    assert y.shape == (3, 1, 1, radix * channels)
    assert_close(y[:, 0, 0], expected, what="rSoftMax")
    if radix > 1:  # radix-major out: the R weights of every (group, channel) sum to one
        np.testing.assert_allclose(np.asarray(y).reshape(3, radix, channels).sum(1), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# RFConv2d

RF_CASES = [(k, s, d, avg) for k in (3, 5) for s in (1, 2) for d in (1, 2) for avg in (False, True)]


@pytest.mark.parametrize("k,stride,dilation,average_mode", RF_CASES)
def test_rfconv2d_parity(k, stride, dilation, average_mode):
    # in != out: upstream's CPU kernel would be wrong here; the CUDA semantics are the reference.
    kwargs = dict(
        in_channels=6,
        out_channels=4,
        kernel_size=k,
        stride=stride,
        padding=dilation * (k - 1) // 2,
        dilation=dilation,
        average_mode=average_mode,
    )
    check_module_parity(
        TorchRFConv2d(**kwargs), RFConv2d(**kwargs), random_input((2, 11, 9, 6), seed=k + stride)
    )


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (
            dict(in_channels=4, out_channels=6, kernel_size=3, padding=0, average_mode=True),
            (2, 8, 7, 4),
        ),
        (dict(in_channels=4, out_channels=6, kernel_size=5, padding=1, stride=2), (1, 13, 10, 4)),
        (
            dict(in_channels=6, out_channels=4, kernel_size=(3, 5), padding=(1, 2), bias=False),
            (2, 7, 9, 6),
        ),
        (dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, groups=2), (2, 7, 8, 8)),
        (
            dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
            (2, 7, 6, 4),
        ),
        (
            dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, stride=2),
            (1, 4, 5, 4),
        ),
        (
            dict(in_channels=4, out_channels=4, kernel_size=3, padding=0),
            (2, 6, 6, 4),
        ),  # no rectification
    ],
)
def test_rfconv2d_parity_more(kwargs, shape):
    check_module_parity(TorchRFConv2d(**kwargs), RFConv2d(**kwargs), random_input(shape, seed=3))


def test_rfconv2d_average_mode_is_a_mean_over_valid_taps():
    # With dilation 1 upstream's counts are exact: a depthwise all-ones kernel in average_mode is
    # torch's avg_pool2d(count_include_pad=False), and the default mode is that times k².
    x = random_input((2, 9, 8, 3), seed=4)
    for k, s in ((3, 1), (5, 2), (7, 1)):
        pad = k // 2
        expected = F.avg_pool2d(torch.tensor(nchw(x)), k, s, pad, count_include_pad=False).numpy()
        params = {"params": {"kernel": jnp.ones((k, k, 1, 3))}}
        for average, factor in ((True, 1.0), (False, k * k)):
            m = RFConv2d(3, 3, k, stride=s, padding=pad, groups=3, bias=False, average_mode=average)
            assert_close(
                m.apply(params, x), nhwc(expected) * factor, what=f"k={k} average={average}"
            )


def test_rfconv2d_interior_unchanged_and_borders_rescaled():
    x = random_input((1, 10, 10, 2), seed=5)
    m = RFConv2d(2, 3, 3, padding=1)
    v = m.init(jax.random.key(0), x)
    y = m.apply(v, x)
    plain = (
        jax.lax.conv_general_dilated(
            x,
            v["params"]["kernel"],
            (1, 1),
            [(1, 1), (1, 1)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        + v["params"]["bias"]
    )
    assert_close(y[:, 1:-1, 1:-1], plain[:, 1:-1, 1:-1], what="interior")
    assert_close(y[:, 0, 0], plain[:, 0, 0] * 9 / 4, what="corner (4 valid taps)")
    assert_close(y[:, 0, 5], plain[:, 0, 5] * 9 / 6, what="edge (6 valid taps)")


def test_rfconv2d_dilated_k5_reproduces_upstream_quirk():
    # k=5, dilation 2: upstream counts taps in a 7-wide window with pool 16 (not 9-wide and 25). At the
    # corner of a 'same' conv it sees 2 x 2 taps (truly 3 x 3): factor 16/4 = 4, not 25/9.
    x = np.ones((1, 12, 12, 1), np.float32)
    m = RFConv2d(1, 1, 5, padding=4, dilation=2, bias=False)
    y = m.apply({"params": {"kernel": jnp.ones((5, 5, 1, 1))}}, x)
    assert float(y[0, 0, 0, 0]) == pytest.approx(9 * 4.0)  # 9 real taps of ones, times 4
    assert float(y[0, 6, 6, 0]) == pytest.approx(25.0)  # interior: factor 16/16


# --------------------------------------------------------------------------------------------------
# SplAtConv2d

_DILATED_R4G2 = dict(
    in_channels=8, channels=16, kernel_size=3, padding=2, dilation=2, radix=4, groups=2, stride=2
)
SPLAT_CASES = [
    # (constructor kwargs, NHWC input shape); radix 1 with groups 1 is in the ConvBnAct and no-norm tests.
    # Batches of >= 3: in training bn1 normalises N values per channel of the pooled attention input;
    # with N = 2 its output is +-1 whatever the input and its gradient divides by a |difference| of two
    # numbers, which amplifies float32 rounding beyond the 1e-4 gradient tolerance.
    # Every radix / cardinality pair runs in training (batch statistics and their running averages),
    # the extreme ones in inference (randomised running statistics) too.
    (
        dict(in_channels=8, channels=16, kernel_size=3, padding=1, radix=1, groups=2),
        (4, 9, 7, 8),
        False,
    ),
    (
        dict(in_channels=8, channels=16, kernel_size=3, padding=1, radix=1, groups=2),
        (4, 9, 7, 8),
        True,
    ),
    # group_width=8: the conv has 32 // 8 = 4 groups, not groups * radix = 2.
    (
        dict(
            in_channels=8, channels=16, kernel_size=3, padding=1, radix=2, stride=2, group_width=8
        ),
        (4, 11, 9, 8),
        True,
    ),
    (
        dict(in_channels=8, channels=16, kernel_size=3, padding=1, radix=2, groups=2, bias=False),
        (4, 9, 7, 8),
        True,
    ),
    (dict(in_channels=8, channels=8, kernel_size=3, padding=1, radix=4), (4, 9, 7, 8), True),
    (_DILATED_R4G2, (4, 9, 9, 8), False),
    (_DILATED_R4G2, (4, 9, 9, 8), True),
]
SPLAT_IDS = [
    f"r{kw['radix']}g{kw.get('groups', 1)}-{'train' if train else 'eval'}-{i}"
    for i, (kw, _, train) in enumerate(SPLAT_CASES)
]


@pytest.mark.parametrize("kwargs,shape,train", SPLAT_CASES, ids=SPLAT_IDS)
def test_splat_parity(kwargs, shape, train):
    torch_module = randomise_batchnorm(TorchSplAtConv2d(**kwargs, norm_layer=torch.nn.BatchNorm2d))
    flax_module = SplAtConv2d(**kwargs, norm_layer=BatchNorm)
    check_module_parity(
        torch_module, flax_module, random_input(shape, seed=len(SPLAT_IDS)), train=train
    )


@pytest.mark.parametrize("rectify_avg,train", [(False, True), (True, False)])
def test_splat_rectify_parity(rectify_avg, train):
    kwargs = dict(
        in_channels=8,
        channels=16,
        kernel_size=3,
        stride=2,
        padding=1,
        radix=2,
        groups=2,
        rectify=True,
        rectify_avg=rectify_avg,
    )
    torch_module = randomise_batchnorm(TorchSplAtConv2d(**kwargs, norm_layer=torch.nn.BatchNorm2d))
    assert isinstance(torch_module.conv, TorchRFConv2d)
    flax_module = SplAtConv2d(**kwargs, norm_layer=BatchNorm)
    check_module_parity(torch_module, flax_module, random_input((4, 9, 7, 8), seed=7), train=train)


def test_splat_rectify_without_padding_is_a_plain_conv():
    # Upstream: rectify only when padding > 0, even with rectify_avg.
    kwargs = dict(in_channels=8, channels=8, kernel_size=3, radix=1, rectify=True, rectify_avg=True)
    x = random_input((4, 9, 7, 8), seed=8)
    torch_module = TorchSplAtConv2d(**kwargs)
    assert not isinstance(torch_module.conv, TorchRFConv2d)
    check_module_parity(torch_module, SplAtConv2d(**kwargs), x)


def test_splat_without_norm_layer_and_with_dropblock_in_eval():
    kwargs = dict(in_channels=8, channels=16, kernel_size=3, padding=1, radix=2, groups=2)
    x = random_input((4, 9, 7, 8), seed=9)
    shapes = jax.eval_shape(
        SplAtConv2d(**kwargs).init, jax.random.key(0), x
    )  # parity: rectify test above
    assert set(shapes) == {"params"} and set(shapes["params"]) == {"conv", "fc1", "fc2"}
    # dropblock_prob > 0: eval parity (upstream saves no DropBlock state; i starts at 0), then training.
    torch_module = randomise_batchnorm(
        TorchSplAtConv2d(**kwargs, norm_layer=torch.nn.BatchNorm2d, dropblock_prob=0.2)
    )
    flax_module = SplAtConv2d(**kwargs, norm_layer=BatchNorm, dropblock_prob=0.2)
    v = check_module_parity(torch_module, flax_module, x)["variables"]
    assert int(v["batch_stats"]["dropblock"]["i"]) == 0
    y, state = flax_module.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
    )
    assert int(state["batch_stats"]["dropblock"]["i"]) == 1
    y_no_drop, _ = SplAtConv2d(**kwargs, norm_layer=BatchNorm).apply(
        {k: {n: t for n, t in c.items() if n != "dropblock"} for k, c in v.items()},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    assert y.shape == y_no_drop.shape and not np.allclose(y, y_no_drop)


def test_splat_conv_weight_is_a_plain_transpose():
    # The radix-major grouped conv keeps torch's layout: conversion is OIHW -> HWIO, nothing else.
    kwargs = dict(in_channels=8, channels=16, kernel_size=3, padding=1, radix=4, groups=2)
    torch_module = TorchSplAtConv2d(**kwargs)
    x = np.zeros((2, 5, 5, 8), np.float32)
    params = torch_to_flax(SplAtConv2d(**kwargs), torch_module.state_dict(), x)["params"]
    for name in ("conv", "fc1", "fc2"):
        weight = getattr(torch_module, name).weight.detach().numpy()
        np.testing.assert_array_equal(
            np.asarray(params[name]["kernel"]), np.transpose(weight, (2, 3, 1, 0))
        )
    assert params["conv"]["kernel"].shape == (3, 3, 8 // (4 * 2), 16 * 4)


def test_splat_output_shape_and_inter_channels():
    m = SplAtConv2d(64, 32, 3, stride=2, padding=1, radix=2, reduction_factor=4)
    v = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 15, 15, 64)))
    assert v["params"]["fc1"]["kernel"].shape == (1, 1, 32, 32)  # max(64*2//4, 32) = 32
    m = SplAtConv2d(256, 64, 3, padding=1, radix=2, reduction_factor=4)
    v = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 8, 8, 256)))
    assert v["params"]["fc1"]["kernel"].shape == (1, 1, 64, 128)  # 256*2//4
    assert m.apply(jax.tree_util.tree_map(jnp.zeros_like, v), jnp.ones((1, 8, 8, 256))).shape == (
        1,
        8,
        8,
        64,
    )


# --------------------------------------------------------------------------------------------------
# ConvBnAct

_CBA = dict(in_channels=8, out_channels=8, kernel_size=3, padding=1)
CBA_CASES = [
    # (constructor kwargs, NHWC input shape, train)
    (_CBA, (2, 9, 7, 8), False),
    (_CBA, (2, 9, 7, 8), True),
    ({**_CBA, "stride": 2, "act": False, "bias": False}, (2, 9, 7, 8), True),
    ({**_CBA, "rectify": True}, (2, 9, 7, 8), False),
    ({**_CBA, "rectify": True, "rectify_avg": True}, (2, 9, 7, 8), True),
    ({**_CBA, "out_channels": 16, "stride": 2, "radix": 2, "groups": 2}, (4, 9, 7, 8), True),
    ({**_CBA, "radix": 1, "rectify": True}, (4, 9, 7, 8), True),
]


@pytest.mark.parametrize("kwargs,shape,train", CBA_CASES)
def test_conv_bn_act_parity(kwargs, shape, train):
    torch_module = randomise_batchnorm(TorchConvBnAct(**kwargs))
    check_module_parity(
        torch_module, ConvBnAct(**kwargs), random_input(shape, seed=11), train=train
    )


def test_conv_bn_act_structure():
    x = jnp.ones((2, 6, 6, 8))
    v = jax.eval_shape(ConvBnAct(8, 16, 3, padding=1).init, jax.random.key(0), x)
    assert set(v["params"]) == {"conv", "bn"} and set(v["params"]["conv"]) == {"kernel", "bias"}
    v = jax.eval_shape(ConvBnAct(8, 16, 3, padding=1, radix=2).init, jax.random.key(0), x)
    assert set(v["params"]) == {"conv"} and {"bn0", "bn1", "fc1", "fc2"} <= set(v["params"]["conv"])
    v = jax.eval_shape(
        ConvBnAct(8, 16, 3, padding=1, rectify=True, act=False, bias=False).init,
        jax.random.key(0),
        x,
    )
    assert set(v["params"]) == {"conv", "bn"} and set(v["params"]["conv"]) == {"kernel"}


# --------------------------------------------------------------------------------------------------
# bfloat16, jit, vmap


BF16_MODULES = [
    (RFConv2d(8, 16, 3, stride=2, padding=1, average_mode=True), False),
    (SplAtConv2d(8, 16, 3, padding=1, radix=2, groups=2, norm_layer=BatchNorm, rectify=True), True),
]


@pytest.mark.parametrize("module,has_train", BF16_MODULES)
def test_bfloat16(module, has_train):
    x = jnp.asarray(
        random_input((4, 9, 7, 8), seed=12)
    )  # N > 2: see SPLAT_CASES on bn1 in training
    v = module.init(jax.random.key(0), x)
    # Compiled (one program per call) rather than eager: the eager parity tests cover op-by-op dispatch.
    f32 = jax.jit(module.apply, static_argnames=("train", "mutable"))
    bf16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply, static_argnames=("train", "mutable"))
    ref = f32(v, x)
    out = bf16(v, x)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, rtol=2e-2, what="bf16 vs f32")
    if has_train:
        out, state = bf16(v, x, train=True, mutable=("batch_stats",))
        ref, _ = f32(v, x, train=True, mutable=("batch_stats",))
        assert out.dtype == jnp.bfloat16
        assert_close(out.astype(jnp.float32), ref, rtol=3e-2, what="bf16 train")
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize(
    "module",
    [
        RFConv2d(8, 8, 3, stride=2, padding=1),
        SplAtConv2d(
            8,
            16,
            3,
            padding=1,
            radix=2,
            groups=2,
            norm_layer=BatchNorm,
            rectify=True,
            rectify_avg=True,
        ),
    ],
)
def test_jit_and_vmap(module):
    xs = jnp.asarray(random_input((3, 4, 9, 7, 8), seed=13))
    v = module.init(jax.random.key(0), xs[0])
    eager = module.apply(v, xs[0])
    assert_close(jax.jit(module.apply)(v, xs[0]), eager, rtol=1e-6, what="jit")
    batched = jax.vmap(module.apply, in_axes=(None, 0))(v, xs)
    looped = jnp.stack([module.apply(v, x) for x in xs])
    assert_close(batched, looped, rtol=1e-5, what="vmap")


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input():
    x = jnp.ones((2, 8, 8, 8))

    def init(module, v):
        return jax.eval_shape(lambda u: module.init(jax.random.key(0), u), v)

    with pytest.raises(
        ValueError, match=r"SplAtConv2d: in_channels=6 but the input has 8 channels"
    ):
        init(SplAtConv2d(6, 16, 3), x)
    with pytest.raises(
        ValueError, match=r"SplAtConv2d: expected x of rank 4 \(N, H, W, C\), got shape \(8, 8, 8\)"
    ):
        init(SplAtConv2d(8, 16, 3), x[0])
    with pytest.raises(ValueError, match=r"SplAtConv2d: channels=15 is not divisible by groups=2"):
        init(SplAtConv2d(8, 15, 3, groups=2), x)
    with pytest.raises(
        ValueError, match=r"SplAtConv2d: in_channels=8 is not divisible by the conv's groups"
    ):
        init(SplAtConv2d(8, 24, 3, radix=3), x)
    with pytest.raises(ValueError, match=r"SplAtConv2d: radix must be a positive integer, got 0"):
        init(SplAtConv2d(8, 16, 3, radix=0), x)
    with pytest.raises(
        ValueError, match=r"SplAtConv2d: in_channels=8 is not divisible by group_width=3"
    ):
        init(SplAtConv2d(8, 12, 3, group_width=3), x)
    with pytest.raises(TypeError, match=r"SplAtConv2d: norm_layer must be None or a callable"):
        init(SplAtConv2d(8, 16, 3, norm_layer="bn"), x)
    with pytest.raises(
        ValueError, match=r"SplAtConv2d: dropblock_prob must be a probability in \[0, 1\], got 1.5"
    ):
        init(SplAtConv2d(8, 16, 3, dropblock_prob=1.5), x)
    with pytest.raises(
        ValueError, match=r"BatchNorm: training needs more than 1 value per feature"
    ):
        m = SplAtConv2d(8, 16, 3, norm_layer=BatchNorm)
        m.apply(m.init(jax.random.key(0), x), x[:1], train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match=r"RFConv2d: in_channels=4 but the input has 8 channels"):
        init(RFConv2d(4, 4, 3), x)
    with pytest.raises(
        ValueError,
        match=r"RFConv2d: the input \(H, W\)=\(8, 8\) is smaller than the dilated kernel",
    ):
        init(RFConv2d(8, 4, 5, dilation=2), x)
    with pytest.raises(
        ValueError,
        match=r"RFConv2d: padding=\(3, 3\) is so large that some outputs .* cover no input",
    ):
        init(RFConv2d(8, 4, 3, padding=3), x)
    with pytest.raises(ValueError, match=r"RFConv2d: out_channels=6 is not divisible by groups=4"):
        init(RFConv2d(8, 6, 3, groups=4), x)
    with pytest.raises(ValueError, match=r"ConvBnAct: radix must be a non-negative integer"):
        init(ConvBnAct(8, 8, 3, radix=-1), x)
    with pytest.raises(
        ValueError, match=r"rSoftMax: the last axis=10 is not divisible by radix \* cardinality=4"
    ):
        r_softmax(jnp.ones((2, 10)), 2, 2)
