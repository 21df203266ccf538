"""jaxenc.kernels.encoding: the fused Pallas kernels (run in the Pallas interpreter on CPU) against
their pure-jnp twin ``encoding_reference``, and the ``impl`` dispatch around them.

Why these cases:
- Shapes that are and are not multiples of the block sizes chosen by ``_plan`` (padded codewords,
  padded positions, padded features, several feature blocks, several position slices, slices of
  several tiles with an entirely padded last tile): padding is masked inside the kernels, and a
  masking slip shows up only off the block grid.
- Forward values and the three reverse-mode gradients (the backward is a hand-written custom_vjp,
  so autodiff of the reference is an independent oracle), in float32 and bfloat16.
- Smoothing factors of both signs with an exact zero: the scale gradient must not divide by s_k.
- Points lying exactly on codewords, so the clamp max(||x||² - 2x·c + ||c||², 0) is active.
- jit, vmap (batching rule of pallas_call under custom_vjp), and the Flax modules' ``impl`` field.
- Error messages, which are part of the API.

On CPU ``impl="pallas"`` can only be executed with ``interpret=True``; without it the kernels can
still be traced (make_jaxpr), which is how the dispatch and module tests check which path is taken.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import assert_close, random_input

from jaxenc.kernels.encoding_op import _plan, encoding, encoding_reference, scaled_l2_reference
from jaxenc.nn.encoding import Encoding, EncodingDrop

BF16_RTOL = 2e-2


def _inputs(b, n, k, d, seed=0, dtype=jnp.float32):
    """x ~ N(0, 1), codewords ~ N(0, 0.25), smoothing factors of both signs with s_0 = 0 exactly.

    The factors are scaled by 1/D so the softmax stays soft (||x - c||² grows like D); hard
    assignments would make every gradient through the softmax vanish and test nothing.
    """
    x = random_input((b, n, d), seed)
    c = 0.5 * random_input((k, d), seed + 1)
    s = (np.random.default_rng(seed + 2).uniform(-1.0, 0.5, k) * 4.0 / d).astype(np.float32)
    s[0] = 0.0
    if k > 1:  # both signs present whatever the draw
        s[1] = -abs(s[1]) - 1.0 / d
    if k > 2:
        s[2] = abs(s[2]) + 0.5 / d
    g = random_input((b, k, d), seed + 3)
    return jnp.asarray(x, dtype), jnp.asarray(c, dtype), jnp.asarray(s), jnp.asarray(g)


def _value_and_grads(fn):
    """jit(x, c, s, g -> (out, (dx, dc, ds))) with grads of sum(out * g): one compile per shape."""

    def loss(x, c, s, g):
        out = fn(x, c, s)
        return jnp.sum(out.astype(jnp.float32) * g), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

    @jax.jit
    def run(x, c, s, g):
        (_, out), grads = grad(x, c, s, g)
        return out, grads

    return run


_pallas = _value_and_grads(functools.partial(encoding, impl="pallas", interpret=True))
_reference = _value_and_grads(encoding_reference)


def _check(x, c, s, g, rtol, what=""):
    out, grads = _pallas(x, c, s, g)
    out_ref, grads_ref = _reference(x, c, s, g)
    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype, (
        out.shape,
        out.dtype,
        out_ref.dtype,
    )
    for name, a, e in zip(
        ("out", "d/dx", "d/dcodewords", "d/dscale"), (out, *grads), (out_ref, *grads_ref)
    ):
        assert a.dtype == e.dtype, f"{what} {name}: dtype {a.dtype} != {e.dtype}"
        assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{what} {name}: not finite"
        assert_close(a, e, rtol, what=f"{what} {name}")
    return out, grads


# --------------------------------------------------------------------------------------------------
# 1. Values and gradients over block-plan shapes


def _split_shape():
    """First candidate whose plan has several slices of several tiles and an all-padding tile.

    Chosen through ``_plan`` rather than hard-coded so a retuned plan keeps this branch covered
    (test_plan_covers_slices_of_several_tiles fails if no candidate reaches it any more).
    """
    candidates = [(32, 520, 3, 16), (64, 300, 4, 20), (16, 300, 130, 24), (4, 1400, 5, 130)]
    for b, n, k, d in candidates:
        plan = _plan(b, n, k, d)
        if plan.splits > 1 and plan.tiles_per_split > 1 and plan.np - n >= plan.bn:
            return (b, n, k, d)
    return candidates[0]


SPLIT_SHAPE = _split_shape()
SHAPES = [
    (2, 7 * 9, 7, 48),  # N, K, D all off the block grid, one tile
    (1, 1, 1, 1),  # everything padded; K=1 makes the softmax constant
    (3, 200, 32, 100),  # several position tiles and slices, two feature blocks
    (2, 16, 16, 64),  # exact multiples of every block size
    (1, 65, 33, 65),  # one past a block on every axis
    (2, 130, 5, 17),  # small K padded to 16, D block of 32
    (
        2,
        40,
        64,
        130,
    ),  # K=64 (no codeword padding); D=130: three feature blocks, the last nearly empty
    (4, 33, 2, 200),  # four feature blocks, K=2
    (2, 100, 130, 40),  # kp=256 shrinks the position tile to 16: many tiles smaller than kp
    SPLIT_SHAPE,  # splits > 1 and tiles_per_split > 1, the last tile all padding
]
BF16_SHAPES = [(2, 7 * 9, 7, 48), (1, 65, 33, 65), (3, 200, 32, 100), SPLIT_SHAPE]


def test_plan_covers_slices_of_several_tiles():
    """The shape list really reaches the multi-slice, multi-tile, padded-tile branches of the plan."""
    b, n, k, d = SPLIT_SHAPE
    plan = _plan(b, n, k, d)
    assert plan.splits > 1 and plan.tiles_per_split > 1, plan
    assert plan.np - n >= plan.bn, plan  # at least one tile that is entirely padding
    assert _plan(3, 200, 32, 100).tiles > 1
    assert _plan(2, 40, 64, 130).nd > 2
    wide_k = _plan(2, 100, 130, 40)
    assert wide_k.bn < wide_k.kp and wide_k.tiles > 1, wide_k


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape):
    x, c, s, g = _inputs(*shape)
    assert float(s[0]) == 0.0
    _check(x, c, s, g, 1e-5, what=f"f32 {shape}")


@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_matches_reference(shape):
    x, c, s, g = _inputs(*shape, dtype=jnp.bfloat16)
    out, (dx, dc, ds) = _check(x, c, s, g, BF16_RTOL, what=f"bf16 {shape}")
    assert out.dtype == dx.dtype == dc.dtype == jnp.bfloat16
    assert ds.dtype == jnp.float32


def test_scale_gradient_finite_at_zero_scale():
    """All smoothing factors zero (uniform assignments): d/ds is Σ dSL·d², no division by s."""
    x, c, _, g = _inputs(2, 63, 7, 48, seed=5)
    s = jnp.zeros((7,), jnp.float32)
    _, (_, _, ds) = _check(x, c, s, g, 1e-5, what="s = 0")
    assert np.all(np.isfinite(np.asarray(ds))) and float(jnp.max(jnp.abs(ds))) > 0.0


# --------------------------------------------------------------------------------------------------
# 2. Points on codewords: the distance clamp


def test_points_on_codewords_clamp():
    b, n, k, d = 2, 70, 9, 33
    x, c, s, g = _inputs(b, n, k, d, seed=11)
    # An offset makes ||x||² and ||c||² large, so the expanded distance of coincident points
    # cancels to rounding noise of either sign (or exactly 0) instead of a clean 0.
    x, c = x + 3.0, c + 3.0
    x = x.at[0, :k].set(c).at[1, 5].set(c[2]).at[1, 69].set(c[k - 1])
    s = s.at[1].set(-0.5)  # negative scale: the coincident codeword dominates those rows
    sq = scaled_l2_reference(x, c, jnp.ones((k,), jnp.float32))  # clamped, unit scale
    unclamped = (
        jnp.sum(x * x, axis=-1, keepdims=True)
        - 2.0 * jnp.einsum("bnd,kd->bnk", x, c, precision="highest")
        + jnp.sum(c * c, axis=-1)
    )
    assert np.any(np.asarray(unclamped) <= 0.0), "no distance reached the clamp"
    assert np.all(np.asarray(sq) >= 0.0)
    _check(x, c, s, g, 1e-5, what="points on codewords")


# --------------------------------------------------------------------------------------------------
# 3. jit and vmap


def test_jit_and_vmap_over_extra_batch_axis():
    v, (b, n, k, d) = 3, (2, 63, 7, 48)
    x, c, s, _ = _inputs(v * b, n, k, d, seed=21)
    xs = x.reshape(v, b, n, d)
    g = jnp.asarray(random_input((v, b, k, d), 22))

    pallas = jax.jit(jax.vmap(lambda xx: encoding(xx, c, s, impl="pallas", interpret=True)))
    reference = jax.vmap(lambda xx: encoding_reference(xx, c, s))
    out = pallas(xs)
    assert out.shape == (v, b, k, d)
    assert_close(out, reference(xs), what="jit(vmap(pallas))")
    # vmap over the stacked batch is the same as one call over the flattened batch.
    assert_close(out.reshape(v * b, k, d), encoding_reference(x, c, s), what="vmap vs flat")

    def loss(fn):
        return lambda xx, cc, ss: jnp.sum(jax.vmap(lambda y: fn(y, cc, ss))(xx) * g)

    grads = jax.jit(
        jax.grad(loss(functools.partial(encoding, impl="pallas", interpret=True)), (0, 1, 2))
    )(xs, c, s)
    grads_ref = jax.grad(loss(encoding_reference), (0, 1, 2))(xs, c, s)
    for name, a, e in zip(("d/dx", "d/dcodewords", "d/dscale"), grads, grads_ref):
        assert_close(a, e, what=f"jit(grad(vmap(pallas))) {name}")


# --------------------------------------------------------------------------------------------------
# 4. Dispatch and errors


def _jaxpr(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))


def test_auto_on_cpu_is_the_reference():
    assert jax.default_backend() == "cpu"
    x, c, s, _ = _inputs(2, 63, 7, 48)
    np.testing.assert_array_equal(
        np.asarray(encoding(x, c, s)), np.asarray(encoding_reference(x, c, s))
    )
    np.testing.assert_array_equal(
        np.asarray(encoding(x, c, s, impl="xla")), np.asarray(encoding_reference(x, c, s))
    )
    assert "pallas_call" not in _jaxpr(lambda *a: encoding(*a, impl="auto"), x, c, s)
    assert "pallas_call" not in _jaxpr(lambda *a: encoding(*a, impl="xla", interpret=True), x, c, s)


def test_pallas_paths_trace_to_pallas_call():
    x, c, s, g = _inputs(2, 63, 7, 48)
    assert "pallas_call" in _jaxpr(lambda *a: encoding(*a, impl="auto", interpret=True), x, c, s)
    # Tracing does not run the kernel, so the non-interpreted (GPU) path can be traced on CPU.
    assert "pallas_call" in _jaxpr(lambda *a: encoding(*a, impl="pallas"), x, c, s)
    backward = _jaxpr(
        jax.grad(lambda *a: jnp.sum(encoding(*a, impl="pallas") * g), (0, 1, 2)), x, c, s
    )
    assert "encoding_backward_rows" in backward and "encoding_backward_codewords" in backward


def test_empty_inputs_give_zeros():
    _, c, s, _ = _inputs(1, 1, 5, 8)
    for x in (jnp.zeros((0, 4, 8)), jnp.zeros((2, 0, 8))):
        out = encoding(x, c, s, impl="pallas", interpret=True)
        assert out.shape == (x.shape[0], 5, 8)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(encoding_reference(x, c, s)))
    out = encoding(
        jnp.ones((2, 3, 8)), jnp.zeros((0, 8)), jnp.zeros((0,)), impl="pallas", interpret=True
    )
    assert out.shape == (2, 0, 8)


def test_bad_impl_and_interpret():
    x, c, s, _ = _inputs(1, 4, 3, 5)
    allowed = (
        r"jaxenc.kernels.encoding: impl must be one of \('auto', 'pallas', 'xla'\), got 'triton'"
    )
    with pytest.raises(ValueError, match=allowed):
        encoding(x, c, s, impl="triton")
    with pytest.raises(
        TypeError, match=r"jaxenc.kernels.encoding: interpret must be a bool, got 1"
    ):
        encoding(x, c, s, impl="pallas", interpret=1)
    with pytest.raises(TypeError, match="interpret must be a bool, got 'yes'"):
        encoding(x, c, s, interpret="yes")


@pytest.mark.parametrize(
    "shapes, match",
    [
        (
            ((4, 5), (3, 5), (3,)),
            r"expected x of rank 3 \(B, N, D\), got shape \(4, 5\) \(rank 2\)",
        ),
        (
            ((1, 4, 5), (3, 5, 1), (3,)),
            r"expected codewords of rank 2 \(K, D\), got shape \(3, 5, 1\) \(rank 3\)",
        ),
        (
            ((1, 4, 5), (3, 5), (3, 1)),
            r"expected scale of rank 1 \(K\), got shape \(3, 1\) \(rank 2\)",
        ),
        (
            ((1, 4, 6), (3, 5), (3,)),
            r"x has D=6 features on its last axis \(shape \(1, 4, 6\)\) but codewords have D=5 \(shape \(3, 5\)\)",
        ),
        (((1, 4, 5), (3, 5), (4,)), r"scale has 4 entries but there are K=3 codewords"),
    ],
)
def test_shape_errors(shapes, match):
    x, c, s = (jnp.zeros(shape, jnp.float32) for shape in shapes)
    for impl in ("auto", "pallas"):
        with pytest.raises(ValueError, match=r"jaxenc.kernels.encoding: " + match):
            encoding(x, c, s, impl=impl, interpret=True)


def test_integer_inputs():
    x, c, s = jnp.zeros((1, 4, 5), jnp.int32), jnp.zeros((3, 5), jnp.int32), jnp.zeros((3,))
    with pytest.raises(
        TypeError, match="x and codewords must be floating point, got int32 and int32"
    ):
        encoding(x, c, s, impl="pallas", interpret=True)
    with pytest.raises(TypeError, match="must be floating point"):
        encoding(x, c, s)


# --------------------------------------------------------------------------------------------------
# 5. Flax modules


def test_encoding_module_impl():
    b, h, w, d, k = 2, 4, 5, 12, 6
    x = jnp.asarray(random_input((b, h, w, d), 31))
    variables = Encoding(d, k, impl="xla").init(jax.random.key(0), x)
    params = variables["params"]
    assert "pallas_call" in _jaxpr(Encoding(d, k, impl="pallas").apply, variables, x)
    assert "pallas_call" not in _jaxpr(Encoding(d, k, impl="xla").apply, variables, x)
    assert "pallas_call" not in _jaxpr(Encoding(d, k).apply, variables, x)  # auto on CPU
    out = Encoding(d, k, impl="xla").apply(variables, x)
    expected = encoding_reference(x.reshape(b, h * w, d), params["codewords"], params["scale"])
    assert_close(out, expected, what="Encoding(impl='xla')")
    # The module's inputs through the interpreted kernels agree too.
    assert_close(
        encoding(
            x.reshape(b, h * w, d),
            params["codewords"],
            params["scale"],
            impl="pallas",
            interpret=True,
        ),
        out,
        what="Encoding params through the kernels",
    )


def test_encoding_drop_module_impl():
    b, n, d, k = 2, 10, 12, 6
    x = jnp.asarray(random_input((b, n, d), 32))
    variables = EncodingDrop(d, k, impl="xla").init(jax.random.key(0), x)
    codewords = variables["params"]["codewords"]
    assert "pallas_call" in _jaxpr(EncodingDrop(d, k, impl="pallas").apply, variables, x)
    assert "pallas_call" not in _jaxpr(EncodingDrop(d, k, impl="xla").apply, variables, x)
    rngs = {"dropout": jax.random.key(3)}
    assert "pallas_call" in _jaxpr(
        lambda v, xx: EncodingDrop(d, k, impl="pallas").apply(v, xx, train=True, rngs=rngs),
        variables,
        x,
    )

    out = EncodingDrop(d, k, impl="xla").apply(variables, x)
    assert_close(
        out, encoding_reference(x, codewords, jnp.full((k,), -0.5)), what="EncodingDrop eval"
    )
    out, state = EncodingDrop(d, k, impl="xla").apply(
        variables, x, train=True, rngs=rngs, mutable=["intermediates"]
    )
    (used,) = state["intermediates"]["scale_used"]
    assert_close(out, encoding_reference(x, codewords, used), what="EncodingDrop train")


# --------------------------------------------------------------------------------------------------
# 6. Mixed dtypes


def test_mixed_dtypes_promote_and_grads_keep_input_dtypes():
    x, c, s, g = _inputs(2, 63, 7, 48, seed=41)
    x16 = x.astype(jnp.bfloat16)
    x_up = x16.astype(jnp.float32)  # what promotion computes with

    out, (dx, dc, ds) = _pallas(x16, c, s, g)
    assert out.dtype == jnp.float32
    assert dx.dtype == jnp.bfloat16 and dc.dtype == jnp.float32 and ds.dtype == jnp.float32
    out_ref, (dx_ref, dc_ref, ds_ref) = _reference(x_up, c, s, g)
    assert_close(out, out_ref, what="mixed out")
    assert_close(dx, dx_ref, BF16_RTOL, what="mixed d/dx (bf16)")
    assert_close(dc, dc_ref, what="mixed d/dcodewords")
    assert_close(ds, ds_ref, what="mixed d/dscale")

    # bfloat16 smoothing factors: computed in float32, gradient returned in bfloat16.
    s16 = s.astype(jnp.bfloat16)
    out, (dx, dc, ds) = _pallas(x, c, s16, g)
    assert out.dtype == dx.dtype == dc.dtype == jnp.float32 and ds.dtype == jnp.bfloat16
    out_ref, (_, _, ds_ref) = _reference(x, c, s16.astype(jnp.float32), g)
    assert_close(out, out_ref, what="bf16 scale out")
    assert_close(ds, ds_ref, BF16_RTOL, what="bf16 scale d/dscale")
