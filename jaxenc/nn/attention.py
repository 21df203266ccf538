"""Attention layers from holocron.nn (SAM, TripletAttention, LambdaLayer), PyTorch-Encoding (ACFModule,
MixtureOfSoftMaxACF) and DANet (PAM_Module, CAM_Module), NHWC.

Parameter names and layouts follow pylocron 0.3.0 so that :func:`jaxenc.port.torch_to_flax` maps a
torch ``state_dict`` onto them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.module_utils import check_positive_fields, check_width, einsum_f32
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.pooling import z_pool
from jaxenc.nn.resample import avg_pool2d
from jaxenc.nn.torch_compat import Conv2d
from jaxenc.port import register_torch_aliases
from jaxenc.validation import check_channels, check_divisible, check_positive_int, check_rank

Dtype = Any

__all__ = [
    "SAM",
    "DimAttention",
    "TripletAttention",
    "LambdaLayer",
    # PyTorch-Encoding / DANet
    "ACFModule",
    "MixtureOfSoftMaxACF",
    "PAM_Module",
    "CAM_Module",
]

_NHWC = "N, H, W, C"


class SAM(DtypeFields):
    """Spatial attention module: ``x * sigmoid(conv1x1(x))`` with a single-channel gate.

    Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, in the point-wise form of
    Bochkovskiy et al., "YOLOv4: Optimal Speed and Accuracy of Object Detection", 2020.

    Shapes: x (N, H, W, in_channels) -> (N, H, W, in_channels).
    Parameters: ``conv`` (1x1, in_channels -> 1, with bias), torch key ``conv.weight`` / ``conv.bias``.
    """

    in_channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_rank(x, 4, _NHWC, "SAM")
        check_channels(x, self.in_channels, "SAM")
        dtype = self.dtype or x.dtype
        gate = jax.nn.sigmoid(
            Conv2d(
                1,
                1,
                in_channels=self.in_channels,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv",
            )(x)
        )
        return x.astype(dtype) * gate.astype(dtype)


# NHWC axis of each torch dim a DimAttention can attend across (torch dims are NCHW).
_TORCH_DIM_TO_NHWC = {1: 3, 2: 1, 3: 2}


class _Compress(DtypeFields):
    """The gate of a DimAttention branch, on a z-pooled (N, R, S, 2) map -> (N, R, S, 1).

    Stands for torch's ``compress`` nn.Sequential(ZPool, Conv2d, BatchNorm2d, Sigmoid): the children
    are named "1" and "2" so that the keys read ``compress.1.weight``, ``compress.2.running_mean``.
    The ZPool (child 0) has no parameters and is applied by the caller, on the unrotated input.
    """

    @nn.compact
    def __call__(self, pooled: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        y = Conv2d(1, 7, padding=3, bias=False, in_channels=2, name="1", **kw)(pooled)
        # torch momentum 0.01 == Flax decay 0.99
        y = BatchNorm(1, momentum=0.99, epsilon=1e-5, name="2", **kw)(y, train=train)
        return jax.nn.sigmoid(y)


class DimAttention(DtypeFields):
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
        gate = _Compress(dtype=self.dtype, param_dtype=self.param_dtype, name="compress")(
            pooled, train=train
        )
        gate = jnp.swapaxes(gate, axis, 3)
        return x.astype(dtype) * gate.astype(dtype)


class TripletAttention(DtypeFields):
    """Triplet attention: the mean of three DimAttention branches (channels, height, width).

    Misra et al., "Rotate to Attend: Convolutional Triplet Attention Module", WACV 2021.

    Shapes: x (N, H, W, C) -> (N, H, W, C). Branches ``c_branch``, ``h_branch``, ``w_branch`` (torch
    dims 1, 2, 3), each with a 7x7 conv and a 1-feature BatchNorm. ``__call__(x, train=False)``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_rank(x, 4, _NHWC, "TripletAttention")
        kw = dtype_kwargs(self)
        x_c = DimAttention(1, name="c_branch", **kw)(x, train=train)
        x_h = DimAttention(2, name="h_branch", **kw)(x, train=train)
        x_w = DimAttention(3, name="w_branch", **kw)(x, train=train)
        return (x_c + x_h + x_w) / 3


class LambdaLayer(DtypeFields):
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

    def __post_init__(self):
        # Constructor-time errors, like upstream's asserts in __init__.
        where = "LambdaLayer"
        fields = ("in_channels", "out_channels", "dim_k", "num_heads", "dim_u")
        check_positive_fields(self, fields, where)
        if self.out_channels % self.num_heads != 0:
            raise ValueError(
                f"{where}: out_channels={self.out_channels} must be divisible by num_heads={self.num_heads} "
                "(values dimension must be divisible by the number of heads for multi-head queries)"
            )
        if self.r is not None:
            check_positive_int(self.r, "r", where)
            if self.r % 2 != 1:
                raise ValueError(
                    f"{where}: r (receptive field of the position lambdas) must be odd, got r={self.r}"
                )
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
        kw = dict(
            in_channels=self.in_channels, bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        bn = dtype_kwargs(self)

        q = Conv2d(k * heads, 1, name="to_q", **kw)(x)
        keys = Conv2d(k * u, 1, name="to_k", **kw)(x)
        vals = Conv2d(v * u, 1, name="to_v", **kw)(x)
        q = BatchNorm(k * heads, name="norm_q", **bn)(q, train=train)
        vals = BatchNorm(v * u, name="norm_v", **bn)(vals, train=train)

        q = q.reshape(b, m, heads, k)
        keys = jax.nn.softmax(keys.reshape(b, m, k, u).astype(jnp.float32), axis=1)
        vals = vals.reshape(b, m, v, u)

        lambda_c = einsum_f32("bmku,bmvu->bkv", keys, vals, dtype)
        y = einsum_f32("bmhk,bkv->bmhv", q, lambda_c, dtype)

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
            y = y + einsum_f32("bmhk,bvmk->bmhv", q, lambda_p, dtype)
        else:
            pos_emb = self.param(
                "pos_emb", nn.initializers.normal(1.0), (self.n, self.n, k, u), self.param_dtype
            )
            lambda_p = einsum_f32("nmku,bmvu->bnkv", pos_emb, vals, dtype)
            y = y + einsum_f32("bmhk,bmkv->bmhv", q, lambda_p, dtype)

        return y.reshape(b, height, width, heads * v).astype(dtype)


# --- PyTorch-Encoding / DANet attention: ACFModule, MixtureOfSoftMaxACF, PAM_Module, CAM_Module -----
# ACF from PyTorch-Encoding's encoding/nn/attention.py, PAM/CAM from DANet's da_att.py. Torch parameter names are kept (conv_qs, conv_vs,
# attention.weight, conv, norm_layer; query_conv, key_conv, value_conv, gamma).

_KQ_TRANSFORMS = ("conv", "ffn", "dffn")


class _KQFeedForward(DtypeFields):
    """ACF's 'ffn'/'dffn' key-query transform: upstream's nn.Sequential(3x3 conv (no bias), norm, ReLU,
    1x1 conv); children "0", "1", "3" as the Sequential indices (the ReLU, "2", has no state)."""

    channels: int
    d_k: int
    dilation: int
    norm_layer: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dtype_kwargs(self)
        y = Conv2d(
            self.channels,
            3,
            padding=self.dilation,
            dilation=self.dilation,
            bias=False,
            name="0",
            **kw,
        )(x)
        y = jax.nn.relu(self.norm_layer(self.channels, name="1", **kw)(y, train=train))
        return Conv2d(
            self.channels,
            1,
            kernel_init=nn.initializers.normal((1.0 / self.d_k) ** 0.5),
            name="3",
            **kw,
        )(y)


class MixtureOfSoftMaxACF(DtypeFields):
    """Mixture of softmaxes over scaled dot-product attention (the attention of ACF).

    Zhang et al., "Co-occurrent Features in Semantic Segmentation", CVPR 2019; mixture of softmaxes
    from Yang et al., "Breaking the Softmax Bottleneck", ICLR 2018.

    The d_k query/key features are split into ``n_mix`` groups of d = d_k / n_mix; group j gives
    ``attn_j = dropout(softmax_N2(q_j k_jᵀ / sqrt(d_k)))`` (the temperature uses the full d_k). With
    n_mix > 1 the attention is ``sum_j pi_j attn_j``, ``pi = softmax_m(weight @ mean_N(q))``, where
    ``weight`` (n_mix, d_k) starts U(±n_mix^-1/2) and is stored in torch's layout.

    Token layout (jaxenc's (B, N, D); upstream takes (B, D, N)):
      q (B, N, d_k), k (B, N2, d_k), v (B, N2, d_v) -> (output (B, N, d_v), attn (B, N, N2)).
    ``__call__(q, k, v, train=False)``: attention dropout (rate ``attn_dropout``, ``dropout`` rng
    stream) only when ``train``. Logits, softmax and mixture weights are computed in float32.
    """

    n_mix: int
    d_k: int
    attn_dropout: float = 0.1

    @nn.compact
    def __call__(self, qt: jax.Array, kt: jax.Array, vt: jax.Array, train: bool = False):
        where = "MixtureOfSoftMaxACF"
        m = check_positive_int(self.n_mix, "n_mix", where)
        d_k = check_positive_int(self.d_k, "d_k", where)
        check_divisible(d_k, m, "d_k", "n_mix", where)
        p = self.attn_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{where}: attn_dropout must be a probability in [0, 1], got {p!r}")
        for name, t in (("q", qt), ("k", kt), ("v", vt)):
            check_rank(t, 3, "B, N, D", where, name=name)
        check_channels(qt, d_k, where, name="d_k")
        check_channels(kt, d_k, where, name="d_k")
        if not (qt.shape[0] == kt.shape[0] == vt.shape[0]) or kt.shape[1] != vt.shape[1]:
            raise ValueError(
                f"{where}: q (B, N, d_k), k (B, N2, d_k) and v (B, N2, d_v) must share B, and k and v N2; got "
                f"q {tuple(qt.shape)}, k {tuple(kt.shape)}, v {tuple(vt.shape)}"
            )
        b, n, _ = qt.shape
        n2 = kt.shape[1]
        dtype = self.dtype or jnp.result_type(qt, kt, vt)
        d = d_k // m

        q = qt.reshape(b, n, m, d)
        k = kt.reshape(b, n2, m, d)
        logits = einsum_f32("bnmd,bkmd->bmnk", q, k, dtype) / (d_k**0.5)
        attn = jax.nn.softmax(logits, axis=-1)
        attn = nn.Dropout(rate=p)(attn, deterministic=not train)
        if m > 1:
            bound = m**-0.5
            init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)  # noqa: E731
            weight = self.param("weight", init, (m, d_k), self.param_dtype)
            q_mean = jnp.mean(qt.astype(jnp.float32), axis=1)
            pi = jax.nn.softmax(q_mean @ weight.astype(jnp.float32).T, axis=-1)  # (B, m)
            attn = jnp.einsum("bmnk,bm->bnk", attn, pi)
        else:
            attn = attn[:, 0]
        out = einsum_f32("bnk,bkv->bnv", attn, vt, dtype)
        return out.astype(dtype), attn


class ACFModule(DtypeFields):
    """Attentional class feature module of the ATTEN head: multi-head mixture-of-softmax attention over
    (optionally 2x average-pooled) keys and values, a 1x1 projection, norm and residual.

    Zhang et al., "Co-occurrent Features in Semantic Segmentation", CVPR 2019 (PyTorch-Encoding's
    ``ACFModule``).

    - Keys and queries share ONE transform ``conv_qs`` (upstream also registers it as ``conv_ks``):
      'conv' = 1x1 conv d_model -> n_head·d_k (kernel N(0, 2/(d_model + d_k))); 'ffn' = 3x3 conv (no
      bias) + norm + ReLU + 1x1 conv (kernel N(0, 1/d_k)); 'dffn' = the same with a dilation-4 3x3.
    - Values: ``conv_vs``, 1x1 conv d_model -> n_head·d_v (kernel N(0, 2/(d_model + d_v))).
    - ``pooling``: keys and values come from ``avg_pool2d(x, 3, 2, 1, count_include_pad=False)``;
      queries from x. H and W must then be even (upstream reshapes to H·W/4 keys).
    - Heads are folded into the batch; :class:`MixtureOfSoftMaxACF` (``attention``) attends; the heads
      are concatenated (channel ``head·d_v + i``), projected by ``conv`` (1x1, no bias) to d_model and
      normalised by ``norm_layer``; the result is added to x, or concatenated before x if ``concat``.

    Shapes: x (N, H, W, d_model) -> (N, H, W, d_model), or (N, H, W, 2·d_model) with ``concat``.
    ``__call__(x, train=False)``: norms use batch statistics and attention dropout (rate ``dropout``,
    ``dropout`` rng stream) is applied when ``train``.

    Args: upstream's. ``norm_layer(num_features, *, name, dtype, param_dtype)`` returns a module called
    as ``norm(y, train=train)`` (default :class:`jaxenc.nn.BatchNorm`). ``dropout`` is the attention
    dropout rate; upstream ignores this argument and always uses 0.1, its default.
    """

    n_head: int
    n_mix: int
    d_model: int
    d_k: int
    d_v: int
    norm_layer: Callable[..., nn.Module] = BatchNorm
    kq_transform: str = "conv"
    value_transform: str = "conv"
    pooling: bool = True
    concat: bool = False
    dropout: float = 0.1

    def _check_args(self, where: str) -> None:
        check_positive_fields(self, ("n_head", "n_mix", "d_model", "d_k", "d_v"), where)
        check_divisible(self.d_k, self.n_mix, "d_k", "n_mix", where)
        if self.kq_transform not in _KQ_TRANSFORMS:
            raise ValueError(
                f"{where}: kq_transform must be one of {_KQ_TRANSFORMS}, got {self.kq_transform!r}"
            )
        if self.value_transform != "conv":
            raise ValueError(
                f"{where}: value_transform must be 'conv' (the only one upstream has), got {self.value_transform!r}"
            )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "ACFModule"
        self._check_args(where)
        check_rank(x, 4, _NHWC, where)
        check_channels(x, self.d_model, where, name="d_model")
        b, height, width, _ = x.shape
        if self.pooling and (height % 2 or width % 2):
            raise ValueError(
                f"{where}: pooling=True halves H and W for the keys and values and needs both even, got input shape "
                f"{tuple(x.shape)} (H={height}, W={width}); use pooling=False or crop/pad the input"
            )
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kw = dtype_kwargs(self)
        h, d_k, d_v, d_model = self.n_head, self.d_k, self.d_v, self.d_model

        if self.kq_transform == "conv":
            conv_qs = Conv2d(
                h * d_k,
                1,
                kernel_init=nn.initializers.normal((2.0 / (d_model + d_k)) ** 0.5),
                name="conv_qs",
                **kw,
            )
            kq = lambda t: conv_qs(t)  # noqa: E731
        else:
            ffn = _KQFeedForward(
                h * d_k,
                d_k,
                dilation=1 if self.kq_transform == "ffn" else 4,
                norm_layer=self.norm_layer,
                name="conv_qs",
                **kw,
            )
            kq = lambda t: ffn(t, train=train)  # noqa: E731
        conv_vs = Conv2d(
            h * d_v,
            1,
            kernel_init=nn.initializers.normal((2.0 / (d_model + d_v)) ** 0.5),
            name="conv_vs",
            **kw,
        )

        def split_heads(t, d):
            # (B, h', w', heads * d) -> (B * heads, h' * w', d): batch index b * heads + head, like upstream.
            bb, hh, ww, _ = t.shape
            return t.reshape(bb, hh * ww, h, d).transpose(0, 2, 1, 3).reshape(bb * h, hh * ww, d)

        if self.pooling:
            q = split_heads(kq(x), d_k)
            pooled = avg_pool2d(x, 3, 2, 1, count_include_pad=False)
            k = split_heads(kq(pooled), d_k)
            v = split_heads(conv_vs(pooled), d_v)
        else:
            k = split_heads(kq(x), d_k)
            q = k
            v = split_heads(conv_vs(x), d_v)

        out, _ = MixtureOfSoftMaxACF(
            self.n_mix, d_k, attn_dropout=self.dropout, name="attention", **kw
        )(q, k, v, train=train)
        out = (
            out.reshape(b, h, height * width, d_v)
            .transpose(0, 2, 1, 3)
            .reshape(b, height, width, h * d_v)
        )
        out = Conv2d(d_model, 1, bias=False, name="conv", **kw)(out)
        out = self.norm_layer(d_model, name="norm_layer", **kw)(out, train=train).astype(dtype)
        if self.concat:
            return jnp.concatenate([out, x], axis=-1)
        return out + x


class _DANetAttention(DtypeFields):
    """The fields of DANet's attention modules."""

    in_dim: int


def _danet_input(module: nn.Module, x: jax.Array, where: str):
    """Check x (N, H, W, in_dim); return its shape and the compute dtype."""
    check_rank(x, 4, _NHWC, where)
    check_channels(x, module.in_dim, where, name="in_dim")
    return x.shape, module.dtype or x.dtype


def _gamma_residual(module: nn.Module, out: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """``gamma * out + x`` with DANet's scalar ``gamma`` (torch shape (1,), initialised to 0)."""
    gamma = module.param("gamma", nn.initializers.zeros, (1,), module.param_dtype)
    return (gamma.astype(jnp.float32) * out.astype(jnp.float32) + x.astype(jnp.float32)).astype(
        dtype
    )


class PAM_Module(_DANetAttention):  # noqa: N801 (upstream name)
    """Position attention module of DANet: every position attends over all H·W positions.

    Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019 (``junfu1115/DANet``,
    ``encoding/nn/da_att.py``).

    ``q, k = query_conv(x), key_conv(x)`` (1x1, in_dim -> in_dim // 8, with bias), ``v = value_conv(x)``
    (1x1, in_dim -> in_dim); ``attn = softmax_j(q_i · k_j)`` (unscaled, N x N with N = H·W);
    ``out_i = gamma · sum_j attn_ij v_j + x_i`` with the scalar ``gamma`` (shape (1,)) starting at 0,
    so the module starts as the identity. Energies and softmax in float32.

    Shapes: x (N, H, W, in_dim) -> (N, H, W, in_dim). in_dim >= 8.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "PAM_Module"
        check_width(self.in_dim, "in_dim", 8, "queries and keys have in_dim // 8 channels", where)
        (b, height, width, c), dtype = _danet_input(self, x, where)
        kw = dict(in_channels=c, dtype=self.dtype, param_dtype=self.param_dtype)
        q = Conv2d(c // 8, 1, name="query_conv", **kw)(x).reshape(b, height * width, c // 8)
        k = Conv2d(c // 8, 1, name="key_conv", **kw)(x).reshape(b, height * width, c // 8)
        v = Conv2d(c, 1, name="value_conv", **kw)(x).reshape(b, height * width, c)
        attn = jax.nn.softmax(einsum_f32("bic,bjc->bij", q, k, dtype), axis=-1)
        out = einsum_f32("bij,bjc->bic", attn, v, dtype).reshape(b, height, width, c)
        return _gamma_residual(self, out, x, dtype)


class CAM_Module(_DANetAttention):  # noqa: N801 (upstream name)
    """Channel attention module of DANet: every channel attends over all channels.

    Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019 (``junfu1115/DANet``,
    ``encoding/nn/da_att.py``).

    With X the (C, N) features: ``E = X Xᵀ`` (C x C), ``attn = softmax_row(max_row(E) - E)``,
    ``out = gamma · attn X + x``; the scalar ``gamma`` (shape (1,)) starts at 0. No other parameters.
    Energies are unscaled (they grow with H·W) and computed, with the softmax, in float32.

    Shapes: x (N, H, W, in_dim) -> (N, H, W, in_dim).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "CAM_Module"
        check_positive_int(self.in_dim, "in_dim", where)
        (b, height, width, c), dtype = _danet_input(self, x, where)
        feats = x.reshape(b, height * width, c)
        energy = einsum_f32("bnc,bnd->bcd", feats, feats, dtype)
        attn = jax.nn.softmax(jnp.max(energy, axis=-1, keepdims=True) - energy, axis=-1)
        out = einsum_f32("bcd,bnd->bnc", attn, feats, dtype).reshape(b, height, width, c)
        return _gamma_residual(self, out, x, dtype)


# Upstream registers the shared key/query transform twice (``self.conv_ks = self.conv_qs``).
register_torch_aliases(ACFModule, {"conv_ks": "conv_qs"})
