"""jaxenc.nn.drop.DropBlock2D: PyTorch-Encoding's DropBlock with a schedule that advances.

Upstream (encoding/nn/dropblock.py) keeps a step counter ``i`` and a
drop probability that rises linearly between ``start_step`` and ``start_step + nr_steps``, but
returns early while the probability is 0 and only steps after that, so the shipped recipes
(start_value 0) never drop anything. docs/DESIGN.md (Decisions on upstream bugs) decides: the schedule
really advances and the dropped fraction equals the current probability. Masks are random, so
these tests check the schedule values, the counter, the dropped fractions over many draws and the
mask structure instead of values against torch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import torch
from parity import random_input

from jaxenc.nn.drop import DropBlock2D, drop_block2d, dropblock_seed_rate
from jaxenc.port import torch_to_flax


def _train_step(module):
    """One compiled training call: (variables, x, key) -> (y, variables with the advanced counter)."""

    @jax.jit
    def step(variables, x, key):
        y, state = module.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return y, {**variables, **state}

    return step


def _at_step(variables, step):
    return {"batch_stats": {"i": jnp.asarray(step, jnp.int32)}}


def _upstream_schedule(start_step, nr_steps, start_value, stop_value, calls):
    """Upstream's reset_steps + step(), as if forward always called step(): the p of each call."""
    drop_prob, step_size, probs = start_value, (stop_value - start_value) / nr_steps, []
    for idx in range(calls):
        if start_step < idx < start_step + nr_steps:
            drop_prob += step_size
        probs.append(drop_prob)
    return probs


# --- inference, counter ----------------------------------------------------------------------------


def test_identity_in_eval():
    x = jnp.asarray(random_input((2, 12, 10, 4), seed=0))
    for m in (
        DropBlock2D(0.5, 3),
        DropBlock2D(0.5, 3, nr_steps=10),
        DropBlock2D(1.0, 3, share_channel=True),
    ):
        v = m.init(jax.random.key(0), x)
        assert m.apply(v, x) is x
        y, state = m.apply(v, x, mutable=["batch_stats"])  # eval does not advance the schedule
        assert y is x and int(state["batch_stats"]["i"]) == 0
    assert DropBlock2D(0.5, 3).apply({}, x) is x  # no variables needed in inference
    assert jnp.array_equal(jax.jit(DropBlock2D(0.5, 3).apply)({"batch_stats": {"i": 0}}, x), x)


def test_counter_counts_training_calls_not_init():
    x = jnp.ones((2, 8, 8, 3))
    m = DropBlock2D(0.2, 3, nr_steps=100)
    v = m.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=True)
    assert v["batch_stats"]["i"].dtype == jnp.int32 and v["batch_stats"]["i"].shape == ()
    assert int(v["batch_stats"]["i"]) == 0
    step = _train_step(m)
    for n in range(1, 4):
        _, v = step(v, x, jax.random.key(n))
        assert int(v["batch_stats"]["i"]) == n
    # Eagerly too, and without a schedule the counter still counts.
    _, state = DropBlock2D(0.2, 3).apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
    )
    assert int(state["batch_stats"]["i"]) == 4


# --- schedule --------------------------------------------------------------------------------------


def test_schedule_values():
    m = DropBlock2D(0.3, 3, start_step=10, nr_steps=20)  # start_value 0, stop_value = drop_prob
    assert float(m.drop_prob_at(0)) == 0.0 and float(m.drop_prob_at(10)) == 0.0
    assert float(m.drop_prob_at(20)) == pytest.approx(0.15, rel=1e-6)  # mid
    assert float(m.drop_prob_at(30)) == np.float32(0.3) and float(
        m.drop_prob_at(10**6)
    ) == np.float32(0.3)
    decreasing = DropBlock2D(0.9, 3, nr_steps=4, start_value=0.2, stop_value=0.1)
    np.testing.assert_allclose(
        [float(decreasing.drop_prob_at(i)) for i in range(6)],
        [0.2, 0.175, 0.15, 0.125, 0.1, 0.1],
        rtol=1e-6,
    )
    assert DropBlock2D(0.3, 3).drop_prob_at(123) == 0.3  # no schedule: constant, a Python float
    traced = jax.jit(m.drop_prob_at)(jnp.int32(25))
    assert float(traced) == pytest.approx(0.225, rel=1e-6)


def test_schedule_follows_upstream_reset_steps_until_the_end():
    # Upstream's arithmetic (had its step() run) agrees call by call, except that it stops one step
    # short of stop_value; ours reaches it (the documented intent).
    start_step, nr_steps, calls = 3, 8, 16
    upstream = _upstream_schedule(start_step, nr_steps, 0.0, 0.2, calls)
    m = DropBlock2D(0.2, 3, start_step=start_step, nr_steps=nr_steps)
    ours = [float(m.drop_prob_at(i)) for i in range(calls)]
    end = start_step + nr_steps
    np.testing.assert_allclose(ours[:end], upstream[:end], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours[end:], 0.2, rtol=1e-6)
    np.testing.assert_allclose(upstream[end:], 0.2 - 0.2 / nr_steps, rtol=1e-6)


def test_schedule_really_advances_over_training_calls():
    # The shipped recipe: reset_dropblock(warmup, total, 0.0, p). Upstream never drops; here the
    # probability grows with the training calls made through a jitted step that carries batch_stats.
    x = jnp.ones((2, 24, 24, 8))
    m = DropBlock2D(0.4, 3, start_step=2, nr_steps=8, start_value=0.0)
    step = _train_step(m)
    v = m.init(jax.random.key(0), x)
    fractions = []
    for n in range(14):
        y, v = step(v, x, jax.random.key(100 + n))
        if n <= 2:  # p = 0 (traced): exactly the input
            assert jnp.array_equal(y, x)
        fractions.append(float(jnp.mean(y == 0)))
    assert int(v["batch_stats"]["i"]) == 14
    assert fractions[:3] == [0.0, 0.0, 0.0]
    assert 0.3 < np.mean(fractions[10:]) < 0.5  # at stop_value 0.4 (single draws: loose)
    assert np.mean(fractions[3:6]) < np.mean(fractions[7:10]) < np.mean(fractions[10:])


@pytest.mark.parametrize("share_channel", [False, True])
def test_dropped_fraction_follows_the_schedule(share_channel):
    # At steps 0 (start), mid and end: the mean dropped fraction over 64 independent draws (vmap over
    # keys) is within 10% of the scheduled p. One draw of a 32x32x8 per-channel mask has a fraction std
    # of ~0.02 at p = 0.2 (blocks of 9 correlated positions); 64 draws bring it to ~0.0025, so 10% of p
    # is >= 4 standard errors at p = 0.1. The channel-shared mask has 8x fewer positions: 256 draws.
    m = DropBlock2D(0.3, 3, share_channel=share_channel, start_step=4, nr_steps=10, start_value=0.1)
    x = jnp.ones((2, 32, 32, 8))
    keys = jax.random.split(jax.random.key(7), 64 if not share_channel else 256)

    @jax.jit
    def fraction(step):
        def one(key):
            y, _ = m.apply(
                _at_step(None, step), x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
            )
            return jnp.mean(y[0] == 0)

        return jnp.mean(jax.vmap(one)(keys))

    for s, expected in ((0, 0.1), (9, 0.2), (14, 0.3), (50, 0.3)):
        assert float(m.drop_prob_at(s)) == pytest.approx(expected, rel=1e-6)
        got = float(fraction(s))
        assert abs(got - expected) < 0.1 * expected, (s, got, expected)


# --- mask structure --------------------------------------------------------------------------------


def _dropped(module, x, key=0):
    v = {"batch_stats": {"i": jnp.int32(0)}}
    y, _ = module.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(key)}
    )
    return np.asarray(y == 0)


def test_mask_shared_by_the_batch_per_channel():
    x = jnp.asarray(random_input((5, 16, 16, 6), seed=1, low=1.0))  # no zeros in the input
    dropped = _dropped(DropBlock2D(0.2, 3, batch_shared=True), x)
    assert dropped.any() and not dropped.all()
    np.testing.assert_array_equal(
        dropped, np.broadcast_to(dropped[:1], dropped.shape)
    )  # all samples
    assert not all(
        np.array_equal(dropped[..., 0], dropped[..., c]) for c in range(1, 6)
    )  # per channel
    # Kept values are rescaled by numel / kept of the (1, H, W, C) mask.
    y = np.asarray(
        DropBlock2D(0.2, 3, batch_shared=True).apply(
            {"batch_stats": {"i": 0}},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0)},
        )[0]
    )
    keep = ~dropped[0]
    np.testing.assert_allclose(
        y[0][keep] / np.asarray(x)[0][keep], keep.size / keep.sum(), rtol=1e-6
    )


def test_share_channel_and_per_sample_masks():
    x = jnp.asarray(random_input((5, 16, 16, 6), seed=2, low=1.0))
    dropped = _dropped(DropBlock2D(0.2, 3, share_channel=True, batch_shared=True), x)
    assert dropped.any()
    np.testing.assert_array_equal(dropped, np.broadcast_to(dropped[:1, :, :, :1], dropped.shape))
    # The default: one mask per sample (what upstream's code draws), channel-shared or not.
    per_sample = _dropped(DropBlock2D(0.2, 3, share_channel=True), x)
    np.testing.assert_array_equal(
        per_sample, np.broadcast_to(per_sample[..., :1], per_sample.shape)
    )
    assert not all(np.array_equal(per_sample[0], per_sample[n]) for n in range(1, 5))
    per_sample_channel = _dropped(DropBlock2D(0.2, 3), x)
    assert not all(
        np.array_equal(per_sample_channel[0], per_sample_channel[n]) for n in range(1, 5)
    )
    assert not all(
        np.array_equal(per_sample_channel[..., 0], per_sample_channel[..., c]) for c in range(1, 6)
    )


@pytest.mark.parametrize("share_channel", [False, True])
def test_p1_block1_gives_zeros(share_channel):
    x = jnp.asarray(random_input((3, 7, 9, 4), seed=3))
    y = _dropped(DropBlock2D(1.0, 1, share_channel=share_channel), x)
    assert y.all()  # every position zero, no NaN from the kept-count normalisation
    m = DropBlock2D(0.5, 1, nr_steps=2, start_value=1.0, stop_value=1.0)  # p = 1 traced
    out, _ = _train_step(m)(m.init(jax.random.key(0), x), x, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out), np.zeros(x.shape, np.float32))


def test_traced_zero_probability_is_exactly_the_input():
    x = jnp.asarray(random_input((2, 9, 11, 3), seed=4))
    for dtype in (jnp.float32, jnp.bfloat16):
        m = DropBlock2D(
            0.3, 5, nr_steps=10, dtype=dtype
        )  # start_value 0: p(0) == 0, traced under jit
        y, v = _train_step(m)(m.init(jax.random.key(0), x), x, jax.random.key(2))
        assert y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x.astype(dtype)))
        assert int(v["batch_stats"]["i"]) == 1


def test_drop_block2d_per_channel_keyword():
    x = jnp.asarray(random_input((3, 20, 20, 4), seed=5, low=1.0))
    key = jax.random.key(6)
    # The default path is the pre-existing one, bit for bit (restated here).
    bs, p = 3, 0.25
    seeds = jax.random.bernoulli(key, dropblock_seed_rate(p, bs), (3, 22, 22)).astype(jnp.float32)
    keep = 1.0 - jax.lax.reduce_window(seeds, 0.0, jax.lax.max, (1, bs, bs), (1, 1, 1), "VALID")
    old = x * (keep * (keep.size / jnp.sum(keep)))[..., None]
    np.testing.assert_array_equal(np.asarray(drop_block2d(x, key, p, bs)), np.asarray(old))
    np.testing.assert_array_equal(
        np.asarray(drop_block2d(x, key, p, bs, per_channel=False)), np.asarray(old)
    )
    # per_channel: channels differ, each channel's mask is made of blocks, the fraction is p.
    dropped = np.asarray(drop_block2d(x, key, p, bs, per_channel=True) == 0)
    assert not all(np.array_equal(dropped[..., 0], dropped[..., c]) for c in range(1, 4))
    many = jax.jit(
        functools.partial(
            drop_block2d, drop_prob=p, block_size=bs, per_channel=True, batch_shared=True
        )
    )
    fraction = np.mean(
        [float(jnp.mean(many(jnp.ones((1, 32, 32, 64)), jax.random.key(k)) == 0)) for k in range(8)]
    )
    assert abs(fraction - p) < 0.1 * p


# --- bfloat16, jit, vmap, port ---------------------------------------------------------------------


def test_bfloat16_same_mask():
    x = jnp.asarray(random_input((2, 16, 16, 3), seed=8, low=0.5))
    v = {"batch_stats": {"i": jnp.int32(0)}}
    ref, _ = _train_step(DropBlock2D(0.3, 3))(v, x, jax.random.key(9))
    out, _ = _train_step(DropBlock2D(0.3, 3, dtype=jnp.bfloat16))(v, x, jax.random.key(9))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out == 0), np.asarray(ref == 0))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=1e-2)
    assert DropBlock2D(0.3, 3, dtype=jnp.bfloat16).apply(v, x).dtype == jnp.bfloat16


def test_jit_equals_eager_and_vmap_over_inputs():
    m = DropBlock2D(0.25, 3, nr_steps=4)
    x = jnp.asarray(random_input((2, 12, 10, 4), seed=10, low=0.5))
    v = {"batch_stats": {"i": jnp.int32(2)}}
    key = jax.random.key(11)
    step = _train_step(m)
    eager, state = m.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
    jitted, jstate = step(v, x, key)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    assert int(state["batch_stats"]["i"]) == int(jstate["batch_stats"]["i"]) == 3
    # vmap over an extra leading axis with one key: each slice gets what a call on it gets.
    xs = jnp.asarray(random_input((3, 2, 12, 10, 4), seed=12, low=0.5))
    batched, _ = jax.vmap(lambda u: step(v, u, key))(xs)
    looped = jnp.stack([step(v, u, key)[0] for u in xs])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-6)


class TorchDropBlock2D(torch.nn.Module):
    """Upstream's state handling: buffers ``i`` and ``drop_prob``, and a state_dict that saves neither."""

    def __init__(self, drop_prob, block_size, share_channel=False):
        super().__init__()
        self.register_buffer("i", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("drop_prob", drop_prob * torch.ones(1, dtype=torch.float32))
        self.block_size, self.share_channel = block_size, share_channel

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass


def test_torch_to_flax_starts_the_counter_at_zero():
    x = np.zeros((2, 8, 8, 3), np.float32)
    torch_module = TorchDropBlock2D(0.1, 3)
    torch_module.i += 5  # never saved upstream
    assert torch_module.state_dict() == {}
    v = torch_to_flax(DropBlock2D(0.1, 3), torch_module.state_dict(), x)
    assert int(v["batch_stats"]["i"]) == 0 and v["batch_stats"]["i"].dtype == jnp.int32


# --- bad input -------------------------------------------------------------------------------------


def test_bad_input():
    x = jnp.ones((2, 8, 8, 3))
    v = {"batch_stats": {"i": jnp.int32(0)}}
    rngs = {"dropout": jax.random.key(0)}
    for p in (-0.1, 1.5):
        with pytest.raises(
            ValueError, match=r"DropBlock2D: drop_prob must be a probability in \[0, 1\], got"
        ):
            DropBlock2D(p, 3).apply(v, x)
    with pytest.raises(
        ValueError, match=r"DropBlock2D: start_value must be a probability in \[0, 1\], got 2"
    ):
        DropBlock2D(0.1, 3, nr_steps=5, start_value=2).apply(v, x)
    with pytest.raises(
        ValueError, match=r"DropBlock2D: stop_value must be a probability in \[0, 1\], got -0.1"
    ):
        DropBlock2D(0.1, 3, nr_steps=5, stop_value=-0.1).apply(v, x)
    with pytest.raises(
        ValueError, match=r"DropBlock2D: nr_steps must be a non-negative integer, got -1"
    ):
        DropBlock2D(0.1, 3, nr_steps=-1).apply(v, x)
    with pytest.raises(
        ValueError, match=r"DropBlock2D: start_step must be a non-negative integer, got 1.5"
    ):
        DropBlock2D(0.1, 3, start_step=1.5, nr_steps=3).apply(v, x)
    with pytest.raises(
        ValueError, match=r"DropBlock2D: block_size must be a positive integer, got 0"
    ):
        DropBlock2D(0.1, 0).apply(v, x)
    with pytest.raises(
        ValueError, match=r"DropBlock2D: expected x of rank 4 \(N, H, W, C\), got shape \(8, 8, 3\)"
    ):
        DropBlock2D(0.1, 3).apply(v, x[0])
    # A schedule that cannot advance is an error, not a silent constant.
    with pytest.raises(
        ValueError,
        match=r"DropBlock2D: a drop-probability schedule \(nr_steps=5\) needs .* mutable",
    ):
        DropBlock2D(0.1, 3, nr_steps=5).apply(v, x, train=True, rngs=rngs)
    with pytest.raises(
        ValueError, match=r"DropBlock2D: a drop-probability schedule \(nr_steps=5\) needs its step"
    ):
        DropBlock2D(0.1, 3, nr_steps=5).apply({}, x, train=True, rngs=rngs)
    # Without a schedule, training works with frozen or absent batch_stats (the counter just does not move).
    assert DropBlock2D(0.1, 3).apply(v, x, train=True, rngs=rngs).shape == x.shape
    assert DropBlock2D(0.1, 3).apply({}, x, train=True, rngs=rngs).shape == x.shape
