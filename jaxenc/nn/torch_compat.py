"""Torch-equivalent primitives in NHWC: Conv2d with torch's arguments and initialisation, padding modes.

Every jaxenc layer that mirrors a torch ``nn.Conv2d`` uses :class:`Conv2d` here, so parameter names
(``kernel`` (kh, kw, C_in/groups, C_out), ``bias`` (C_out)) and the torch -> Flax layout mapping
stay uniform; :mod:`jaxenc.port` relies on that.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxenc._checks import check_divisible, check_positive_int, check_rank, to_pair

Dtype = Any

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad_nhwc(x: jax.Array, padding: tuple[int, int], mode: str = "zeros", where: str = "pad") -> jax.Array:
    """Pad H and W of an NHWC tensor symmetrically with a torch ``padding_mode``.

    Args:
      x: (N, H, W, C).
      padding: (pad_h, pad_w), applied on both sides.
      mode: 'zeros', 'reflect', 'replicate' or 'circular' (torch names).
    Returns:
      (N, H + 2 pad_h, W + 2 pad_w, C).
    """
    if mode not in _PAD_MODES:
        raise ValueError(f"{where}: padding_mode must be one of {tuple(_PAD_MODES)}, got {mode!r}")
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode=_PAD_MODES[mode])


def torch_uniform_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Torch's convolution output length along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class Conv2d(nn.Module):
    """``torch.nn.Conv2d`` in NHWC with the same arguments, defaults and initialisation.

    Shapes: x (N, H, W, C_in) -> (N, H_out, W_out, out_channels), H_out as torch computes it.
    Parameters: ``kernel`` (kh, kw, C_in // groups, out_channels), ``bias`` (out_channels).
    ``in_channels`` is inferred; when given it is checked against the input.
    """

    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    in_channels: int | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "Conv2d"
        check_rank(x, 4, "N, H, W, C", where)
        kh, kw = to_pair(self.kernel_size, "kernel_size", where)
        stride = to_pair(self.stride, "stride", where)
        padding = to_pair(self.padding, "padding", where)
        dilation = to_pair(self.dilation, "dilation", where)
        groups = check_positive_int(self.groups, "groups", where)
        c_in = x.shape[-1]
        if self.in_channels is not None and c_in != self.in_channels:
            raise ValueError(
                f"{where}: in_channels={self.in_channels} but the input has {c_in} channels on its last axis "
                f"(shape {tuple(x.shape)}; jaxenc images are NHWC)"
            )
        check_divisible(c_in, groups, "in_channels", "groups", where)
        check_divisible(self.out_channels, groups, "out_channels", "groups", where)
        fan_in = (c_in // groups) * kh * kw
        kernel = self.param(
            "kernel", torch_uniform_init(fan_in), (kh, kw, c_in // groups, self.out_channels), self.param_dtype
        )
        bias = self.param("bias", torch_uniform_init(fan_in), (self.out_channels,), self.param_dtype) if self.bias else None
        if self.padding_mode != "zeros":
            x = pad_nhwc(x, padding, self.padding_mode, where)
            padding = (0, 0)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=stride,
            padding=[(padding[0], padding[0]), (padding[1], padding[1])],
            rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        if bias is not None:
            y = y + bias
        return y
