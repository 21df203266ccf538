"""jaxenc.nn.drop: DropBlock2d / drop_block2d.

holocron's DropBlock2d drops about p / block_size⁴ of the activations (double division by block_size²);
docs/DESIGN.md (Decisions on upstream bugs) decides that the dropped fraction equals p, so
instead of parity with a random mask these
tests check the distribution (overall and per position, borders included), the block structure, the
rescaling and the upstream properties that do not depend on the rate (identity in eval and at p = 0,
zeros at p = 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import assert_close, random_input

from jaxenc.nn.drop import DropBlock2d, drop_block2d, dropblock_seed_rate


def _train(module, x, key):
    return module.apply({}, x, train=True, rngs={"dropout": key})


def _train_jit(module, x, key):
    return jax.jit(functools.partial(module.apply, train=True))({}, x, rngs={"dropout": key})


# Compiled once per configuration: eager dispatch of the PRNG ops dominates the run time otherwise.
_drop = jax.jit(drop_block2d, static_argnames=("drop_prob", "block_size", "batch_shared"))


def _dropped_fraction(seed, n_masks, shape, p, block_size, batch_shared=False):
    """Fraction of zeroed positions over ``n_masks`` masks of spatial ``shape`` (input all ones)."""
    if batch_shared:  # one mask per call: many keys, each a compiled call on a batch of 2
        keys = jax.random.split(jax.random.key(seed), n_masks)
        x = jnp.ones((2, *shape, 1))
        outs = [_drop(x, k, p, block_size, batch_shared=True) for k in keys]
        return float(jnp.mean(jnp.stack(outs) == 0))
    out = _drop(jnp.ones((n_masks, *shape, 1)), jax.random.key(seed), p, block_size)
    return float(jnp.mean(out == 0))


# --- upstream properties ----------------------------------------------------------------------------


def test_identity_in_eval_and_at_p0():
    x = jnp.asarray(random_input((2, 16, 16, 4), seed=0, low=0.0))
    assert DropBlock2d(1.0, 3).apply({}, x) is x  # eval: no rng needed, the input itself
    assert DropBlock2d(0.5, 3).apply({}, x, train=False) is x
    assert _train(DropBlock2d(0.0, 3), x, jax.random.key(0)) is x
    assert DropBlock2d(0.0, 3).apply({}, x, train=True) is x  # p == 0 is static: no rng requested
    assert drop_block2d(x, jax.random.key(0), 0.0, 5) is x


@pytest.mark.parametrize("block_size", [1, 3, 7])
def test_all_dropped_at_p1(block_size):
    x = jnp.asarray(random_input((2, 16, 16, 4), seed=1, low=0.0))
    out = _train_jit(DropBlock2d(1.0, block_size), x, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), np.zeros(x.shape, np.float32))  # zeros, no NaN
    out = _drop(x, jax.random.key(1), 1.0, block_size, batch_shared=True)
    np.testing.assert_array_equal(np.asarray(out), np.zeros(x.shape, np.float32))


# --- the drop rate equals p -------------------------------------------------------------------------


def test_seed_rate():
    assert dropblock_seed_rate(0.0, 7) == 0.0
    assert dropblock_seed_rate(1.0, 7) == 1.0
    for p in (1e-6, 0.1, 0.3, 0.9):
        for bs in (1, 2, 3, 7):
            gamma = dropblock_seed_rate(p, bs)
            np.testing.assert_allclose(
                -np.expm1(bs * bs * np.log1p(-gamma)), p, rtol=1e-12
            )  # 1-(1-g)^n
    assert dropblock_seed_rate(0.1, 1) == pytest.approx(0.1, rel=1e-15)
    # A traced p (e.g. a schedule) gives the same rate in float32.
    traced = jax.jit(dropblock_seed_rate, static_argnums=1)(0.3, 7)
    np.testing.assert_allclose(traced, dropblock_seed_rate(0.3, 7), rtol=1e-6)


@pytest.mark.parametrize("batch_shared", [False, True])
@pytest.mark.parametrize("block_size", [3, 7])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropped_fraction_equals_p(p, block_size, batch_shared):
    # 4 seeds x 256 masks of 32x32. The mean dropped fraction must be within 10% of p; its standard
    # error is at most 0.0019 (p = 0.1, block 7: a 32x32 mask's fraction has a std of 0.06), so the
    # tolerance is >= 5 standard errors.
    fractions = [
        _dropped_fraction(seed, 256, (32, 32), p, block_size, batch_shared) for seed in range(4)
    ]
    assert abs(np.mean(fractions) - p) < 0.1 * p, (fractions, p)


@pytest.mark.parametrize("block_size", [2, 4])
def test_even_block_sizes(block_size):
    assert abs(_dropped_fraction(3, 256, (24, 24), 0.2, block_size) - 0.2) < 0.02
    out = _drop(jnp.ones((1, 9, 9, 2)), jax.random.key(0), 0.2, block_size)
    assert out.shape == (1, 9, 9, 2)


def test_rate_is_p_at_every_position_borders_included():
    # The naive gamma (and holocron's zero-padded max-pool) under-drops corners and edges; with the
    # extended seed grid every position has bs² candidate seeds. 8192 masks: a position's rate has a
    # standard error of 0.005, the tolerance (10% of p) is 6 of them.
    p, bs = 0.3, 5
    out = _drop(jnp.ones((8192, 12, 12, 1)), jax.random.key(7), p, bs)
    rate = np.asarray(jnp.mean((out == 0).astype(jnp.float32), axis=(0, 3)))
    np.testing.assert_allclose(rate, p, atol=0.1 * p)
    for corner in (rate[0, 0], rate[0, -1], rate[-1, 0], rate[-1, -1]):
        assert abs(corner - p) < 0.1 * p


# --- mask structure ---------------------------------------------------------------------------------


def _is_union_of_blocks(dropped: np.ndarray, bs: int) -> bool:
    """True when every dropped position lies in a bs x bs square (clipped to the image) fully dropped.

    Outside the image counts as droppable, since blocks seeded near a border are clipped."""
    h, w = dropped.shape
    padded = np.pad(dropped, bs - 1, constant_values=True)
    covered = np.zeros_like(padded)
    for a in range(h + bs - 1):
        for b in range(w + bs - 1):
            if padded[a : a + bs, b : b + bs].all():
                covered[a : a + bs, b : b + bs] = True
    return bool(np.array_equal(covered[bs - 1 : bs - 1 + h, bs - 1 : bs - 1 + w], dropped))


@pytest.mark.parametrize("block_size", [3, 4])
def test_dropped_regions_are_blocks_shared_across_channels(block_size):
    x = jnp.asarray(random_input((3, 20, 20, 5), seed=4, low=1.0))  # no zeros in the input
    out = np.asarray(_drop(x, jax.random.key(5), 0.15, block_size))
    dropped = out == 0
    assert dropped.any() and not dropped.all()
    np.testing.assert_array_equal(
        dropped, np.broadcast_to(dropped[..., :1], dropped.shape)
    )  # channels
    assert not all(np.array_equal(dropped[0], dropped[i]) for i in range(1, 3))  # per sample
    for i in range(3):
        assert _is_union_of_blocks(dropped[i, :, :, 0], block_size)


def test_batch_shared_mask():
    x = jnp.asarray(random_input((6, 16, 16, 3), seed=6, low=1.0))
    dropped = np.asarray(_drop(x, jax.random.key(8), 0.2, 3, batch_shared=True)) == 0
    assert dropped.any()
    np.testing.assert_array_equal(dropped, np.broadcast_to(dropped[:1, :, :, :1], dropped.shape))


def test_rng_controls_the_mask():
    x = jnp.ones((2, 16, 16, 1))
    module = DropBlock2d(0.2, 3)
    a, b = _train_jit(module, x, jax.random.key(0)), _train_jit(module, x, jax.random.key(1))
    assert not np.array_equal(np.asarray(a == 0), np.asarray(b == 0))
    np.testing.assert_array_equal(
        np.asarray(a), np.asarray(_train_jit(module, x, jax.random.key(0)))
    )


def test_rescaling_and_gradient():
    # With ones the output mean is exactly 1 (numel / sum(keep) over the whole batch).
    out = _drop(jnp.ones((4, 32, 32, 2)), jax.random.key(9), 0.3, 5)
    assert float(jnp.mean(out)) == pytest.approx(1.0, rel=1e-6)
    kept = np.asarray(out[..., 0] != 0)
    np.testing.assert_allclose(np.asarray(out[..., 0])[kept], kept.size / kept.sum(), rtol=1e-6)
    # Random inputs: the mean is kept in expectation.
    x = jnp.asarray(random_input((64, 32, 32, 4), seed=10, low=0.5))
    out = _drop(x, jax.random.key(11), 0.2, 7)
    assert float(jnp.mean(out)) == pytest.approx(float(jnp.mean(x)), rel=0.05)
    # d out / d x is the scaled mask.
    g = jax.jit(jax.grad(lambda v: jnp.sum(drop_block2d(v, jax.random.key(11), 0.2, 7))))(x)
    assert_close(g * x, out, rtol=1e-6, what="gradient")


# --- bfloat16, jit, vmap ----------------------------------------------------------------------------


def test_bfloat16():
    x = jnp.asarray(random_input((2, 16, 16, 3), seed=12, low=0.5))
    key = jax.random.key(13)
    ref = _train_jit(DropBlock2d(0.3, 3), x, key)
    out = _train_jit(DropBlock2d(0.3, 3, dtype=jnp.bfloat16), x, key)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out == 0), np.asarray(ref == 0))  # same mask
    assert_close(out, ref, rtol=2e-2, what="bf16")
    assert DropBlock2d(0.3, 3, dtype=jnp.bfloat16).apply({}, x).dtype == jnp.bfloat16  # eval too
    assert _drop(x.astype(jnp.bfloat16), key, 0.3, 3).dtype == jnp.bfloat16


def test_jit_and_vmap():
    module = DropBlock2d(0.25, 3)
    xs = jnp.asarray(random_input((3, 2, 12, 10, 4), seed=14, low=0.5))
    keys = jax.random.split(jax.random.key(15), 3)
    fn = functools.partial(module.apply, train=True)
    eager = fn({}, xs[0], rngs={"dropout": keys[0]})
    np.testing.assert_array_equal(
        np.asarray(jax.jit(fn)({}, xs[0], rngs={"dropout": keys[0]})), np.asarray(eager)
    )
    batched = jax.vmap(lambda v, k: fn({}, v, rngs={"dropout": k}))(xs, keys)
    jitted = jax.jit(fn)
    looped = jnp.stack([jitted({}, v, rngs={"dropout": k}) for v, k in zip(xs, keys)])
    assert_close(batched, looped, rtol=1e-6, what="vmap")
    np.testing.assert_array_equal(
        np.asarray(jax.jit(module.apply)({}, xs[0])), np.asarray(xs[0])
    )  # eval


def test_traced_drop_prob():
    # A schedule may pass p as a traced scalar: p = 0 then keeps everything and p = 1 drops everything.
    x = jnp.asarray(random_input((2, 12, 12, 3), seed=16, low=0.5))
    fn = jax.jit(lambda v, k, p: drop_block2d(v, k, p, 3))
    key = jax.random.key(17)
    np.testing.assert_array_equal(np.asarray(fn(x, key, 0.0)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(fn(x, key, 1.0)), np.zeros(x.shape, np.float32))
    np.testing.assert_array_equal(np.asarray(fn(x, key, 0.3)), np.asarray(_drop(x, key, 0.3, 3)))


# --- bad input --------------------------------------------------------------------------------------


def test_bad_input():
    x = jnp.ones((2, 8, 8, 3))
    key = jax.random.key(0)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(
            ValueError, match=r"DropBlock2d: p must be a probability in \[0, 1\], got"
        ):
            DropBlock2d(p, 3).apply({}, x)
        with pytest.raises(
            ValueError, match=r"drop_block2d: drop_prob must be a probability in \[0, 1\], got"
        ):
            drop_block2d(x, key, p, 3)
    with pytest.raises(
        ValueError, match=r"DropBlock2d: block_size must be a positive integer, got 0"
    ):
        _train(DropBlock2d(0.1, 0), x, key)
    with pytest.raises(
        ValueError, match=r"drop_block2d: block_size must be a positive integer, got 2.5"
    ):
        drop_block2d(x, key, 0.1, 2.5)
    with pytest.raises(
        ValueError, match=r"DropBlock2d: expected x of rank 4 \(N, H, W, C\), got shape \(8, 8, 3\)"
    ):
        _train(DropBlock2d(0.1, 3), x[0], key)
    with pytest.raises(
        ValueError, match=r"drop_block2d: drop_prob must be a scalar probability, got shape \(2,\)"
    ):
        drop_block2d(x, key, np.array([0.1, 0.2]), 3)
