"""CaiT talking-heads attention and XCiT cross-covariance attention (vit-pytorch 1.26.11).

Tokens (B, N, D) (XCAttention: (B, ..., D)). Submodules carry the torch attribute names and raw
``nn.Parameter`` tensors keep torch's layout, so :func:`jaxenc.port.torch_to_flax` maps a
``state_dict`` unchanged. LayerNorm eps 1e-5 with a two-pass variance; logits, softmax and L2 norms
in float32 whatever the compute ``dtype``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import (
    check_features,
    check_positive_fields,
    compute_dtype,
    einsum_f32,
    torch_layer_norm,
    torch_linear,
)
from jaxenc.validation import check_probability, check_rank

Dtype = Any

__all__ = ["CaiTAttention", "XCAttention"]


class _HeadsAttention(DtypeFields):
    """The fields of vit-pytorch's multi-head attentions, checked at construction."""

    dim: int
    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0

    def __post_init__(self):
        where = type(self).__name__
        check_positive_fields(self, ("dim", "heads", "dim_head"), where)
        check_probability(self.dropout, "dropout", where)
        super().__post_init__()


class _ToOut(DtypeFields):
    """Upstream's ``to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))``: children "0", "1"."""

    dim: int
    fan_in: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = torch_linear(self.dim, self.fan_in, True, "0", self)(x)
        return nn.Dropout(self.dropout, name="1")(y, deterministic=not train)


class CaiTAttention(_HeadsAttention):
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

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        where = "CaiTAttention"
        x = jnp.asarray(x)
        check_rank(x, 3, "B, N, dim", where)
        check_features(x, self.dim, where)
        if context is not None:
            context = jnp.asarray(context)
            check_rank(context, 3, "B, M, dim", where, name="context")
            check_features(context, self.dim, where, name="context")
            if context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{where}: context must have the batch size of x ({x.shape[0]}), got context shape "
                    f"{tuple(context.shape)} and x shape {tuple(x.shape)}"
                )
        h, d = self.heads, self.dim_head
        inner = h * d
        dtype = compute_dtype(self, x)
        b, n, _ = x.shape

        xn = torch_layer_norm(self)(x)
        ctx = xn if context is None else jnp.concatenate([xn, context.astype(xn.dtype)], axis=1)
        q = torch_linear(inner, self.dim, False, "to_q", self)(xn).reshape(b, n, h, d)
        kv = torch_linear(2 * inner, self.dim, False, "to_kv", self)(ctx)
        k = kv[..., :inner].reshape(b, -1, h, d)
        v = kv[..., inner:].reshape(b, -1, h, d)

        normal = nn.initializers.normal(1.0)
        mix_pre = self.param("mix_heads_pre_attn", normal, (h, h), self.param_dtype).astype(
            jnp.float32
        )
        mix_post = self.param("mix_heads_post_attn", normal, (h, h), self.param_dtype).astype(
            jnp.float32
        )

        logits = einsum_f32("bihd,bjhd->bhij", q, k, dtype) * d**-0.5
        logits = jnp.einsum("bhij,hg->bgij", logits, mix_pre)
        attn = jax.nn.softmax(logits, axis=-1)
        attn = nn.Dropout(self.dropout)(attn, deterministic=not train)
        attn = jnp.einsum("bhij,hg->bgij", attn, mix_post)
        out = einsum_f32("bhij,bjhd->bihd", attn, v, dtype).reshape(b, n, inner).astype(dtype)
        return _ToOut(self.dim, inner, self.dropout, self.dtype, self.param_dtype, name="to_out")(
            out, train=train
        )


class XCAttention(_HeadsAttention):
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "XCAttention"
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(
                f"{where}: expected x of rank >= 2 (B, ..., dim), got shape {tuple(x.shape)}"
            )
        check_features(x, self.dim, where)
        h, d = self.heads, self.dim_head
        inner = h * d
        dtype = compute_dtype(self, x)
        shape = x.shape
        b = shape[0]

        xn = torch_layer_norm(self)(x.reshape(b, -1, self.dim))
        qkv = torch_linear(3 * inner, self.dim, False, "to_qkv", self)(xn)
        q, k, v = (t.reshape(b, -1, h, d) for t in jnp.split(qkv, 3, axis=-1))

        def l2norm_tokens(t):
            t = t.astype(jnp.float32)
            # max(||t||, 1e-12) == sqrt(max(||t||^2, 1e-24)); the latter keeps the gradient finite at 0.
            return t / jnp.sqrt(jnp.maximum(jnp.sum(t * t, axis=1, keepdims=True), 1e-24))

        temperature = self.param("temperature", nn.initializers.ones, (h, 1, 1), self.param_dtype)
        logits = einsum_f32("bnhi,bnhj->bhij", l2norm_tokens(q), l2norm_tokens(k), dtype)
        logits = logits * jnp.exp(temperature.astype(jnp.float32))
        attn = jax.nn.softmax(logits, axis=-1)
        attn = nn.Dropout(self.dropout)(attn, deterministic=not train)
        out = einsum_f32("bhij,bnhj->bnhi", attn, v, dtype).astype(dtype)
        out = out.reshape(*shape[:-1], inner)
        return _ToOut(self.dim, inner, self.dropout, self.dtype, self.param_dtype, name="to_out")(
            out, train=train
        )


# --- MBConv family --------------------------------------------------------------------------------
