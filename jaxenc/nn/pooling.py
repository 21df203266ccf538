"""Pooling and downsampling layers from holocron.nn, NHWC: ZPool, ConcatDownsample2d,
GlobalAvgPool2d, GlobalMaxPool2d, BlurPool2d, SPP."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import cast_input
from jaxenc.nn.torch_compat import pad_nhwc
from jaxenc.validation import check_channels, check_divisible, check_positive_int, check_rank

Dtype = Any

__all__ = [
    "SPP",
    "BlurPool2d",
    "ConcatDownsample2d",
    "GlobalAvgPool2d",
    "GlobalMaxPool2d",
    "ZPool",
    "binomial_taps",
    "concat_downsample2d",
    "z_pool",
]


def z_pool(x: jax.Array, dim: int = -1) -> jax.Array:
    """Concatenate max and mean over ``dim``, max first: size 2 along ``dim``.

    Misra et al., "Rotate to Attend: Convolutional Triplet Attention Module", WACV 2021.
    Shapes: x (..., C) with the default ``dim=-1`` (the NHWC channel axis) -> (..., 2).
    """
    dim = dim % x.ndim if -x.ndim <= dim < x.ndim else _bad_dim(x, dim)
    return jnp.concatenate(
        [
            jnp.max(x, axis=dim, keepdims=True),
            jnp.mean(x, axis=dim, keepdims=True, dtype=jnp.float32).astype(x.dtype),
        ],
        axis=dim,
    )


def _bad_dim(x, dim):
    raise ValueError(
        f"ZPool: dim={dim} is out of range for an input of rank {x.ndim} (shape {tuple(x.shape)})"
    )


class ZPool(nn.Module):
    """holocron.nn.ZPool: [max, mean] over ``dim``. NHWC: the default ``dim=-1`` pools channels.

    Shapes: (N, H, W, C) -> (N, H, W, 2).
    """

    dim: int = -1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return z_pool(x, self.dim)


# --- downsampling and global pooling --------------------------------------------------------------


def concat_downsample2d(x: jax.Array, scale_factor: int) -> jax.Array:
    """Loss-less space-to-depth downsampling: s x s neighbourhoods are stacked on the channel axis.

    Redmon & Farhadi, "YOLO9000: Better, Faster, Stronger", CVPR 2017 (the passthrough layer).

    Shapes: (N, H, W, C) -> (N, H / s, W / s, s * s * C). Output channel ``(i * s + j) * C + c``
    holds ``x[:, i::s, j::s, c]``: the channel order of upstream's NCHW output.
    Raises ValueError when H or W is not divisible by ``scale_factor`` (upstream: AssertionError).
    """
    where = "concat_downsample2d"
    x = jnp.asarray(x)
    check_rank(x, 4, "N, H, W, C", where)
    s = check_positive_int(scale_factor, "scale_factor", where)
    n, h, w, c = x.shape
    check_divisible(h, s, "height", "scale_factor", where)
    check_divisible(w, s, "width", "scale_factor", where)
    x = x.reshape(n, h // s, s, w // s, s, c)
    # (N, H/s, i, W/s, j, C) -> (N, H/s, W/s, i, j, C): flattening (i, j, C) gives (i*s + j)*C + c.
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // s, w // s, s * s * c)


class ConcatDownsample2d(DtypeFields):
    """holocron.nn.ConcatDownsample2d(scale_factor): see :func:`concat_downsample2d`.

    Redmon & Farhadi, YOLO9000, CVPR 2017. Shapes: (N, H, W, C) -> (N, H / s, W / s, s * s * C).
    No parameters. (Upstream's TorchScript twin ``ConcatDownsample2dJit`` has no JAX analogue:
    ``jax.jit`` covers it.)
    """

    scale_factor: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return concat_downsample2d(cast_input(x, self.dtype), self.scale_factor)


def _global_pool(x: jax.Array, flatten: bool, reduce, where: str) -> jax.Array:
    check_rank(x, 4, "N, H, W, C", where)
    y = reduce(x)
    return y if flatten else y[:, None, None, :]


class GlobalAvgPool2d(DtypeFields):
    """holocron.nn.GlobalAvgPool2d(flatten=False): mean over H and W.

    Ridnik et al., "TResNet: High Performance GPU-Dedicated Architecture", WACV 2021.
    Shapes: (N, H, W, C) -> (N, 1, 1, C), or (N, C) with ``flatten=True``. The sum is taken in
    float32 (bfloat16 inputs included) and the result cast back to the compute dtype.
    """

    flatten: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = cast_input(x, self.dtype)
        acc = jnp.promote_types(x.dtype, jnp.float32)
        return _global_pool(
            x,
            self.flatten,
            lambda v: jnp.mean(v, axis=(1, 2), dtype=acc).astype(v.dtype),
            "GlobalAvgPool2d",
        )


class GlobalMaxPool2d(DtypeFields):
    """holocron.nn.GlobalMaxPool2d(flatten=False): max over H and W.

    Ridnik et al., "TResNet: High Performance GPU-Dedicated Architecture", WACV 2021.
    Shapes: (N, H, W, C) -> (N, 1, 1, C), or (N, C) with ``flatten=True``.
    """

    flatten: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _global_pool(
            cast_input(x, self.dtype),
            self.flatten,
            lambda v: jnp.max(v, axis=(1, 2)),
            "GlobalMaxPool2d",
        )


# --- blur pooling ----------------------------------------------------------------------------------


def binomial_taps(kernel_size: int) -> np.ndarray:
    """1-D binomial filter: the coefficients of (1/2 + z/2)^(k-1), in float64 (k=3: [1/4, 1/2, 1/4])."""
    taps = np.array([math.comb(kernel_size - 1, i) for i in range(kernel_size)], dtype=np.float64)
    return taps / 2.0 ** (kernel_size - 1)


class BlurPool2d(DtypeFields):
    """holocron.nn.BlurPool2d(channels, kernel_size=3, stride=2): anti-aliased downsampling.

    Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019.

    Reflection-pads H and W by ((stride - 1) + (kernel_size - 1)) // 2 on every side, then applies the
    k x k binomial filter (outer product of :func:`binomial_taps`, built in float64 and cast to the
    compute dtype) to every channel separately with the given stride.
    Shapes: (N, H, W, C) -> (N, H', W', C), C == ``channels``, H' = (H + 2 pad - k) // stride + 1
    (5x5 with k3 s2 -> 3x3; 6x6 with k5 s2 -> 3x3). No parameters (the filter is a constant).
    """

    channels: int
    kernel_size: int = 3
    stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "BlurPool2d"
        k, s = self.kernel_size, self.stride
        if isinstance(k, bool) or not isinstance(k, int) or k <= 1:
            raise ValueError(f"{where}: kernel_size must be an integer > 1, got {k!r}")
        check_positive_int(s, "stride", where)
        check_positive_int(self.channels, "channels", where)
        x = cast_input(x, self.dtype)
        check_rank(x, 4, "N, H, W, C", where)
        c = check_channels(x, self.channels, where, name="channels")
        pad = ((s - 1) + (k - 1)) // 2
        if pad >= x.shape[1] or pad >= x.shape[2]:
            raise ValueError(
                f"{where}: reflection padding {pad} (kernel_size={k}, stride={s}) needs height and width > "
                f"{pad}, got input shape {tuple(x.shape)}"
            )
        x = pad_nhwc(x, (pad, pad), "reflect", where)
        taps = binomial_taps(k)
        kernel = np.broadcast_to(np.outer(taps, taps)[:, :, None, None], (k, k, 1, c))
        return jax.lax.conv_general_dilated(
            x,
            jnp.asarray(kernel, x.dtype),
            window_strides=(s, s),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
            # A fixed low-pass filter: keep full float32 accuracy on GPUs (no TF32).
            precision=jax.lax.Precision.HIGHEST,
        )


# --- spatial pyramid pooling -----------------------------------------------------------------------


class SPP(DtypeFields):
    """holocron.nn.SPP(kernel_sizes): [x, maxpool_k1(x), maxpool_k2(x), ...] on the channel axis.

    He et al., "Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition",
    ECCV 2014 (the YOLOv3-SPP stride-1 variant). Every max pool has stride 1 and padding k // 2 with
    -inf, so it keeps the spatial size; kernel sizes must therefore be odd.
    Shapes: (N, H, W, C) -> (N, H, W, C * (1 + len(kernel_sizes))). No parameters.
    """

    kernel_sizes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "SPP"
        sizes = tuple(self.kernel_sizes)
        for k in sizes:
            check_positive_int(k, "kernel_sizes[...]", where)
            if k % 2 == 0:
                raise ValueError(
                    f"{where}: kernel_sizes must be odd (stride 1 and padding k // 2 keep the spatial size only "
                    f"for odd k), got {list(sizes)}"
                )
        x = cast_input(x, self.dtype)
        check_rank(x, 4, "N, H, W, C", where)
        feats = [x]
        for k in sizes:
            p = k // 2
            feats.append(
                jax.lax.reduce_window(
                    x,
                    np.array(
                        -np.inf, x.dtype
                    ),  # a numpy constant: a jnp one breaks jit(grad) linearisation
                    jax.lax.max,
                    (1, k, k, 1),
                    (1, 1, 1, 1),
                    ((0, 0), (p, p), (p, p), (0, 0)),
                )
            )
        return jnp.concatenate(feats, axis=-1)
