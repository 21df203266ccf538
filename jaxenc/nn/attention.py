"""Attention layers from holocron.nn (SAM, TripletAttention, LambdaLayer), NHWC.

Parameter names and layouts follow pylocron 0.3.0 so that :func:`jaxenc.port.torch_to_flax` maps a
torch ``state_dict`` onto them unchanged (spec/holocron_vit_syncbn.md §3.6).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc._checks import check_channels, check_divisible, check_positive_int, check_rank
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.pooling import z_pool
from jaxenc.nn.torch_compat import Conv2d

Dtype = Any

__all__ = ["SAM", "DimAttention", "TripletAttention", "LambdaLayer"]

_NHWC = "N, H, W, C"


class SAM(nn.Module):
    """Spatial attention module: ``x * sigmoid(conv1x1(x))`` with a single-channel gate.

    Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, in the point-wise form of
    Bochkovskiy et al., "YOLOv4: Optimal Speed and Accuracy of Object Detection", 2020.

    Shapes: x (N, H, W, in_channels) -> (N, H, W, in_channels).
    Parameters: ``conv`` (1x1, in_channels -> 1, with bias), torch key ``conv.weight`` / ``conv.bias``.
    """

    in_channels: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_rank(x, 4, _NHWC, "SAM")
        check_channels(x, self.in_channels, "SAM")
        dtype = self.dtype or x.dtype
        gate = jax.nn.sigmoid(
            Conv2d(1, 1, in_channels=self.in_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        )
        return x.astype(dtype) * gate.astype(dtype)


# NHWC axis of each torch dim a DimAttention can attend across (torch dims are NCHW).
_TORCH_DIM_TO_NHWC = {1: 3, 2: 1, 3: 2}


class _Compress(nn.Module):
    """The gate of a DimAttention branch, on a z-pooled (N, R, S, 2) map -> (N, R, S, 1).

    Stands for torch's ``compress`` nn.Sequential(ZPool, Conv2d, BatchNorm2d, Sigmoid): the children
    are named "1" and "2" so that the keys read ``compress.1.weight``, ``compress.2.running_mean``.
    The ZPool (child 0) has no parameters and is applied by the caller, on the unrotated input.
    """

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Conv2d(1, 7, padding=3, bias=False, in_channels=2, name="1", **kw)(pooled)
        # torch momentum 0.01 == Flax decay 0.99
        y = BatchNorm(1, momentum=0.99, epsilon=1e-5, name="2", **kw)(y, train=train)
        return jax.nn.sigmoid(y)


class DimAttention(nn.Module):
    """One rotated branch of triplet attention: a 7x7 gate computed after z-pooling one axis.

    Misra et al., "Rotate to Attend: Convolutional Triplet Attention Module", WACV 2021.

    ``dim`` is the TORCH (NCHW) dim, as upstream: 1 = channels, 2 = height, 3 = width. Upstream moves
    ``dim`` to the channel position (``transpose(dim, 1)``) and convolves the remaining two axes in
    their order there: dim 1 over (H, W), dim 2 over (C, W), dim 3 over (H, C). Here the z-pooled map
    (size 2 on the pooled axis) is rotated into that layout, so converted torch weights give the same
    numbers, and the gate is rotated back and broadcast over the pooled axis.

    Shapes: x (N, H, W, C) -> (N, H, W, C). Parameters: ``compress.1`` (7x7 conv 2 -> 1, no bias),
    ``compress.2`` (BatchNorm over 1 feature, torch momentum 0.01).
    """

    dim: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.dim not in _TORCH_DIM_TO_NHWC:
            raise ValueError(
                f"DimAttention: dim must be 1, 2 or 3 (torch NCHW dims: channels, height, width), got {self.dim!r}"
            )
        check_rank(x, 4, _NHWC, "DimAttention")
        dtype = self.dtype or x.dtype
        axis = _TORCH_DIM_TO_NHWC[self.dim]
        pooled = z_pool(x.astype(dtype), dim=axis)
        # Swapping the pooled axis with the channel axis yields NHWC whose (H, W) are torch's (row,
        # col) after transpose(dim, 1); the swap is its own inverse, so it also rotates the gate back.
        pooled = jnp.swapaxes(pooled, axis, 3)
        gate = _Compress(dtype=self.dtype, param_dtype=self.param_dtype, name="compress")(pooled, train=train)
        gate = jnp.swapaxes(gate, axis, 3)
        return x.astype(dtype) * gate.astype(dtype)


class TripletAttention(nn.Module):
    """Triplet attention: the mean of three DimAttention branches (channels, height, width).

    Misra et al., "Rotate to Attend: Convolutional Triplet Attention Module", WACV 2021.

    Shapes: x (N, H, W, C) -> (N, H, W, C). Branches ``c_branch``, ``h_branch``, ``w_branch`` (torch
    dims 1, 2, 3), each with a 7x7 conv and a 1-feature BatchNorm. ``__call__(x, train=False)``.
    """

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_rank(x, 4, _NHWC, "TripletAttention")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_c = DimAttention(1, name="c_branch", **kw)(x, train=train)
        x_h = DimAttention(2, name="h_branch", **kw)(x, train=train)
        x_w = DimAttention(3, name="w_branch", **kw)(x, train=train)
        return (x_c + x_h + x_w) / 3


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum in the compute dtype with float32 accumulation and a float32 result."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


class LambdaLayer(nn.Module):
    """Lambda layer: content and position lambdas applied to multi-head queries.

    Bello, "LambdaNetworks: Modeling Long-Range Interactions Without Attention", ICLR 2021.

    Shapes: x (N, H, W, in_channels) -> (N, H, W, out_channels). With h = num_heads, k = dim_k,
    u = dim_u, v = out_channels / h and M = H * W:

    - queries (N, M, h, k), channel ``head * k + kappa`` of the BatchNorm-ed ``to_q`` projection;
    - keys (N, M, k, u), channel ``kappa * u + nu`` of ``to_k``, softmax-ed over the M positions;
    - values (N, M, v, u), channel ``omega * u + nu`` of the BatchNorm-ed ``to_v`` projection;
    - output channel ``head * v + omega``.

    Position lambdas are local when ``r`` is given (parameter ``R`` (k, u, 1, r, r): an r x r
    relative-position kernel, zero padded) and global otherwise (parameter ``pos_emb`` (n, n, k, u),
    where ``n`` is the number of input pixels H * W, so the layer is tied to one input size). Both are
    standard normal at init and stored in torch's layout.

    Raises ValueError (upstream: AssertionError) at construction when out_channels is not divisible
    by num_heads, when r is even, or when neither r nor n is given. ``__call__(x, train=False)``: the
    two BatchNorms (torch momentum 0.1) use batch statistics when ``train``.
    """

    in_channels: int
    out_channels: int
    dim_k: int
    n: int | None = None
    r: int | None = None
    num_heads: int = 4
    dim_u: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        # Constructor-time errors, like upstream's asserts in __init__.
        where = "LambdaLayer"
        for name in ("in_channels", "out_channels", "dim_k", "num_heads", "dim_u"):
            check_positive_int(getattr(self, name), name, where)
        if self.out_channels % self.num_heads != 0:
            raise ValueError(
                f"{where}: out_channels={self.out_channels} must be divisible by num_heads={self.num_heads} "
                "(values dimension must be divisible by the number of heads for multi-head queries)"
            )
        if self.r is not None:
            check_positive_int(self.r, "r", where)
            if self.r % 2 != 1:
                raise ValueError(f"{where}: r (receptive field of the position lambdas) must be odd, got r={self.r}")
        elif self.n is None:
            raise ValueError(
                f"{where}: give r (local position lambdas) or n (global ones: the number of input pixels H * W); "
                "both are None"
            )
        else:
            check_positive_int(self.n, "n", where)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "LambdaLayer"
        check_rank(x, 4, _NHWC, where)
        check_channels(x, self.in_channels, where)
        b, height, width, _ = x.shape
        m = height * width
        if self.r is None and self.n != m:
            raise ValueError(
                f"{where}: n={self.n} (global position lambdas) must equal the number of input pixels H * W, "
                f"got H * W = {height} * {width} = {m} (input shape {tuple(x.shape)})"
            )
        heads, k, u = self.num_heads, self.dim_k, self.dim_u
        v = self.out_channels // heads
        dtype = self.dtype or x.dtype
        kw = dict(in_channels=self.in_channels, bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        bn = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        q = Conv2d(k * heads, 1, name="to_q", **kw)(x)
        keys = Conv2d(k * u, 1, name="to_k", **kw)(x)
        vals = Conv2d(v * u, 1, name="to_v", **kw)(x)
        q = BatchNorm(k * heads, name="norm_q", **bn)(q, train=train)
        vals = BatchNorm(v * u, name="norm_v", **bn)(vals, train=train)

        q = q.reshape(b, m, heads, k)
        keys = jax.nn.softmax(keys.reshape(b, m, k, u).astype(jnp.float32), axis=1)
        vals = vals.reshape(b, m, v, u)

        lambda_c = _einsum("bmku,bmvu->bkv", keys, vals, dtype)
        y = _einsum("bmhk,bkv->bmhv", q, lambda_c, dtype)

        if self.r is not None:
            r = self.r
            rel = self.param("R", nn.initializers.normal(1.0), (k, u, 1, r, r), self.param_dtype)
            # torch's conv3d with kernel (1, r, r) over (u, v, H, W) is a 2-D conv over (H, W) with u in-
            # and k out-channels, the value index v folded into the batch.
            per_value = jnp.transpose(vals.reshape(b, height, width, v, u), (0, 3, 1, 2, 4))
            per_value = per_value.reshape(b * v, height, width, u)
            kernel = jnp.transpose(rel[:, :, 0], (2, 3, 1, 0))  # (k, u, r, r) -> HWIO
            lambda_p = jax.lax.conv_general_dilated(
                per_value.astype(dtype),
                kernel.astype(dtype),
                window_strides=(1, 1),
                padding=[(r // 2, r // 2), (r // 2, r // 2)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=jnp.float32,
            )
            lambda_p = lambda_p.reshape(b, v, m, k)
            y = y + _einsum("bmhk,bvmk->bmhv", q, lambda_p, dtype)
        else:
            pos_emb = self.param("pos_emb", nn.initializers.normal(1.0), (self.n, self.n, k, u), self.param_dtype)
            lambda_p = _einsum("nmku,bmvu->bnkv", pos_emb, vals, dtype)
            y = y + _einsum("bmhk,bmkv->bmhv", q, lambda_p, dtype)

        return y.reshape(b, height, width, heads * v).astype(dtype)
