"""Flax linen layers (NHWC images, (B, N, D) tokens) with torch-compatible numerics.

One module per family: ``activation``, ``conv``, ``attention``, ``norm``, ``pooling``,
``regularization``; ``torch_compat`` holds the torch-equivalent primitives they share.
"""
from jaxenc.nn.activation import FReLU, HardMish, NLReLU, hard_mish, nl_relu
from jaxenc.nn.attention import SAM, DimAttention, LambdaLayer, TripletAttention
from jaxenc.nn.conv import Add2d, Involution2d, NormConv2d, PyConv2d, SlimConv2d, add2d, involution, norm_conv2d
from jaxenc.nn.norm import BatchNorm, batch_moments
from jaxenc.nn.pooling import (
    SPP,
    BlurPool2d,
    ConcatDownsample2d,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    ZPool,
    binomial_taps,
    concat_downsample2d,
    z_pool,
)
from jaxenc.nn.regularization import DropBlock2d, drop_block2d, dropblock_seed_rate
from jaxenc.nn.torch_compat import Conv2d, pad_nhwc

__all__ = [
    # activation
    "FReLU", "HardMish", "NLReLU", "hard_mish", "nl_relu",
    # attention
    "SAM", "DimAttention", "LambdaLayer", "TripletAttention",
    # conv
    "Add2d", "Involution2d", "NormConv2d", "PyConv2d", "SlimConv2d", "add2d", "involution", "norm_conv2d",
    # norm
    "BatchNorm", "batch_moments",
    # pooling
    "SPP", "BlurPool2d", "ConcatDownsample2d", "GlobalAvgPool2d", "GlobalMaxPool2d", "ZPool", "binomial_taps",
    "concat_downsample2d", "z_pool",
    # regularization
    "DropBlock2d", "drop_block2d", "dropblock_seed_rate",
    # torch_compat
    "Conv2d", "pad_nhwc",
]
