"""Transformer and MBConv blocks from vit-pytorch 1.26.11: CaiT talking-heads attention, XCiT
cross-covariance attention, and MaxViT's MBConv family (SqueezeExcitation, Dropsample,
MBConvResidual, MBConv). Token tensors are (B, N, D) (XCAttention: (B, ..., D)); images are NHWC.

Parameter names and layouts follow the upstream modules, so :func:`jaxenc.port.torch_to_flax` maps
their ``state_dict`` unchanged: Flax submodules carry the torch
attribute names (``nn.Sequential`` indices included) and raw ``nn.Parameter`` tensors are kept in
torch layout.

Numerics: LayerNorm eps 1e-5 with a two-pass variance (torch's), exact-erf GELU, BatchNorm with
torch's running-variance rule; attention logits, softmax, L2 norms and pooled statistics are float32
whatever the compute ``dtype``.

Deliberate change from upstream: :class:`Dropsample` drops whole samples (per-sample stochastic
depth), as upstream intends; upstream's mask broadcasts over the width axis instead (see its
docstring).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.module_utils import accepts_train, cast_input
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.torch_compat import Conv2d, torch_uniform_init
from jaxenc.validation import check_positive_int, check_probability, check_rank

Dtype = Any

__all__ = [
    "CaiTAttention",
    "XCAttention",
    "SqueezeExcitation",
    "Dropsample",
    "MBConvResidual",
    "MBConv",
]

_NHWC = "N, H, W, C"
_F32 = jnp.float32


# --- helpers --------------------------------------------------------------------------------------


def _check_features(x: jax.Array, dim: int, where: str, name: str = "x") -> None:
    if x.shape[-1] != dim:
        raise ValueError(
            f"{where}: {name} must have dim={dim} features on its last axis, got shape {tuple(x.shape)}"
        )


def _compute_dtype(module: nn.Module, x: jax.Array):
    """The module's ``dtype``, else what Flax layers would compute in (input promoted with params)."""
    return module.dtype or jnp.promote_types(x.dtype, module.param_dtype)


def _linear(features: int, fan_in: int, use_bias: bool, name: str, module: nn.Module) -> nn.Dense:
    """``torch.nn.Linear(fan_in, features)`` as a Dense: torch's U(+-1/sqrt(fan_in)) init for both leaves."""
    init = torch_uniform_init(fan_in)
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=init,
        bias_init=init,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


def _layer_norm(module: nn.Module) -> nn.LayerNorm:
    """``torch.nn.LayerNorm(dim)``: eps 1e-5 and a two-pass variance, statistics in float32."""
    return nn.LayerNorm(
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name="norm",
    )


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum in the compute dtype with a float32 accumulator and result."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=_F32)


def _gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): the exact erf form (jax defaults to the tanh approximation)."""
    return jax.nn.gelu(x.astype(_F32), approximate=False).astype(x.dtype)


def _check_head_args(module: nn.Module, where: str) -> None:
    check_positive_int(module.dim, "dim", where)
    check_positive_int(module.heads, "heads", where)
    check_positive_int(module.dim_head, "dim_head", where)
    check_probability(module.dropout, "dropout", where)


class _ToOut(nn.Module):
    """Upstream's ``to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))``: children "0", "1"."""

    dim: int
    fan_in: int
    dropout: float
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _linear(self.dim, self.fan_in, True, "0", self)(x)
        return nn.Dropout(self.dropout, name="1")(y, deterministic=not train)


# --- attention ------------------------------------------------------------------------------------


class CaiTAttention(nn.Module):
    """CaiT self/class attention with talking heads (vit-pytorch ``cait.Attention``).

    Touvron et al., "Going deeper with Image Transformers" (CaiT), ICCV 2021; talking heads from
    Shazeer et al., "Talking-Heads Attention", 2020.

    Shapes: x (B, N, dim), optional context (B, M, dim) -> (B, N, dim). Keys and values come from
    ``concat(LN(x), context)`` along the tokens: the context is NOT layer-normed (as upstream).
    With h = heads, d = dim_head, features are split head-major (feature = head * d + j); the logits
    q k^T / sqrt(d) are mixed across heads before the softmax, ``logits'[g] = sum_h logits[h] M_pre[h, g]``,
    and the probabilities after it with ``M_post`` the same way (the mixed weights no longer sum to 1).

    Parameters (torch keys): ``norm.weight/bias`` (dim), ``to_q.weight`` (h d, dim), ``to_kv.weight``
    (2 h d, dim; keys first, then values), ``mix_heads_pre_attn`` and ``mix_heads_post_attn`` (h, h),
    standard normal, torch layout (row = input head), ``to_out.0.weight/bias``.

    ``__call__(x, context=None, train=False)``: when ``train``, dropout (rate ``dropout``, ``dropout``
    rng stream) on the attention weights before the post-softmax mix and on the output.
    """

    dim: int
    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_head_args(self, "CaiTAttention")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        where = "CaiTAttention"
        x = jnp.asarray(x)
        check_rank(x, 3, "B, N, dim", where)
        _check_features(x, self.dim, where)
        if context is not None:
            context = jnp.asarray(context)
            check_rank(context, 3, "B, M, dim", where, name="context")
            _check_features(context, self.dim, where, name="context")
            if context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{where}: context must have the batch size of x ({x.shape[0]}), got context shape "
                    f"{tuple(context.shape)} and x shape {tuple(x.shape)}"
                )
        h, d = self.heads, self.dim_head
        inner = h * d
        dtype = _compute_dtype(self, x)
        b, n, _ = x.shape

        xn = _layer_norm(self)(x)
        ctx = xn if context is None else jnp.concatenate([xn, context.astype(xn.dtype)], axis=1)
        q = _linear(inner, self.dim, False, "to_q", self)(xn).reshape(b, n, h, d)
        kv = _linear(2 * inner, self.dim, False, "to_kv", self)(ctx)
        k = kv[..., :inner].reshape(b, -1, h, d)
        v = kv[..., inner:].reshape(b, -1, h, d)

        normal = nn.initializers.normal(1.0)
        mix_pre = self.param("mix_heads_pre_attn", normal, (h, h), self.param_dtype).astype(_F32)
        mix_post = self.param("mix_heads_post_attn", normal, (h, h), self.param_dtype).astype(_F32)

        logits = _einsum("bihd,bjhd->bhij", q, k, dtype) * d**-0.5
        logits = jnp.einsum("bhij,hg->bgij", logits, mix_pre)
        attn = jax.nn.softmax(logits, axis=-1)
        attn = nn.Dropout(self.dropout)(attn, deterministic=not train)
        attn = jnp.einsum("bhij,hg->bgij", attn, mix_post)
        out = _einsum("bhij,bjhd->bihd", attn, v, dtype).reshape(b, n, inner).astype(dtype)
        return _ToOut(self.dim, inner, self.dropout, self.dtype, self.param_dtype, name="to_out")(
            out, train=train
        )


class XCAttention(nn.Module):
    """Cross-covariance attention (vit-pytorch ``xcit.XCAttention``): attention across features.

    El-Nouby et al., "XCiT: Cross-Covariance Image Transformers", NeurIPS 2021.

    Shapes: x (B, ..., dim) -> same shape; all middle axes are flattened into n tokens. Per head,
    q and k (rearranged (B, h, d, n)) are L2-normalised along the tokens like ``F.normalize``,
    t / max(||t||, 1e-12); the (d, d) cross-covariance q k^T is scaled by ``exp(temperature[h])``
    (upstream's temperature is a log-temperature, initial scale e; the paper multiplies by the raw
    temperature), softmax-ed over the last feature axis and applied to v.

    Parameters (torch keys): ``norm.weight/bias`` (dim), ``to_qkv.weight`` (3 h d, dim; q, k, v in
    that order), ``temperature`` (h, 1, 1) ones, ``to_out.0.weight/bias``.

    ``__call__(x, train=False)``: when ``train``, dropout on the attention weights and the output.
    """

    dim: int
    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_head_args(self, "XCAttention")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "XCAttention"
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(
                f"{where}: expected x of rank >= 2 (B, ..., dim), got shape {tuple(x.shape)}"
            )
        _check_features(x, self.dim, where)
        h, d = self.heads, self.dim_head
        inner = h * d
        dtype = _compute_dtype(self, x)
        shape = x.shape
        b = shape[0]

        xn = _layer_norm(self)(x.reshape(b, -1, self.dim))
        qkv = _linear(3 * inner, self.dim, False, "to_qkv", self)(xn)
        q, k, v = (t.reshape(b, -1, h, d) for t in jnp.split(qkv, 3, axis=-1))

        def l2norm_tokens(t):
            t = t.astype(_F32)
            # max(||t||, 1e-12) == sqrt(max(||t||^2, 1e-24)); the latter keeps the gradient finite at 0.
            return t / jnp.sqrt(jnp.maximum(jnp.sum(t * t, axis=1, keepdims=True), 1e-24))

        temperature = self.param("temperature", nn.initializers.ones, (h, 1, 1), self.param_dtype)
        logits = _einsum("bnhi,bnhj->bhij", l2norm_tokens(q), l2norm_tokens(k), dtype)
        logits = logits * jnp.exp(temperature.astype(_F32))
        attn = jax.nn.softmax(logits, axis=-1)
        attn = nn.Dropout(self.dropout)(attn, deterministic=not train)
        out = _einsum("bhij,bnhj->bnhi", attn, v, dtype).astype(dtype)
        out = out.reshape(*shape[:-1], inner)
        return _ToOut(self.dim, inner, self.dropout, self.dtype, self.param_dtype, name="to_out")(
            out, train=train
        )


# --- MBConv family --------------------------------------------------------------------------------


class _SEGate(nn.Module):
    """Upstream's ``gate`` nn.Sequential: mean over H, W -> "1" Linear -> SiLU -> "3" Linear -> sigmoid."""

    dim: int
    hidden: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = jnp.mean(x, axis=(1, 2), dtype=_F32)
        y = nn.silu(_linear(self.hidden, self.dim, False, "1", self)(pooled).astype(_F32))
        y = jax.nn.sigmoid(_linear(self.dim, self.hidden, False, "3", self)(y).astype(_F32))
        return y[:, None, None, :]


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation channel gate of MaxViT's MBConv (vit-pytorch ``max_vit.SqueezeExcitation``).

    Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018; as used in Tu et al., "MaxViT:
    Multi-Axis Vision Transformer", ECCV 2022.

    Shapes: x (N, H, W, dim) -> (N, H, W, dim); out = x * sigmoid(W3 silu(W1 mean_HW(x))), with
    hidden = int(dim * shrinkage_rate). Parameters (torch keys): ``gate.1.weight`` (hidden, dim),
    ``gate.3.weight`` (dim, hidden), no biases.
    """

    dim: int
    shrinkage_rate: float = 0.25
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_positive_int(self.dim, "dim", "SqueezeExcitation")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "SqueezeExcitation"
        x = jnp.asarray(x)
        check_rank(x, 4, _NHWC, where)
        _check_features(x, self.dim, where)
        dtype = _compute_dtype(self, x)
        gate = _SEGate(
            self.dim, int(self.dim * self.shrinkage_rate), self.dtype, self.param_dtype, name="gate"
        )(x)
        return (x.astype(_F32) * gate).astype(dtype)


class Dropsample(nn.Module):
    """Per-sample stochastic depth (vit-pytorch ``max_vit.Dropsample``, as upstream intends).

    Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.

    Shapes: x (B, ...) -> same shape. No parameters. ``__call__(x, train=False)``: identity in
    inference or when ``prob == 0``; in training each sample is kept when U > prob (U ~ U[0, 1), one
    draw per sample from the ``dropout`` rng stream) and kept samples are multiplied by 1 / (1 - prob),
    so the expectation is unchanged. ``prob == 1`` drops every sample (output and gradient zero).

    Deviation from upstream, on purpose (docs/DESIGN.md, Decisions on upstream bugs): upstream builds its mask
    with the legacy
    ``torch.FloatTensor((B, 1, 1, 1), device=...)`` call, which makes a 1-D tensor of the four values
    [B, 1, 1, 1] rather than a (B, 1, 1, 1) tensor. Its length-4 mask then broadcasts over the WIDTH
    axis of NCHW inputs: training raises unless W == 4 (or W == 1, which silently broadcasts to width
    4), and with W == 4 it drops image columns, not samples. Upstream's ``prob == 1`` gives NaN (0 / 0).
    """

    prob: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_probability(self.prob, "prob", "Dropsample")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = cast_input(x, self.dtype)
        p = float(self.prob)
        if not train or p == 0.0:
            return x
        if x.ndim < 1:
            raise ValueError(
                f"Dropsample: expected x with a leading batch axis, got a scalar of shape {x.shape}"
            )
        if p == 1.0:
            return jnp.zeros_like(x)
        u = jax.random.uniform(self.make_rng("dropout"), (x.shape[0],) + (1,) * (x.ndim - 1))
        # multiply by the rounded 1 / (1 - p) (XLA would turn a division by a constant into this anyway)
        scale = jnp.asarray(1.0 / (1.0 - p), x.dtype)
        return jnp.where(u > p, x * scale, jnp.zeros((), x.dtype))


def _add_residual(y: jax.Array, x: jax.Array, dropout: float, train: bool, where: str) -> jax.Array:
    """Dropsample(y) + x inside the calling compact module (child "dropsample", no parameters)."""
    if y.shape != x.shape:
        raise ValueError(
            f"{where}: fn must keep the input shape for the residual sum, got fn(x) of shape {tuple(y.shape)} "
            f"for x of shape {tuple(x.shape)}"
        )
    y = Dropsample(dropout, name="dropsample")(y, train=train)
    return y + x.astype(y.dtype)


class MBConvResidual(nn.Module):
    """Residual wrapper of MaxViT's MBConv (vit-pytorch ``max_vit.MBConvResidual``).

    Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022.

    Shapes: x -> fn(x) of the same shape; out = Dropsample(dropout)(fn(x)) + x. ``fn`` is a Flax
    module given as a field; it becomes the child "fn" (torch keys ``fn.*``). Flax's ownership rule
    applies: a ``fn`` constructed inside another module's compact method belongs to THAT module (and
    is named there) unless it is built with ``parent=None``, e.g.
    ``MBConvResidual(SqueezeExcitation(c, parent=None))``. ``__call__(x,
    train=False)`` passes ``train`` to ``fn`` when its ``__call__`` takes it, and drives the
    per-sample :class:`Dropsample` (see there for the deviation from upstream).
    """

    fn: nn.Module
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_probability(self.dropout, "dropout", "MBConvResidual")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = cast_input(x, self.dtype)
        y = self.fn(x, train=train) if accepts_train(self.fn) else self.fn(x)
        return _add_residual(y, x, self.dropout, train, "MBConvResidual")


def _mbconv_layers(cfg: MBConv | _MBConvLayers, x: jax.Array, train: bool) -> jax.Array:
    """Upstream's MBConv nn.Sequential, its children "0".."8" created in the calling compact module."""
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    hidden = cfg.hidden_dim
    stride = 2 if cfg.downsample else 1
    # torch BatchNorm2d: momentum 0.1 == Flax decay 0.9, eps 1e-5
    bn = dict(momentum=0.9, epsilon=1e-5, **kw)
    y = Conv2d(hidden, 1, in_channels=cfg.dim_in, name="0", **kw)(x)
    y = _gelu(BatchNorm(hidden, name="1", **bn)(y, train=train))
    y = Conv2d(
        hidden, 3, stride=stride, padding=1, groups=hidden, in_channels=hidden, name="3", **kw
    )(y)
    y = _gelu(BatchNorm(hidden, name="4", **bn)(y, train=train))
    y = SqueezeExcitation(hidden, cfg.shrinkage_rate, name="6", **kw)(y)
    y = Conv2d(cfg.dim_out, 1, in_channels=hidden, name="7", **kw)(y)
    return BatchNorm(cfg.dim_out, name="8", **bn)(y, train=train)


class _MBConvLayers(nn.Module):
    """The unwrapped MBConv stack as a child (named "fn" inside a residual MBConv)."""

    dim_in: int
    dim_out: int
    downsample: bool
    expansion_rate: float
    shrinkage_rate: float
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def hidden_dim(self) -> int:
        return int(self.expansion_rate * self.dim_out)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _mbconv_layers(self, x, train)


class MBConv(nn.Module):
    """MaxViT's inverted-bottleneck conv block (vit-pytorch ``max_vit.MBConv``), NHWC.

    Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018; Tu et al.,
    "MaxViT: Multi-Axis Vision Transformer", ECCV 2022.

    Shapes: x (N, H, W, dim_in) -> (N, H', W', dim_out), H' = ceil(H / 2) when ``downsample`` else H.
    With hidden = int(expansion_rate * dim_out): 1x1 conv -> BN -> GELU -> depthwise 3x3 conv
    (stride 2 if downsample, padding 1) -> BN -> GELU -> :class:`SqueezeExcitation` (hidden,
    shrinkage_rate) -> 1x1 conv -> BN. BatchNorms: torch momentum 0.1, eps 1e-5; GELU exact.

    Upstream ``MBConv`` is a function returning an ``nn.Sequential``, wrapped in
    :class:`MBConvResidual` (with ``dropout`` feeding its Dropsample) when dim_in == dim_out and not
    downsample. This module reproduces its parameters: torch keys ``0.weight/bias``, ``1.*`` (BN),
    ``3.*`` (depthwise), ``4.*``, ``6.gate.1.weight``, ``6.gate.3.weight``, ``7.*``, ``8.*``; prefixed
    with ``fn.`` in the residual case. ``__call__(x, train=False)``: batch statistics (``batch_stats``
    mutable) and Dropsample when ``train``.
    """

    dim_in: int
    dim_out: int
    _: dataclasses.KW_ONLY
    downsample: bool
    expansion_rate: float = 4
    shrinkage_rate: float = 0.25
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        where = "MBConv"
        check_positive_int(self.dim_in, "dim_in", where)
        check_positive_int(self.dim_out, "dim_out", where)
        if self.hidden_dim < 1:
            raise ValueError(
                f"{where}: the hidden width int(expansion_rate * dim_out) must be >= 1, got "
                f"int({self.expansion_rate!r} * {self.dim_out}) = {self.hidden_dim}"
            )
        check_probability(self.dropout, "dropout", where)
        super().__post_init__()

    @property
    def hidden_dim(self) -> int:
        return int(self.expansion_rate * self.dim_out)

    @property
    def residual(self) -> bool:
        """True when upstream wraps the stack in MBConvResidual (dim_in == dim_out, no downsampling)."""
        return self.dim_in == self.dim_out and not self.downsample

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "MBConv"
        x = jnp.asarray(x)
        check_rank(x, 4, _NHWC, where)
        _check_features(x, self.dim_in, where, name="x (NHWC)")
        if not self.residual:
            return _mbconv_layers(self, x, train)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        fn = _MBConvLayers(
            self.dim_in,
            self.dim_out,
            self.downsample,
            self.expansion_rate,
            self.shrinkage_rate,
            self.dtype,
            self.param_dtype,
            name="fn",
        )
        y = fn(x, train=train)
        return _add_residual(y, x, self.dropout, train, where)
