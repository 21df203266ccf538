"""Small train states and a bitwise tree comparison shared by the checkpoint and fine-tuning tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _variables(seed=0, classes=3):
    r = np.random.default_rng(seed)
    return {
        "params": {
            "conv": {"kernel": jnp.asarray(r.normal(size=(3, 3, 3, 4)), jnp.float32)},
            "head": {
                "kernel": jnp.asarray(r.normal(size=(4, classes)), jnp.float32),
                "bias": jnp.zeros(classes),
            },
        },
        "batch_stats": {
            "bn": {"mean": jnp.asarray(r.normal(size=4), jnp.float32), "var": jnp.ones(4)}
        },
    }


def _state(seed=0, step=0):
    """A trainer-like state: params, batch_stats, SGD-momentum opt_state, empty EMA, rng key data, step."""
    variables = _variables(seed)
    tx = optax.sgd(0.1, momentum=0.9)
    params = variables["params"]
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: p * 0.5 + seed, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero momentum trace
    return {
        "step": jnp.asarray(step, jnp.int32),
        "params": params,
        "batch_stats": variables["batch_stats"],
        "opt_state": opt_state,
        "ema_params": {},
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


META = {"config_hash": "abc", "best_so_far": None}


def _assert_bitwise(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()
