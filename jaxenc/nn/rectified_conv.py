"""PyTorch-Encoding's rectified convolution RFConv2d, NHWC.

Zhang et al., "ResNeSt: Split-Attention Networks", arXiv:2004.08955 (its section on the border effect
of zero padding). Upstream's CUDA kernel numbers, count quirk included (see :class:`RFConv2d`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.torch_compat import ConvNdFields, conv2d_nhwc, conv_args, torch_conv_inputs
from jaxenc.validation import check_rank, conv_output_hw

Dtype = Any

__all__ = ["RFConv2d"]


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


class RFConv2d(ConvNdFields, DtypeFields):
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
