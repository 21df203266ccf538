"""jaxenc.nn.attention (SAM, TripletAttention, LambdaLayer) against pylocron 0.3.0.

Upstream: pylocron 0.3.0's attention layers and its test suite (test_nn_attention.py, the LambdaLayer parts of
test_nn_conv.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax.traverse_util import flatten_dict
from optional_torch import torch
from parity import assert_close, check_module_parity, random_input, randomise_batchnorm

from jaxenc.nn.attention import SAM, DimAttention, LambdaLayer, TripletAttention
from jaxenc.port import torch_key


def init(module, x, train: bool = False):
    """``module.init`` compiled as one program (eager init dispatches and compiles op by op)."""
    kwargs = {"train": True} if train else {}
    return jax.jit(lambda key, xx: module.init(key, xx, **kwargs))(
        jax.random.key(0), jnp.asarray(x)
    )


# --- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 7, 9, 4), (1, 8, 8, 3), (3, 5, 6, 16)])
def test_sam_parity(hnn, shape):
    check_module_parity(hnn.SAM(shape[-1]), SAM(shape[-1]), random_input(shape, seed=1))


# Non-square odd sizes make the rotated h/w branches distinguishable: a wrong (row, col) order of
# their 7x7 planes (or swapped branches) fails here, not only on square inputs.
@pytest.mark.parametrize(
    "shape, train", [((2, 7, 9, 4), False), ((2, 7, 9, 4), True), ((2, 8, 8, 4), True)]
)
def test_triplet_attention_parity(hnn, shape, train):
    torch_module = randomise_batchnorm(hnn.TripletAttention())
    check_module_parity(torch_module, TripletAttention(), random_input(shape, seed=2), train=train)


@pytest.mark.parametrize(
    "shape, kwargs, train",
    [
        ((2, 7, 9, 4), dict(out_channels=8, dim_k=4, r=3), False),
        ((2, 7, 9, 4), dict(out_channels=8, dim_k=4, r=3), True),
        ((2, 9, 5, 6), dict(out_channels=12, dim_k=4, r=5, dim_u=2), False),
        ((2, 9, 5, 6), dict(out_channels=12, dim_k=4, r=5, dim_u=2), True),
        ((2, 11, 10, 8), dict(out_channels=16, dim_k=8, r=7, num_heads=2), False),
    ],
)
def test_lambda_layer_local_parity(hnn, shape, kwargs, train):
    c = shape[-1]
    torch_module = randomise_batchnorm(hnn.LambdaLayer(c, **kwargs))
    check_module_parity(
        torch_module, LambdaLayer(c, **kwargs), random_input(shape, seed=4), train=train
    )


@pytest.mark.parametrize(
    "shape, kwargs, train",
    [
        ((2, 7, 9, 4), dict(out_channels=8, dim_k=4, n=63), False),
        ((2, 7, 9, 4), dict(out_channels=8, dim_k=4, n=63), True),
        ((3, 5, 3, 6), dict(out_channels=12, dim_k=4, n=15, num_heads=3, dim_u=2), True),
    ],
)
def test_lambda_layer_global_parity(hnn, shape, kwargs, train):
    c = shape[-1]
    torch_module = randomise_batchnorm(hnn.LambdaLayer(c, **kwargs))
    check_module_parity(
        torch_module, LambdaLayer(c, **kwargs), random_input(shape, seed=5), train=train
    )


# Batch 1 is compared in eval mode through a batch of 2 whose second example gets no cotangent:
# torch 2.13 CPU computes wrong BatchNorm2d input gradients when the batch is 1 and the incoming
# gradient has channels-last-like strides (upstream's reshape/permute after norm_q / norm_v produce
# exactly that), so a plain batch-1 torch reference is wrong (finite differences agree with jaxenc).
# In eval mode examples are independent, so example 0 of the batch of 2 is the batch-1 reference.
@pytest.mark.parametrize("kwargs", [dict(r=5), dict(n=42, dim_u=2)])
def test_lambda_layer_batch1_parity(hnn, kwargs):
    x = random_input((1, 6, 7, 8), seed=10)
    extra = torch.tensor(random_input((1, 8, 6, 7), seed=11))
    check_module_parity(
        randomise_batchnorm(hnn.LambdaLayer(8, 16, 8, **kwargs)),
        LambdaLayer(8, 16, 8, **kwargs),
        x,
        torch_forward=lambda m, xt: m(torch.cat([xt, extra]))[:1],
    )


def test_lambda_layer_r_takes_precedence_over_n(hnn):
    """Upstream uses local lambdas whenever r is given, ignoring n (no input-size check then)."""
    assert "R" in hnn.LambdaLayer(4, 8, 4, n=999, r=3).state_dict()
    shapes = jax.eval_shape(lambda: init(LambdaLayer(4, 8, 4, n=999, r=3), jnp.zeros((2, 5, 6, 4))))
    assert "R" in shapes["params"] and "pos_emb" not in shapes["params"]


def test_parameter_names_are_torch_keys(hnn):
    x = random_input((1, 6, 7, 4))
    for torch_module, module in [
        (hnn.SAM(4), SAM(4)),
        (hnn.TripletAttention(), TripletAttention()),
        (hnn.LambdaLayer(4, 8, 4, r=3, dim_u=2), LambdaLayer(4, 8, 4, r=3, dim_u=2)),
        (hnn.LambdaLayer(4, 8, 4, n=42), LambdaLayer(4, 8, 4, n=42)),
    ]:
        flat = flatten_dict(jax.eval_shape(lambda: init(module, x)))
        keys = {torch_key(collection, tuple(path)) for collection, *path in flat}
        expected = {k for k in torch_module.state_dict() if not k.endswith("num_batches_tracked")}
        assert keys == expected, type(module).__name__
    flat = flatten_dict(init(LambdaLayer(4, 8, 4, r=5, dim_u=2), x)["params"])
    assert flat[("R",)].shape == (4, 2, 1, 5, 5)
    flat = flatten_dict(init(LambdaLayer(4, 8, 4, n=42, dim_u=2), x)["params"])
    assert flat[("pos_emb",)].shape == (42, 42, 4, 2)


def test_lambda_position_parameters_are_standard_normal():
    x = jnp.zeros((1, 8, 8, 2))
    pos = init(LambdaLayer(2, 4, 16, n=64), x)["params"]["pos_emb"]
    rel = init(LambdaLayer(2, 4, 16, r=31, dim_u=4), x)["params"]["R"]
    for p in (pos, rel):
        assert abs(float(jnp.mean(p))) < 0.05 and abs(float(jnp.std(p)) - 1.0) < 0.05


# --- upstream test-suite properties --------------------------------------------------------


@pytest.mark.parametrize("module", [SAM(4), TripletAttention()], ids=["SAM", "TripletAttention"])
def test_upstream_attention_shapes_and_grads(module):
    x = jnp.asarray(random_input((2, 8, 8, 4), low=0.0))  # upstream: torch.rand
    variables = init(module, x)
    assert module.apply(variables, x).shape == (2, 8, 8, 4)

    def loss(params):
        kwargs = {"train": True, "mutable": ["batch_stats"]} if "batch_stats" in variables else {}
        out = module.apply({**variables, "params": params}, x, **kwargs)
        return jnp.sum(out[0] if kwargs else out)

    grads = jax.grad(loss)(variables["params"])
    first = jax.tree_util.tree_leaves(grads)[0]
    assert first.shape and bool(jnp.all(jnp.isfinite(first))) and bool(jnp.any(first != 0))


def test_upstream_lambda_layer_shape():
    module = LambdaLayer(8, 32, 16, r=13)
    x = jnp.asarray(random_input((2, 32, 32, 8), low=0.0))
    variables = init(module, x, train=True)
    out = jax.eval_shape(
        lambda v, xx: module.apply(v, xx, train=True, mutable=["batch_stats"])[0], variables, x
    )
    assert out.shape == (2, 32, 32, 32)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((3, 31, 16), {}, r"out_channels=31 must be divisible by num_heads=4"),
        ((3, 32, 16), {"r": 2}, r"r .* must be odd, got r=2"),
        ((3, 32, 16), {"r": None, "n": None}, r"give r .* or n .*both are None"),
    ],
)
def test_upstream_lambda_layer_constructor_errors(hnn, args, kwargs, match):
    with pytest.raises(AssertionError):
        hnn.LambdaLayer(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        LambdaLayer(*args, **kwargs)


# --- dtypes, transformations ------------------------------------------------------------------------

MODULES = {
    "SAM": SAM(6),
    "TripletAttention": TripletAttention(),
    "LambdaLocal": LambdaLayer(6, 8, 4, r=5, dim_u=2),
    "LambdaGlobal": LambdaLayer(6, 8, 4, n=35),
}


@pytest.mark.parametrize(
    "name, train",
    [(name, False) for name in MODULES] + [("TripletAttention", True), ("LambdaLocal", True)],
)
def test_bfloat16_close_to_float32(name, train):
    module = MODULES[name]
    x = jnp.asarray(random_input((2, 5, 7, 6), seed=7))
    variables = init(module, x)
    kwargs = (
        {"train": True, "mutable": ["batch_stats"]} if train and "batch_stats" in variables else {}
    )
    ref = jax.jit(lambda v, xx: module.apply(v, xx, **kwargs))(variables, x)
    bf16 = module.clone(dtype=jnp.bfloat16)
    out = jax.jit(lambda v, xx: bf16.apply(v, xx, **kwargs))(variables, x)
    if kwargs:
        (ref, ref_stats), (out, out_stats) = ref, out
        for a, b in zip(jax.tree_util.tree_leaves(out_stats), jax.tree_util.tree_leaves(ref_stats)):
            assert a.dtype == jnp.float32
            assert_close(a, b, rtol=2e-2, what="bfloat16 batch_stats")
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, rtol=2e-2, what=f"{name} bfloat16")


@pytest.mark.parametrize("name", list(MODULES))
def test_jit_and_vmap(name):
    module = MODULES[name]
    xs = jnp.asarray(random_input((3, 2, 5, 7, 6), seed=8))
    variables = init(module, xs[0])
    eager = module.apply(variables, xs[0])
    assert_close(jax.jit(module.apply)(variables, xs[0]), eager, rtol=1e-6, what="jit")
    batched = jax.jit(jax.vmap(module.apply, in_axes=(None, 0)))(variables, xs)
    looped = jnp.stack([jax.jit(module.apply)(variables, x) for x in xs])
    assert_close(batched, looped, rtol=1e-5, what="vmap")


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODULES))
def test_bad_rank(name):
    module = MODULES[name]
    with pytest.raises(
        ValueError, match=r"expected x of rank 4 \(N, H, W, C\), got shape \(5, 7, 6\)"
    ):
        init(module, jnp.zeros((5, 7, 6)))


@pytest.mark.parametrize("name", ["SAM", "LambdaLocal", "LambdaGlobal"])
def test_channel_mismatch(name):
    module = MODULES[name]
    prefix = "SAM" if name == "SAM" else "LambdaLayer"
    with pytest.raises(ValueError, match=rf"{prefix}: in_channels=6 but the input has 4 channels"):
        init(module, jnp.zeros((2, 5, 7, 4)))


def test_lambda_global_size_mismatch():
    match = r"LambdaLayer: n=35 .* must equal the number of input pixels H \* W, got H \* W = 6 \* 7 = 42"
    with pytest.raises(ValueError, match=match):
        init(MODULES["LambdaGlobal"], jnp.zeros((2, 6, 7, 6)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(in_channels=0, out_channels=8, dim_k=4, r=3),
            r"in_channels must be a positive integer, got 0",
        ),
        (
            dict(in_channels=4, out_channels=8, dim_k=4, r=3, num_heads=0),
            r"num_heads must be a positive integer",
        ),
        (
            dict(in_channels=4, out_channels=8, dim_k=4, r=-1),
            r"r must be a positive integer, got -1",
        ),
        (dict(in_channels=4, out_channels=8, dim_k=4, n=0), r"n must be a positive integer, got 0"),
        (
            dict(in_channels=4, out_channels=8, dim_k=4, r=3, dim_u=2.0),
            r"dim_u must be a positive integer, got 2.0",
        ),
    ],
)
def test_lambda_layer_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=rf"LambdaLayer: {match}"):
        LambdaLayer(**kwargs)


def test_dim_attention_bad_dim():
    with pytest.raises(ValueError, match=r"DimAttention: dim must be 1, 2 or 3 .*got 0"):
        init(DimAttention(0), jnp.zeros((1, 4, 4, 2)))
