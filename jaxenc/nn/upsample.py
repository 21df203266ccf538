"""Sub-pixel upsampling, NHWC: torch's ``pixel_shuffle`` and MSG-Net's UpsampleConv2d.

Zhang & Dana, arXiv:1703.06953. UpsampleConv2d can be constructed (upstream's ``reset_parameters``
raises NameError) and is initialised as upstream intends.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.torch_compat import (
    ConvGeometry,
    conv2d_nhwc,
    conv_args,
    conv_output_size,
    torch_uniform_init,
)
from jaxenc.validation import check_channels, check_divisible, check_positive_int, check_rank

Dtype = Any

__all__ = ["UpsampleConv2d", "pixel_shuffle"]


def pixel_shuffle(x: jax.Array, upscale_factor: int) -> jax.Array:
    """torch's ``pixel_shuffle`` in NHWC: channel ``c·s² + i·s + j`` -> pixel ``(h·s + i, w·s + j)``, channel c.

    Shapes: (B, H, W, C·s²) -> (B, H·s, W·s, C).
    """
    where = "pixel_shuffle"
    x = jnp.asarray(x)
    check_rank(x, 4, "B, H, W, C", where)
    s = check_positive_int(upscale_factor, "upscale_factor", where)
    b, h, w, cs = x.shape
    check_divisible(cs, s * s, "channels", "upscale_factor²", where)
    y = x.reshape(b, h, w, cs // (s * s), s, s)
    return y.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * s, w * s, cs // (s * s))


class UpsampleConv2d(ConvGeometry, DtypeFields):
    """MSG-Net's upsampling convolution (Zhang & Dana, arXiv:1703.06953): conv to out·s² channels, pixel shuffle.

    An integer-stride convolution producing s×s outputs per window, instead of a transposed conv
    (no checkerboard artifacts). Parameters as upstream's torch ``weight`` (out·s², in/groups, kh, kw)
    and ``bias`` (out·s²), here ``kernel`` (kh, kw, in/groups, out·s²) and ``bias``, both initialised
    U(±1/sqrt(in_channels·kh·kw)) as upstream (its fan-in ignores ``groups``). Channel
    ``c·s² + i·s + j`` of the convolution becomes output channel c at (h·s + i, w·s + j), as torch's
    ``pixel_shuffle``.

    Shapes: (B, H, W, in_channels) -> (B, s·H_conv, s·W_conv, out_channels), H_conv the torch conv
    output size ``(H + 2·padding - dilation·(k - 1) - 1) // stride + 1``.
    """

    groups: int = 1
    scale_factor: int = 1
    bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "UpsampleConv2d"
        x = jnp.asarray(x)
        check_rank(x, 4, "N, H, W, C", where)
        c_in = check_positive_int(self.in_channels, "in_channels", where)
        check_channels(x, c_in, where)
        c_out = check_positive_int(self.out_channels, "out_channels", where)
        groups = check_positive_int(self.groups, "groups", where)
        s = check_positive_int(self.scale_factor, "scale_factor", where)
        check_divisible(c_in, groups, "in_channels", "groups", where)
        check_divisible(c_out, groups, "out_channels", "groups", where)
        (kh, kw), stride, (ph, pw), dilation = conv_args(
            self.kernel_size, self.stride, self.padding, self.dilation, where
        )
        sizes = zip("HW", x.shape[1:3], (kh, kw), stride, (ph, pw), dilation)
        for axis, size, k, st, p, d in sizes:
            if conv_output_size(size, k, st, p, d) < 1:
                raise ValueError(
                    f"{where}: input {axis}={size} is smaller than the dilated kernel (kernel_size={(kh, kw)}, "
                    f"dilation={dilation}, padding={(ph, pw)})"
                )
        init = torch_uniform_init(c_in * kh * kw)
        kernel = self.param(
            "kernel", init, (kh, kw, c_in // groups, c_out * s * s), self.param_dtype
        )
        bias = self.param("bias", init, (c_out * s * s,), self.param_dtype) if self.bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d_nhwc(
            x, kernel, bias, stride=stride, padding=(ph, pw), dilation=dilation, groups=groups
        )
        return pixel_shuffle(y, s)
