"""Fused residual encoding (Deep TEN) as Pallas kernels, with its XLA reference twin.

Zhang, Xue & Dana, "Deep TEN: Texture Encoding Network", CVPR 2017; Zhang et al., "Context
Encoding for Semantic Segmentation", CVPR 2018 (PyTorch-Encoding ``encoding.functions.encoding``):

    SL[b,i,k] = s_k · ||x_bi - c_k||²,   A = softmax_k(SL),   E[b,k] = Σ_i A[b,i,k] (x_bi - c_k)

Neither implementation forms the (B, N, K, D) residuals: distances are expanded into
||x||² - 2 x·c + ||c||² (float32 accumulation, clamped at 0) and the aggregate is Aᵀ X - (Σ_i A) C.
Kernels: a forward over (batch, position slices), a backward over position tiles (dX, dSL and
partial sums) and one forming dSLᵀ X per feature block (README, Pallas kernels).
Deviation from upstream: the scale gradient is Σ_i dSL·||x - c||², with no division by s_k (upstream's
hand-written backward divides, which fails at s_k = 0).

Shapes: x (B, N, D), codewords (K, D), scale (K) -> (B, K, D); float32 or bfloat16 (promoted to a
common dtype), float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxenc.kernels._common import (
    HIGHEST,
    compiler_params,
    pow2_block,
    promote_floating,
    resolve_impl,
    round_up,
)
from jaxenc.validation import check_rank

__all__ = ["aggregate_reference", "encoding", "encoding_reference", "scaled_l2_reference"]

_F32 = jnp.float32


# --------------------------------------------------------------------------------------------------
# XLA reference twin (also the implementation behind impl="xla")


def scaled_l2_reference(x: jax.Array, codewords: jax.Array, scale: jax.Array) -> jax.Array:
    """``s_k · max(||x||² - 2 x·c + ||c||², 0)`` with float32 accumulation (no validation).

    Shapes: x (B, N, D), codewords (K, D), scale (K) -> (B, N, K) float32; x and codewords share a dtype.
    """
    x32, c32 = x.astype(_F32), codewords.astype(_F32)
    cross = jnp.einsum("bnd,kd->bnk", x, codewords, preferred_element_type=_F32, precision=HIGHEST)
    sq = jnp.sum(x32 * x32, axis=-1, keepdims=True) - 2.0 * cross + jnp.sum(c32 * c32, axis=-1)
    return scale.astype(_F32) * jnp.maximum(sq, 0.0)


def aggregate_reference(assignments: jax.Array, x: jax.Array, codewords: jax.Array) -> jax.Array:
    """``Aᵀ X - (Σ_i A) C`` (no validation).

    The assignments are cast to the activations' dtype once and that copy feeds both terms, so in
    bfloat16 the two terms use identical weights and cancel consistently.
    Shapes: assignments (B, N, K), x (B, N, D), codewords (K, D) -> (B, K, D) in x's dtype.
    """
    a = assignments.astype(x.dtype)
    weighted = jnp.einsum("bnk,bnd->bkd", a, x, preferred_element_type=_F32, precision=HIGHEST)
    mass = jnp.sum(a.astype(_F32), axis=1)
    return (weighted - mass[:, :, None] * codewords.astype(_F32)).astype(x.dtype)


def encoding_reference(x: jax.Array, codewords: jax.Array, scale: jax.Array) -> jax.Array:
    """Pure-jnp residual encoding (autodiff gradients); the twin the kernels are tested against.

    Shapes: x (B, N, D), codewords (K, D) of the same dtype, scale (K) -> (B, K, D).
    """
    assignments = jax.nn.softmax(scaled_l2_reference(x, codewords, scale), axis=-1)
    return aggregate_reference(assignments, x, codewords)


# --------------------------------------------------------------------------------------------------
# Public entry point


def check_codebook(x, codewords, where: str) -> tuple[int, int]:
    """Validate x (B, N, D) against codewords (K, D); return (K, D)."""
    check_rank(x, 3, "B, N, D", where)
    check_rank(codewords, 2, "K, D", where, name="codewords")
    k, d = codewords.shape
    if x.shape[-1] != d:
        raise ValueError(
            f"{where}: x has D={x.shape[-1]} features on its last axis (shape {tuple(x.shape)}) but "
            f"codewords have D={d} (shape {tuple(codewords.shape)})"
        )
    return k, d


def check_encoding_args(x, codewords, scale, where: str) -> tuple[int, int]:
    """Validate x (B, N, D), codewords (K, D) and scale (K); return (K, D)."""
    k, d = check_codebook(x, codewords, where)
    check_rank(scale, 1, "K", where, name="scale")
    if scale.shape[0] != k:
        raise ValueError(
            f"{where}: scale has {scale.shape[0]} entries but there are K={k} codewords"
        )
    return k, d


def encoding(
    x: jax.Array,
    codewords: jax.Array,
    scale: jax.Array,
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Residual encoding E[b,k] = Σ_i softmax_k(s_k·||x_bi - c_k||²) (x_bi - c_k).

    Args:
      x: (B, N, D) activations, float32 or bfloat16.
      codewords: (K, D).
      scale: (K) smoothing factors (the sign lives here: negative favours near codewords).
      impl: "pallas" (fused kernels), "xla" (:func:`encoding_reference`) or "auto" (Pallas on a
        GPU verified in ``kernels/verified.json`` or when ``interpret`` is set, XLA otherwise).
      interpret: run the Pallas kernels in the Pallas interpreter (any backend; for tests).
    Returns:
      (B, K, D) in the promoted dtype of x and codewords. Differentiable in all three inputs
      (reverse mode).
    """
    where = "jaxenc.kernels.encoding"
    k, d = check_encoding_args(x, codewords, scale, where)
    x, codewords, dtype = promote_floating(x, codewords, "x and codewords", where)
    if resolve_impl(impl, interpret, where, "encoding") == "xla":
        return encoding_reference(x, codewords, scale)
    if 0 in x.shape or k == 0:
        return jnp.zeros((x.shape[0], k, d), dtype)
    plan = _plan(x.shape[0], x.shape[1], k, d)
    return _encoding_pallas(x, codewords, scale.astype(_F32), plan, interpret)


# --------------------------------------------------------------------------------------------------
# Block plan


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static tiling of one call: true sizes, padded sizes and block sizes (all Python ints)."""

    n: int  # positions
    k: int  # codewords
    d: int  # features
    kp: int  # codewords padded to a power of two >= 16 (Triton matmul minimum)
    bn: int  # positions per tile
    bd: int  # features per block
    dp: int  # features padded to a multiple of bd
    splits: int  # position slices processed by separate programs
    tiles_per_split: int

    @property
    def np(self) -> int:
        return self.splits * self.tiles_per_split * self.bn

    @property
    def nd(self) -> int:
        return self.dp // self.bd

    @property
    def tiles(self) -> int:
        return self.splits * self.tiles_per_split


# Aim for at least this many programs per kernel launch (an H100 has 132 SMs).
_TARGET_PROGRAMS = 256


def _plan(b: int, n: int, k: int, d: int) -> _Plan:
    kp = max(16, pow2_block(k, lo=16, hi=1 << 30))
    bd = pow2_block(d, lo=16, hi=64)
    # Position tiles shrink as K grows so the (bn, kp) logit tile stays a few thousand floats.
    bn = pow2_block(n, lo=16, hi=max(16, min(64, 4096 // kp)))
    tiles = -(-n // bn)
    splits = max(1, min(tiles, _TARGET_PROGRAMS // max(1, b)))
    tiles_per_split = -(-tiles // splits)
    splits = -(-tiles // tiles_per_split)
    return _Plan(
        n=n,
        k=k,
        d=d,
        kp=kp,
        bn=bn,
        bd=bd,
        dp=round_up(d, bd),
        splits=splits,
        tiles_per_split=tiles_per_split,
    )


# --------------------------------------------------------------------------------------------------
# Kernel building blocks (traced inside the kernels)


def _dot(a, b, contract):
    """2-D matmul with float32 accumulation; IEEE float32 products for float32 operands."""
    precision = HIGHEST if a.dtype == _F32 else None
    return jax.lax.dot_general(
        a, b, (contract, ((), ())), preferred_element_type=_F32, precision=precision
    )


def _codeword_norms(c_ref, plan: _Plan):
    def body(j, acc):
        c = c_ref[:, pl.ds(j * plan.bd, plan.bd)].astype(_F32)
        return acc + jnp.sum(c * c, axis=1)

    return jax.lax.fori_loop(0, plan.nd, body, jnp.zeros((plan.kp,), _F32))


def _row_statistics(x_ref, c_ref, g_ref, n0, plan: _Plan):
    """One pass over the feature blocks of a position tile.

    Returns (x·cᵀ, ||x||², x·Gᵀ, G·c) for the tile; the last two only when ``g_ref`` is given.
    """
    bn, bd, kp = plan.bn, plan.bd, plan.kp

    def body(j, carry):
        cross, x_sq, xg, gc = carry
        cols = pl.ds(j * bd, bd)
        x = x_ref[pl.ds(n0, bn), cols]
        c = c_ref[:, cols]
        cross = cross + _dot(x, c, ((1,), (1,)))
        x32 = x.astype(_F32)
        x_sq = x_sq + jnp.sum(x32 * x32, axis=1)
        if g_ref is not None:
            g = g_ref[:, cols]
            xg = xg + _dot(x32, g, ((1,), (1,)))
            gc = gc + jnp.sum(g * c.astype(_F32), axis=1)
        return cross, x_sq, xg, gc

    zeros = (jnp.zeros((bn, kp), _F32), jnp.zeros((bn,), _F32))
    extra = (
        (jnp.zeros((bn, kp), _F32), jnp.zeros((kp,), _F32)) if g_ref is not None else (None, None)
    )
    return jax.lax.fori_loop(0, plan.nd, body, zeros + extra)


def _assignments(cross, x_sq, c_sq, scale, n0, plan: _Plan):
    """Masked softmax over codewords of s_k·max(||x||² - 2x·c + ||c||², 0) for one position tile.

    Returns (A, clamped squared distances, mask of strictly positive distances); padded codewords
    and padded positions get zero assignment.
    """
    sq = x_sq[:, None] - 2.0 * cross + c_sq[None, :]
    d2 = jnp.maximum(sq, 0.0)
    valid_k = jnp.arange(plan.kp, dtype=jnp.int32)[None, :] < plan.k
    logits = jnp.where(valid_k, scale[None, :] * d2, -jnp.inf)
    e = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    a = e / jnp.sum(e, axis=1, keepdims=True)
    valid_n = (n0 + jnp.arange(plan.bn, dtype=jnp.int32))[:, None] < plan.n
    return jnp.where(valid_n, a, 0.0), d2, sq > 0.0


def _tile_weighted_sum(w_ref, x_ref, plan: _Plan):
    """Σ over this program's position tiles of Wᵀ X_j, W (N, kp) and X (N, D) float32 products.

    j is this program's feature block (grid axis 1), the position slice is grid axis 2.
    """
    j, split = pl.program_id(1), pl.program_id(2)
    cols = pl.ds(j * plan.bd, plan.bd)

    def body(t, acc):
        rows = pl.ds((split * plan.tiles_per_split + t) * plan.bn, plan.bn)
        return acc + _dot(w_ref[rows, :], x_ref[rows, cols].astype(_F32), ((0,), (0,)))

    return jax.lax.fori_loop(0, plan.tiles_per_split, body, jnp.zeros((plan.kp, plan.bd), _F32))


# --------------------------------------------------------------------------------------------------
# Kernels


def _forward_kernel(x_ref, c_ref, s_ref, e_ref, *, plan: _Plan):
    """Grid (B, position slices): the slice's partial E, accumulated tile by tile in ``e_ref``.

    Each tile's assignments are computed once and applied to every feature block; the (kp, D)
    partial sum is read-modified-written per tile (it stays in L2), which costs less than
    recomputing the logits once per feature block.
    """
    split = pl.program_id(1)
    scale = s_ref[...]
    c_sq = _codeword_norms(c_ref, plan)

    @pl.loop(0, plan.nd)
    def _(j):
        e_ref[:, pl.ds(j * plan.bd, plan.bd)] = jnp.zeros((plan.kp, plan.bd), _F32)

    @pl.loop(0, plan.tiles_per_split)
    def _(t):
        n0 = (split * plan.tiles_per_split + t) * plan.bn
        cross, x_sq, _, _ = _row_statistics(x_ref, c_ref, None, n0, plan)
        # Cast once: in bfloat16 both terms of Aᵀ X - (Σ A) C use the same rounded weights.
        a = _assignments(cross, x_sq, c_sq, scale, n0, plan)[0].astype(x_ref.dtype)
        mass = jnp.sum(a.astype(_F32), axis=0)

        @pl.loop(0, plan.nd)
        def _(j):
            cols = pl.ds(j * plan.bd, plan.bd)
            x = x_ref[pl.ds(n0, plan.bn), cols]
            c = c_ref[:, cols].astype(_F32)
            e_ref[:, cols] += _dot(a, x, ((0,), (0,))) - mass[:, None] * c


def _backward_rows_kernel(
    x_ref, c_ref, s_ref, g_ref, dx_ref, dsl_ref, mass_ref, dsl_sum_ref, ds_ref, *, plan: _Plan
):
    """Grid (B, position tiles): dX of the tile, dSL, and per-tile partial sums."""
    n0 = pl.program_id(1) * plan.bn
    scale = s_ref[...]
    cross, x_sq, xg, gc = _row_statistics(x_ref, c_ref, g_ref, n0, plan)
    a, d2, positive = _assignments(cross, x_sq, _codeword_norms(c_ref, plan), scale, n0, plan)
    da = xg - gc[None, :]
    dsl = a * (da - jnp.sum(a * da, axis=1, keepdims=True))
    # d/dx and d/dc of max(sq, 0) vanish where the clamp is active.
    dsl_active = jnp.where(positive, dsl, 0.0)
    w = dsl_active * scale[None, :]
    row_w = jnp.sum(w, axis=1, keepdims=True)

    @pl.loop(0, plan.nd)
    def _(j):
        cols = pl.ds(j * plan.bd, plan.bd)
        x = x_ref[pl.ds(n0, plan.bn), cols].astype(_F32)
        g = g_ref[:, cols]
        c = c_ref[:, cols].astype(_F32)
        dx = _dot(a, g, ((1,), (0,))) + 2.0 * (row_w * x - _dot(w, c, ((1,), (0,))))
        dx_ref[:, cols] = dx.astype(dx_ref.dtype)

    dsl_ref[...] = dsl_active
    mass_ref[...] = jnp.sum(a, axis=0)
    dsl_sum_ref[...] = jnp.sum(dsl_active, axis=0)
    ds_ref[...] = jnp.sum(dsl * d2, axis=0)


def _backward_codewords_kernel(dsl_ref, x_ref, out_ref, *, plan: _Plan):
    """Grid (B, D blocks, position slices): partial dSLᵀ X for one feature block."""
    out_ref[...] = _tile_weighted_sum(dsl_ref, x_ref, plan)


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers


def _pad_inputs(x, codewords, scale, plan: _Plan):
    b, n, d = x.shape
    xp = jnp.pad(x, ((0, 0), (0, plan.np - n), (0, plan.dp - d)))
    cp = jnp.pad(codewords, ((0, plan.kp - plan.k), (0, plan.dp - d)))
    sp = jnp.pad(scale, (0, plan.kp - plan.k))
    return xp, cp, sp


def _forward_call(xp, cp, sp, plan: _Plan, interpret: bool):
    b = xp.shape[0]
    partials = pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=(b, plan.splits),
        in_specs=[
            pl.BlockSpec((None, plan.np, plan.dp), lambda b, s: (b, 0, 0)),
            pl.BlockSpec((plan.kp, plan.dp), lambda b, s: (0, 0)),
            pl.BlockSpec((plan.kp,), lambda b, s: (0,)),
        ],
        out_specs=pl.BlockSpec((None, None, plan.kp, plan.dp), lambda b, s: (b, s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, plan.splits, plan.kp, plan.dp), _F32),
        interpret=interpret,
        compiler_params=compiler_params(),
        name="encoding_forward",
    )(xp, cp, sp)
    return jnp.sum(partials, axis=1)


def _backward_call(xp, cp, sp, gp, plan: _Plan, interpret: bool):
    b = xp.shape[0]
    tiles = plan.tiles
    per_tile = pl.BlockSpec((None, None, plan.kp), lambda b, t: (b, t, 0))
    dxp, dsl, mass, dsl_sum, ds = pl.pallas_call(
        functools.partial(_backward_rows_kernel, plan=plan),
        grid=(b, tiles),
        in_specs=[
            pl.BlockSpec((None, plan.np, plan.dp), lambda b, t: (b, 0, 0)),
            pl.BlockSpec((plan.kp, plan.dp), lambda b, t: (0, 0)),
            pl.BlockSpec((plan.kp,), lambda b, t: (0,)),
            pl.BlockSpec((None, plan.kp, plan.dp), lambda b, t: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, plan.bn, plan.dp), lambda b, t: (b, t, 0)),
            pl.BlockSpec((None, plan.bn, plan.kp), lambda b, t: (b, t, 0)),
            per_tile,
            per_tile,
            per_tile,
        ],
        out_shape=[
            jax.ShapeDtypeStruct(xp.shape, xp.dtype),
            jax.ShapeDtypeStruct((b, plan.np, plan.kp), _F32),
            *[jax.ShapeDtypeStruct((b, tiles, plan.kp), _F32)] * 3,
        ],
        interpret=interpret,
        compiler_params=compiler_params(),
        name="encoding_backward_rows",
    )(xp, cp, sp, gp)

    dsl_x = pl.pallas_call(
        functools.partial(_backward_codewords_kernel, plan=plan),
        grid=(b, plan.nd, plan.splits),
        in_specs=[
            pl.BlockSpec((None, plan.np, plan.kp), lambda b, j, s: (b, 0, 0)),
            pl.BlockSpec((None, plan.np, plan.dp), lambda b, j, s: (b, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, plan.kp, plan.bd), lambda b, j, s: (b, s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((b, plan.splits, plan.kp, plan.dp), _F32),
        interpret=interpret,
        compiler_params=compiler_params(),
        name="encoding_backward_codewords",
    )(dsl, xp)
    dsl_x = jnp.sum(dsl_x, axis=1)

    mass, dsl_sum = jnp.sum(mass, axis=1), jnp.sum(dsl_sum, axis=1)  # (B, kp)
    c32 = cp.astype(_F32)
    # dE/dc_k = -(Σ_i A_ik) G_k; through the logits, -2 s_k Σ_i dSL_ik (x_i - c_k).
    dcp = -jnp.einsum("bk,bkd->kd", mass, gp, precision=HIGHEST) - 2.0 * sp[:, None] * (
        jnp.sum(dsl_x, axis=0) - jnp.sum(dsl_sum, axis=0)[:, None] * c32
    )
    dsp = jnp.sum(ds, axis=(0, 1))
    return dxp, dcp, dsp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _encoding_pallas(x, codewords, scale, plan: _Plan, interpret: bool):
    return _encoding_pallas_fwd(x, codewords, scale, plan, interpret)[0]


def _encoding_pallas_fwd(x, codewords, scale, plan: _Plan, interpret: bool):
    xp, cp, sp = _pad_inputs(x, codewords, scale, plan)
    e = _forward_call(xp, cp, sp, plan, interpret)[:, : plan.k, : plan.d].astype(x.dtype)
    return e, (xp, cp, sp)


def _encoding_pallas_bwd(plan: _Plan, interpret: bool, residuals, ct):
    xp, cp, sp = residuals
    gp = jnp.pad(ct.astype(_F32), ((0, 0), (0, plan.kp - plan.k), (0, plan.dp - plan.d)))
    # Ties the backward's buffers (its copies of x, its outputs) to the cotangent: without it, the
    # scheduler of jax >= 0.12 may allocate them before the forward kernel has run, and the two
    # passes' x-sized buffers are then live together (tests/test_kernels_memory.py).
    xp, cp, sp, gp = jax.lax.optimization_barrier((xp, cp, sp, gp))
    dxp, dcp, dsp = _backward_call(xp, cp, sp, gp, plan, interpret)
    return dxp[:, : plan.n, : plan.d], dcp[: plan.k, : plan.d].astype(cp.dtype), dsp[: plan.k]


_encoding_pallas.defvjp(_encoding_pallas_fwd, _encoding_pallas_bwd)
