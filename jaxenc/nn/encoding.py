"""PyTorch-Encoding's encoding-layer family in Flax, NHWC: Encoding, EncodingDrop, EncodingCosine,
Inspiration, GramMatrix, UpsampleConv2d, and the functional ops ``encoding``, ``scaled_l2``,
``aggregate``, ``pairwise_cosine``, ``gram_matrix``, ``pixel_shuffle``.

Zhang et al., "Deep TEN: Texture Encoding Network", CVPR 2017; "Context Encoding for Semantic
Segmentation", CVPR 2018; Zhang & Dana, "Multi-style Generative Network for Real-time Transfer",
arXiv:1703.06953 (Inspiration, UpsampleConv2d).

The residual encoding is never formed as the B x N x K x D tensor of residuals x_i - c_k: the
squared distances are expanded into matmuls (||x||² - 2 x·c + ||c||²) and the aggregate is
Aᵀ X - (Σ_i A) C. Forward and backward (autodiff) therefore need O(B·N·(K + D)) memory.

Parameter names and layouts follow the torch modules (``codewords`` (K, D), ``scale`` (K),
``weight`` (1, C, C); UpsampleConv2d's torch ``weight``/``bias`` are the Flax ``kernel``/``bias``),
so upstream state_dicts map one to one.

Deliberate differences from upstream (docs/DESIGN.md, "Decisions on upstream bugs"):
- The gradient of the smoothing factors comes from autodiff of s_k·||x - c_k||², so it is finite at
  s_k = 0 (upstream's hand-written backward divides by s_k).
- EncodingDrop draws its training smoothing factors from the ``dropout`` rng stream and uses -0.5 in
  inference instead of overwriting the ``scale`` parameter in place; the parameter is kept (for
  state_dict compatibility) but unused, so its gradient is zero.
- Inspiration receives the target Gram matrix as a call argument (JAX modules hold no mutable
  ``setTarget`` state).
- UpsampleConv2d can be constructed (upstream's ``reset_parameters`` raises NameError: ``math`` is not
  imported there); its initialisation is the one upstream intends.
- Wrong ranks or sizes raise ValueError naming the argument (upstream: bare asserts or RuntimeError).
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
    scaled_l2_reference,
)
from jaxenc.kernels.encoding_op import encoding as fused_encoding
from jaxenc.nn.module_utils import cast_input
from jaxenc.nn.torch_compat import conv2d_nhwc, conv_args, conv_output_size, torch_uniform_init
from jaxenc.port import register_torch_leaf_names
from jaxenc.validation import check_channels, check_divisible, check_positive_int, check_rank

__all__ = [
    "Encoding",
    "EncodingCosine",
    "EncodingDrop",
    "GramMatrix",
    "Inspiration",
    "UpsampleConv2d",
    "aggregate",
    "gram_matrix",
    "pairwise_cosine",
    "pixel_shuffle",
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


def encoding(
    x: jax.Array,
    codewords: jax.Array,
    scale: jax.Array,
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Residual encoding (Deep TEN): softmax-over-codewords assignment of scaled L2 distances, then aggregate.

    ``SL[b,i,k] = scale_k · ||x_bi - c_k||²``, ``A = softmax_k(SL)``, ``E[b,k] = Σ_i A[b,i,k] (x_bi - c_k)``.
    The sign lives in ``scale`` (upstream convention): the softmax is applied to ``+scale_k·||r||²``,
    so negative smoothing factors favour near codewords. Logits and softmax are float32 whatever the
    input dtype; gradients have no division by ``scale``. Neither direction materialises the
    (B, N, K, D) residual tensor. This is :func:`jaxenc.kernels.encoding`: ``impl="auto"`` runs the
    fused Pallas kernels on a GPU verified in ``kernels/verified.json`` and the XLA formulation elsewhere.

    Shapes: x (B, N, D), codewords (K, D), scale (K) -> (B, K, D) in the promoted dtype of x and
    codewords.
    """
    check_encoding_args(x, codewords, scale, "encoding")
    return fused_encoding(x, codewords, scale, impl=impl, interpret=interpret)


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


def gram_matrix(x: jax.Array) -> jax.Array:
    """Per-sample Gram matrix ``F·Fᵀ / (C·H·W)`` of NHWC features (PyTorch-Encoding ``GramMatrix``).

    Shapes: x (B, H, W, C) -> (B, C, C), entry (c, c') = Σ_{h,w} x[b,h,w,c]·x[b,h,w,c'] / (C·H·W),
    in x's dtype (float32 accumulation).
    """
    x = jnp.asarray(x)
    check_rank(x, 4, "B, H, W, C", "gram_matrix")
    b, h, w, c = x.shape
    feats = x.reshape(b, h * w, c)
    gram = jnp.einsum("bnc,bne->bce", feats, feats, preferred_element_type=jnp.float32)
    return (gram / (c * h * w)).astype(x.dtype)


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


class _EncodingBase(nn.Module):
    """Shared parameters and input handling of Encoding and EncodingDrop."""

    D: int
    K: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"

    def _params(self, x):
        where = type(self).__name__
        check_positive_int(self.D, "D", where)
        check_positive_int(self.K, "K", where)
        x = _tokens(x, self.D, where)
        codewords = self.param(
            "codewords", _codeword_init(self.K, self.D), (self.K, self.D), self.param_dtype
        )
        scale = self.param("scale", _smoothing_init, (self.K,), self.param_dtype)
        x, codewords = promote_dtype(x, codewords, dtype=self.dtype)
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


class EncodingCosine(nn.Module):
    """Encoding with dot-product assignments (PyTorch-Encoding's experimental ``EncodingCosine``).

    A = softmax_k(x_i · c_k) (upstream's ``pairwise_cosine`` with ``normalize=False``: a plain dot
    product), E[b, k] = Σ_i A[b, i, k]·(x_i - c_k). Parameter: ``codewords`` (K, D), init
    U(±1/sqrt(K·D)); no smoothing factors.

    Shapes: x (B, H, W, D) or (B, N, D) -> (B, K, D).
    """

    D: int
    K: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        where = "EncodingCosine"
        check_positive_int(self.D, "D", where)
        check_positive_int(self.K, "K", where)
        x = _tokens(x, self.D, where)
        codewords = self.param(
            "codewords", _codeword_init(self.K, self.D), (self.K, self.D), self.param_dtype
        )
        x, codewords = promote_dtype(x, codewords, dtype=self.dtype)
        assignments = jax.nn.softmax(pairwise_cosine(x, codewords), axis=-1)
        return aggregate(assignments, x, codewords)


# --------------------------------------------------------------------------------------------------
# MSG-Net layers


class GramMatrix(nn.Module):
    """Per-sample Gram matrix of NHWC features, F·Fᵀ / (C·H·W) (Zhang & Dana, MSG-Net). See :func:`gram_matrix`.

    Shapes: (B, H, W, C) -> (B, C, C). No parameters.
    """

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = cast_input(x, self.dtype)
        return gram_matrix(x)


class Inspiration(nn.Module):
    """Inspiration (CoMatch) layer of MSG-Net (Zhang & Dana, arXiv:1703.06953).

    P = W·G, then every pixel's feature vector f becomes Pᵀ f. Parameter ``weight`` (1, C, C), init
    U(0, 0.02). The target Gram matrix G (from :func:`gram_matrix` of the style features) is a call
    argument: upstream stores it with ``setTarget``, which has no JAX counterpart. ``B`` (upstream:
    the batch of the placeholder G) is kept for signature compatibility; G's batch may be 1 (shared)
    or x's batch.

    Shapes: x (B, H, W, C), target_gram (1 or B, C, C) -> (B, H, W, C).
    """

    C: int
    B: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, target_gram: jax.Array) -> jax.Array:
        where = "Inspiration"
        check_positive_int(self.C, "C", where)
        check_positive_int(self.B, "B", where)
        x, target_gram = jnp.asarray(x), jnp.asarray(target_gram)
        check_rank(x, 4, "B, H, W, C", where)
        check_channels(x, self.C, where, name="C")
        check_rank(target_gram, 3, "B, C, C", where, name="target_gram")
        if target_gram.shape[1:] != (self.C, self.C) or target_gram.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"{where}: target_gram must have shape (1 or {x.shape[0]}, {self.C}, {self.C}) for C={self.C} "
                f"and an input batch of {x.shape[0]}, got {tuple(target_gram.shape)}"
            )
        weight = self.param(
            "weight",
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, 0.0, 0.02),
            (1, self.C, self.C),
            self.param_dtype,
        )
        x, weight, target_gram = promote_dtype(x, weight, target_gram, dtype=self.dtype)
        p = jnp.einsum(
            "ij,bjk->bik", weight[0], target_gram, preferred_element_type=jnp.float32
        ).astype(x.dtype)
        # y[b, c] = Σ_c' P[b, c', c]·x[b, c']: upstream's Pᵀ·X_flat, with G's batch broadcast as its expand does.
        if p.shape[0] == 1:
            y = jnp.einsum("bhwi,ic->bhwc", x, p[0], preferred_element_type=jnp.float32)
        else:
            y = jnp.einsum("bhwi,bic->bhwc", x, p, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)


class UpsampleConv2d(nn.Module):
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

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    scale_factor: int = 1
    bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

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


# The smoothing factors are a raw parameter named ``scale`` upstream, not a norm weight.
register_torch_leaf_names(Encoding, {"scale": "scale"})
register_torch_leaf_names(EncodingDrop, {"scale": "scale"})
