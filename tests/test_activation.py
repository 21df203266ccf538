"""jaxenc.nn.activation vs holocron.nn 0.3.0: HardMish, NLReLU, FReLU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import torch
from parity import assert_close, check_module_parity, random_input, randomise_batchnorm

from jaxenc.nn.activation import FReLU, HardMish, NLReLU, hard_mish, nl_relu


def _torch_frelu(hnn, channels, kernel_size):
    module = hnn.FReLU(channels, kernel_size)
    randomise_batchnorm(module.bn)
    return module


# --- parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 4, 2), (3, 32)])
def test_hard_mish_parity(hnn, shape):
    # Scaled so that all three branches (x < -2, -2 <= x <= 0, x > 0) are well populated.
    x = 2.0 * random_input(shape, seed=1)
    check_module_parity(hnn.HardMish(), HardMish(), x)


def test_hard_mish_kinks_match_torch_gradient(hF):
    # At x = -2 and x = 0 torch's clamp passes the gradient (closed interval); so must we.
    x = np.array([-3.0, -2.0, -1.0, 0.0, 1.0], np.float32)
    xt = torch.tensor(x, requires_grad=True)
    hF.hard_mish(xt).sum().backward()
    g = jax.grad(lambda v: hard_mish(v).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), xt.grad.numpy())
    np.testing.assert_array_equal(np.asarray(hard_mish(x)), hF.hard_mish(torch.tensor(x)).numpy())


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.3])
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (4, 10)])
def test_nl_relu_parity(hnn, beta, shape):
    check_module_parity(hnn.NLReLU(beta=beta), NLReLU(beta=beta), random_input(shape, seed=2))


def test_nl_relu_functional_matches_upstream(hF):
    x = random_input((4, 3, 8, 8), seed=3)
    for beta in (1.0, 3.0):
        assert_close(nl_relu(jnp.asarray(x), beta), hF.nl_relu(torch.tensor(x), beta=beta).numpy())
    assert_close(hard_mish(jnp.asarray(x)), hF.hard_mish(torch.tensor(x)).numpy())


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "shape,kernel_size",
    [((2, 7, 9, 4), 3), ((3, 5, 5, 3), 5), ((2, 6, 8, 2), 1), ((1, 8, 8, 8), 3)],
)
def test_frelu_parity(hnn, shape, kernel_size, train):
    torch_module = _torch_frelu(hnn, shape[-1], kernel_size)
    check_module_parity(
        torch_module, FReLU(shape[-1], kernel_size), random_input(shape, seed=4), train=train
    )


def test_frelu_train_and_eval_differ(hnn):
    x = random_input((2, 6, 6, 4), seed=5)
    module = FReLU(4)
    variables = module.init(jax.random.key(0), x)
    eval_out = module.apply(variables, x)
    train_out, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(eval_out, train_out)
    assert not np.allclose(
        state["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"]
    )


def test_frelu_variable_layout(hnn):
    variables = FReLU(8, 5).init(jax.random.key(0), jnp.zeros((1, 9, 9, 8)))
    shapes = jax.tree_util.tree_map(jnp.shape, variables)
    assert shapes == {
        "params": {
            "conv": {"kernel": (5, 5, 1, 8), "bias": (8,)},
            "bn": {"scale": (8,), "bias": (8,)},
        },
        "batch_stats": {"bn": {"mean": (8,), "var": (8,)}},
    }
    # Upstream property: FReLU(8) in eval mode keeps the shape.
    x = random_input((4, 32, 32, 8), seed=6)
    out = FReLU(8).apply(FReLU(8).init(jax.random.key(0), x), x)
    assert out.shape == x.shape


def test_upstream_shapes_kept():
    # Upstream test_nn_activation: hard_mish and nl_relu on rand(4, 3, 32, 32) keep the shape.
    x = jnp.asarray(random_input((4, 32, 32, 3), seed=7, low=0.0))
    assert hard_mish(x).shape == x.shape
    assert nl_relu(x).shape == x.shape


# --- bfloat16, jit, vmap ----------------------------------------------------------------------------

_CASES = {
    "HardMish": (lambda dt: HardMish(dtype=dt), False),
    "NLReLU": (lambda dt: NLReLU(beta=1.7, dtype=dt), False),
    "FReLU": (lambda dt: FReLU(4, dtype=dt), True),
}


def _variables(make, x):
    variables = make(None).init(jax.random.key(0), x)
    # Non-trivial BN state so that eval mode is not a no-op normalisation.
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.3 if "var" in jax.tree_util.keystr(path) else v, variables
    )


@pytest.mark.parametrize("name", sorted(_CASES))
def test_bfloat16(name):
    make, has_train = _CASES[name]
    x = jnp.asarray(2.0 * random_input((2, 9, 7, 4), seed=8))
    variables = _variables(make, x)
    for train in (False, True) if has_train else (False,):
        kwargs = {"train": True, "mutable": ["batch_stats"]} if train else {}
        ref = make(None).apply(variables, x, **kwargs)
        out = make(jnp.bfloat16).apply(variables, x, **kwargs)
        if train:
            ref, out = ref[0], out[0]
        assert out.dtype == jnp.bfloat16
        assert_close(out, ref, rtol=2e-2, what=f"{name} bf16 train={train}")


@pytest.mark.parametrize("name", sorted(_CASES))
def test_jit_and_vmap(name):
    make, has_train = _CASES[name]
    module = make(None)
    xs = jnp.asarray(random_input((3, 2, 6, 5, 4), seed=9))
    variables = _variables(make, xs[0])
    eager = module.apply(variables, xs[0])
    assert_close(jax.jit(module.apply)(variables, xs[0]), eager, rtol=1e-6, what="jit")
    if has_train:
        fn = functools.partial(module.apply, train=True, mutable=["batch_stats"])
        (jit_out, jit_state), (out, state) = jax.jit(fn)(variables, xs[0]), fn(variables, xs[0])
        assert_close(jit_out, out, rtol=1e-6, what="jit train")
        assert_close(
            jit_state["batch_stats"]["bn"]["var"], state["batch_stats"]["bn"]["var"], rtol=1e-6
        )
    batched = jax.vmap(lambda v: module.apply(variables, v))(xs)
    looped = jnp.stack([module.apply(variables, v) for v in xs])
    assert_close(batched, looped, rtol=1e-6, what="vmap")


# --- bad input --------------------------------------------------------------------------------------


def test_frelu_bad_input():
    x = jnp.zeros((2, 8, 8, 4))
    with pytest.raises(ValueError, match=r"FReLU: in_channels=3 but the input has 4 channels"):
        FReLU(3).init(jax.random.key(0), x)
    with pytest.raises(
        ValueError, match=r"FReLU: expected x of rank 4 \(N, H, W, C\), got shape \(8, 8, 4\)"
    ):
        FReLU(4).init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"FReLU: kernel_size must be odd .* got 4"):
        FReLU(4, 4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"FReLU: kernel_size must be a positive integer, got 0"):
        FReLU(4, 0).init(jax.random.key(0), x)
