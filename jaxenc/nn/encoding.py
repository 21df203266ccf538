"""PyTorch-Encoding's residual encoding layers, NHWC or (B, N, D): Encoding, EncodingDrop,
EncodingCosine, and the functional ``encoding``, ``scaled_l2``, ``aggregate``, ``pairwise_cosine``.

Zhang et al., "Deep TEN: Texture Encoding Network", CVPR 2017; "Context Encoding for Semantic
Segmentation", CVPR 2018. Shapes: x (B, H, W, D) or (B, N, D), codewords (K, D) -> (B, K, D).

The B x N x K x D residuals are never formed: distances are expanded into matmuls
(||x||² - 2 x·c + ||c||²) and the aggregate is Aᵀ X - (Σ_i A) C, so forward and backward need
O(B·N·(K + D)) memory. The functional ``encoding`` is :func:`jaxenc.kernels.encoding` itself
(fused Pallas kernels on a verified GPU, XLA elsewhere). Parameter names follow the torch modules
(``codewords``, ``scale``).

Deviations from upstream (docs/DESIGN.md, "Decisions on upstream bugs"):
- The smoothing factors' gradient comes from autodiff, finite at s_k = 0 (upstream divides by s_k).
- EncodingDrop draws its training factors from the ``dropout`` stream and uses -0.5 in inference
  instead of overwriting ``scale`` in place (kept for state_dict compatibility, unused).
- Wrong ranks or sizes raise ValueError naming the argument (upstream: bare asserts).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxenc.kernels.encoding_op import (
    aggregate_reference,
    check_codebook,
    check_encoding_args,
    encoding,
    scaled_l2_reference,
)
from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.torch_compat import torch_uniform_init
from jaxenc.port import register_torch_leaf_names
from jaxenc.validation import check_channels, check_positive_int, check_rank

__all__ = [
    "Encoding",
    "EncodingCosine",
    "EncodingDrop",
    "aggregate",
    "pairwise_cosine",
    "scaled_l2",
]

Dtype = Any

# Cosine similarities in float32 products: TF32 matmuls on GPUs would round them to ~1e-3.
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Functional ops


def _compute_dtype(*arrays) -> Dtype:
    return jnp.result_type(*(a.dtype for a in arrays))


def scaled_l2(x: jax.Array, codewords: jax.Array, scale: jax.Array) -> jax.Array:
    """Scaled squared distances ``SL[b, i, k] = scale_k · ||x_bi - c_k||²`` (PyTorch-Encoding ``scaled_l2``).

    Computed as ``scale_k · max(||x||² - 2 x·c + ||c||², 0)`` with matmuls in float32 accumulation, so
    no residual tensor is formed; the clamp removes the small negatives the expansion's cancellation
    can produce for x ≈ c.

    Shapes: x (B, N, D), codewords (K, D), scale (K) -> (B, N, K), float32.
    """
    check_encoding_args(x, codewords, scale, "scaled_l2")
    dtype = _compute_dtype(x, codewords)
    return scaled_l2_reference(x.astype(dtype), codewords.astype(dtype), scale)


def aggregate(assignments: jax.Array, x: jax.Array, codewords: jax.Array) -> jax.Array:
    """Residual aggregate ``E[b, k] = Σ_i A[b, i, k] (x_bi - c_k)`` (PyTorch-Encoding ``aggregate``).

    Computed as ``Aᵀ X - (Σ_i A) C``: a batched matmul instead of the (B, N, K, D) residuals. The
    assignments are cast to the compute dtype once and that same copy feeds both terms, so in
    bfloat16 the two terms use identical weights and cancel consistently (both accumulate in float32).

    Shapes: assignments (B, N, K), x (B, N, D), codewords (K, D) -> (B, K, D) in the promoted dtype
    of x and codewords.
    """
    where = "aggregate"
    k, _ = check_codebook(x, codewords, where)
    check_rank(assignments, 3, "B, N, K", where, name="assignments")
    if assignments.shape != (*x.shape[:2], k):
        raise ValueError(
            f"{where}: assignments must have shape (B, N, K)={(*x.shape[:2], k)}, got {tuple(assignments.shape)}"
        )
    dtype = _compute_dtype(x, codewords)
    return aggregate_reference(assignments, x.astype(dtype), codewords.astype(dtype))


def pairwise_cosine(x: jax.Array, codewords: jax.Array, normalize: bool = False) -> jax.Array:
    """Dot-product (``normalize=False``) or cosine similarities ``x · cᵀ`` (PyTorch-Encoding ``pairwise_cosine``).

    With ``normalize`` both sides are L2-normalised first as torch's ``F.normalize(eps=1e-8)`` does
    (v / max(||v||, 1e-8)).

    Shapes: x (B, N, D), codewords (K, D) -> (B, N, K), float32.
    """
    check_codebook(x, codewords, "pairwise_cosine")
    dtype = _compute_dtype(x, codewords)
    x, codewords = x.astype(dtype), codewords.astype(dtype)
    if normalize:

        def unit(v):
            v32 = v.astype(jnp.float32)
            norm = jnp.sqrt(jnp.sum(v32 * v32, axis=-1, keepdims=True))
            return (v32 / jnp.maximum(norm, 1e-8)).astype(dtype)

        x, codewords = unit(x), unit(codewords)
    return jnp.einsum(
        "bnd,kd->bnk", x, codewords, preferred_element_type=jnp.float32, precision=_HIGHEST
    )


# --------------------------------------------------------------------------------------------------
# Encoding layers


def _tokens(x: jax.Array, d: int, where: str) -> jax.Array:
    """(B, H, W, D) or (B, N, D) -> (B, N, D), checking D on the last axis."""
    x = jnp.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{where}: expected x of rank 3 (B, N, D) or rank 4 (B, H, W, D), "
            f"got shape {tuple(x.shape)} (rank {x.ndim})"
        )
    check_channels(x, d, where, name="D")
    return x.reshape(x.shape[0], -1, d)


def _codeword_init(k: int, d: int):
    """U(±1/sqrt(K·D)), upstream's codeword initialisation."""
    return torch_uniform_init(k * d)


def _smoothing_init(key, shape, dtype=jnp.float32):
    """U[-1, 0): upstream's smoothing factors, negative so the softmax favours near codewords."""
    return jax.random.uniform(key, shape, dtype, -1.0, 0.0)


def _codebook(module: nn.Module, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Check ``module``'s D and K and ``x``; create ``codewords``; return both in the compute dtype."""
    where = type(module).__name__
    check_positive_int(module.D, "D", where)
    check_positive_int(module.K, "K", where)
    x = _tokens(x, module.D, where)
    k, d = module.K, module.D
    codewords = module.param("codewords", _codeword_init(k, d), (k, d), module.param_dtype)
    return promote_dtype(x, codewords, dtype=module.dtype)


class _EncodingBase(nn.Module):
    """Shared parameters and input handling of Encoding and EncodingDrop."""

    D: int
    K: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"

    def _params(self, x):
        x, codewords = _codebook(self, x)
        scale = self.param("scale", _smoothing_init, (self.K,), self.param_dtype)
        return x, codewords, scale


class Encoding(_EncodingBase):
    """Residual encoding layer (Zhang et al., Deep TEN, CVPR 2017; EncNet, CVPR 2018).

    Learns K codewords c_k (``codewords``, (K, D), init U(±1/sqrt(K·D))) and smoothing factors s_k
    (``scale``, (K), init U[-1, 0)) and outputs E[b, k] = Σ_i softmax_k(s_k·||x_i - c_k||²)·(x_i - c_k).
    See :func:`encoding` (the sign is in s_k; nothing keeps it negative during training, as upstream).

    ``impl`` picks the implementation of :func:`jaxenc.kernels.encoding` ("auto": fused Pallas
    kernels on a GPU verified in ``kernels/verified.json``, XLA elsewhere; "pallas"; "xla").

    Shapes: x (B, H, W, D) or (B, N, D) -> (B, K, D). No train/eval difference.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, codewords, scale = self._params(x)
        return encoding(x, codewords, scale, impl=self.impl)


class EncodingDrop(_EncodingBase):
    """Encoding with randomised smoothing factors (PyTorch-Encoding ``EncodingDrop``).

    Same parameters and forward as :class:`Encoding`, but the smoothing factors actually used are
    a fresh U[-1, 0) draw per call in training (from the ``dropout`` rng stream, one draw shared by
    the batch) and the constant -0.5 in inference. The stored ``scale`` parameter is kept only for
    checkpoint compatibility and is unused, so its gradient is zero (upstream overwrites it in place
    on every forward, so it is never learned there either). The scale used is sown into the
    ``intermediates`` collection as ``scale_used``.

    Shapes: x (B, H, W, D) or (B, N, D) -> (B, K, D). ``__call__(x, train=False)``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x, codewords, _ = self._params(x)
        if train:
            scale = _smoothing_init(self.make_rng("dropout"), (self.K,), jnp.float32)
        else:
            scale = jnp.full((self.K,), -0.5, jnp.float32)
        self.sow("intermediates", "scale_used", scale)
        return encoding(x, codewords, scale, impl=self.impl)


class EncodingCosine(DtypeFields):
    """Encoding with dot-product assignments (PyTorch-Encoding's experimental ``EncodingCosine``).

    A = softmax_k(x_i · c_k) (upstream's ``pairwise_cosine`` with ``normalize=False``: a plain dot
    product), E[b, k] = Σ_i A[b, i, k]·(x_i - c_k). Parameter: ``codewords`` (K, D), init
    U(±1/sqrt(K·D)); no smoothing factors.

    Shapes: x (B, H, W, D) or (B, N, D) -> (B, K, D).
    """

    D: int
    K: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, codewords = _codebook(self, x)
        assignments = jax.nn.softmax(pairwise_cosine(x, codewords), axis=-1)
        return aggregate(assignments, x, codewords)


# The smoothing factors are a raw parameter named ``scale`` upstream, not a norm weight.
register_torch_leaf_names(Encoding, {"scale": "scale"})
register_torch_leaf_names(EncodingDrop, {"scale": "scale"})
