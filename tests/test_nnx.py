"""jaxenc.nnx: jaxenc models as Flax NNX modules, trained with nnx.Optimizer exactly as the linen
path trains them, and their variables saved and loaded as native checkpoints."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

import jaxenc.nn as jnn
from jaxenc.models import (
    get_model,
    init_variables,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from jaxenc.nnx import LinenModel, to_linen_variables, to_nnx

TINY = {"layers": (1, 1, 1, 1), "stage_planes": (8, 16, 32, 64)}  # configs/tiny_cls.py's ResNet-18
SHAPE = (4, 12, 12, 3)
STEPS = 4
DROPOUT_SEED = 7


def _key(seed):
    # RBG keys: XLA:CPU compiles a threefry dropout mask in seconds, an RngBitGenerator one in a
    # fraction of that; nnx.Rngs and flax take any typed key.
    return jax.random.key(seed, impl="rbg")


class SmallNet(nn.Module):
    """jaxenc layers with every kind of training state: BatchNorm statistics, a scheduled
    DropBlock (its int32 step counter in batch_stats, the dropout stream) and Dropout."""

    dropout: float = 0.5
    dropblock: float = 0.3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(jnn.BatchNorm()(jnn.Conv2d(8, 3, padding=1)(x), train=train))
        x = jnn.DropBlock2D(self.dropblock, 3, nr_steps=STEPS)(x, train=train)
        x = jnn.GlobalAvgPool2d(flatten=True)(x)
        return nn.Dense(5)(nn.Dropout(self.dropout, deterministic=not train)(x))


def _batches():
    rng = np.random.default_rng(0)
    return [
        (
            jnp.asarray(rng.normal(size=SHAPE), jnp.float32),
            jnp.asarray(rng.integers(0, 5, size=SHAPE[0]), jnp.int32),
        )
        for _ in range(STEPS)
    ]


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _tx():
    return optax.sgd(0.1, momentum=0.9)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_allclose(
            np.asarray(fa[k]), np.asarray(fb[k]), rtol=rtol, atol=atol, err_msg="/".join(k)
        )


def _dropout_keys():
    # nnx.Rngs(dropout=seed) draws fold_in(key(seed), n) for the stream's n-th call.
    return [jax.random.fold_in(_key(DROPOUT_SEED), i) for i in range(STEPS)]


@functools.cache
def _linen_step(module):
    """One jitted step of the plain linen + optax loop (the trainer's pattern, train/step.py)."""

    @jax.jit
    def step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            logits, updates = module.apply(
                {"params": p, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return _ce(logits, y), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = _tx().update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def _linen_train(module, variables, keys):
    step = _linen_step(module)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = _tx().init(params)
    losses = []
    for (x, y), key in zip(_batches(), keys):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y, key)
        losses.append(float(loss))
    return losses, {"params": params, "batch_stats": batch_stats}


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    def loss_fn(model):
        return _ce(model(x, train=True), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@pytest.fixture(scope="module")
def trained():
    """SmallNet from one init trained STEPS steps in NNX (nnx.Optimizer) and in linen, on the same
    batches with the same dropout keys."""
    module = SmallNet()
    variables = init_variables(module, _key(0), jnp.zeros(SHAPE))
    model = to_nnx(
        module, input_shape=SHAPE, variables=variables, rngs=nnx.Rngs(dropout=_key(DROPOUT_SEED))
    )
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    nnx_losses = [float(_nnx_step(model, optimizer, x, y)) for x, y in _batches()]
    linen_losses, linen_vars = _linen_train(module, variables, _dropout_keys())
    return dict(
        module=module,
        init=variables,
        model=model,
        nnx_losses=nnx_losses,
        linen_losses=linen_losses,
        linen_vars=linen_vars,
    )


def test_training_parity_with_linen(trained):
    """nnx.Optimizer(optax.sgd(momentum)) steps give the linen + optax loop's losses step by step,
    and the same parameters and batch_stats (BatchNorm statistics, DropBlock counter) at the end."""
    np.testing.assert_allclose(trained["nnx_losses"], trained["linen_losses"], rtol=1e-5)
    final = to_linen_variables(trained["model"])
    _assert_trees_close(final["batch_stats"], trained["linen_vars"]["batch_stats"])
    _assert_trees_close(final["params"], trained["linen_vars"]["params"], rtol=1e-4, atol=1e-6)
    # Training moved the statistics in place and counted the steps; the losses are not one value.
    stats, init_stats = (
        flatten_dict(final["batch_stats"]),
        flatten_dict(trained["init"]["batch_stats"]),
    )
    assert int(stats[("DropBlock2D_0", "i")]) == STEPS
    assert not np.allclose(stats[("BatchNorm_0", "var")], init_stats[("BatchNorm_0", "var")])
    assert len(set(trained["nnx_losses"])) == STEPS


def test_dropout_is_active_in_the_parity_run(trained):
    """Other dropout keys, or no dropout at all, give other losses: the equal losses above mean
    that NNX drew the very keys the linen loop used."""
    other_keys = [jax.random.fold_in(k, 1) for k in _dropout_keys()]
    other, _ = _linen_train(trained["module"], trained["init"], other_keys)
    none, _ = _linen_train(SmallNet(dropout=0.0, dropblock=0.0), trained["init"], _dropout_keys())
    for losses in (other, none):
        assert np.min(np.abs(np.subtract(losses, trained["nnx_losses"]))) > 1e-4


def test_nnx_trained_weights_round_trip_a_native_checkpoint(trained, tmp_path):
    """to_linen_variables -> save_checkpoint -> load_checkpoint(target=linen tree) -> model.apply
    gives the NNX-trained module's outputs."""
    model, module = trained["model"], trained["module"]
    variables = to_linen_variables(model)
    path = tmp_path / "nnx_trained.msgpack"
    save_checkpoint(path, variables, metadata={"model": "SmallNet"})
    target = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(SHAPE)))
    loaded = load_checkpoint(path, target=target)
    _assert_trees_close(loaded, variables, rtol=0, atol=0)
    x = _batches()[0][0]
    np.testing.assert_array_equal(np.asarray(module.apply(loaded, x)), np.asarray(model(x)))
    # ... and back into NNX, through load_weights (what finetuning reads a .msgpack with).
    again = to_nnx(module, input_shape=SHAPE, variables=load_weights(path, target))
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(model(x)))


def test_init_from_rngs_is_the_trainers_init():
    """Without variables, to_nnx initialises as jaxenc.models.init_variables with rngs.params()."""
    module = SmallNet()
    model = to_nnx(module, input_shape=SHAPE, rngs=nnx.Rngs(params=_key(3)))
    want = init_variables(module, jax.random.fold_in(_key(3), 0), jnp.zeros(SHAPE))
    _assert_trees_close(to_linen_variables(model), want, rtol=0, atol=0)


def _filled(module, x):
    """Variables of ``module`` filled from numpy: He-scaled kernels, running variances in [0.5, 1.5)."""
    rng = np.random.default_rng(2)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))

    def fill(path, s):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(size=s.shape) * scale + (name == "scale"), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _assert_forward_parity(module, model, x, dropout_seed):
    """``model`` (NNX) and ``module.apply`` on its variables give the same inference output, the
    same training output (dropout key: the stream's first draw) and the same new statistics."""
    before = to_linen_variables(model)
    key = jax.random.fold_in(_key(dropout_seed), 0)

    # One program computes both paths: XLA merges what they share, so it compiles about one model
    # (a third of the test's time); any difference in variables, rngs or mutability stays apart.
    @nnx.jit
    def outputs(model, x):
        variables = to_linen_variables(model)
        train, updates = module.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        linen = (module.apply(variables, x), train, updates["batch_stats"])
        return (model(x), model(x, train=True)), linen

    got, want = outputs(model, x)
    assert jax.tree.structure(got) == jax.tree.structure(want[:2])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want[:2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # The statistics moved, in the NNX module itself, to the linen update.
    after = to_linen_variables(model)["batch_stats"]
    _assert_trees_close(after, want[2])
    stats, new = flatten_dict(before["batch_stats"]), flatten_dict(after)
    assert any(not np.allclose(stats[k], new[k]) for k in stats)
    return got


def test_forward_parity_classification():
    """A registry model by name (ResNet-18 with dropout before fc) from given variables."""
    kwargs = dict(num_classes=5, final_drop=0.5, **TINY)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = _filled(get_model("resnet18", **kwargs), x)
    model = to_nnx(
        "resnet18", example_input=x, variables=variables, rngs=nnx.Rngs(dropout=_key(5)), **kwargs
    )
    assert isinstance(model, nnx.Module)
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == len(jax.tree.leaves(to_linen_variables(model)["params"]))
    eval_out, train_out = _assert_forward_parity(model.module, model, x, dropout_seed=5)
    assert eval_out.shape == train_out.shape == (2, 5)


def test_forward_parity_segmentation():
    """An FCN with an aux head: the (main, aux) tuples, in inference and training, and the updated
    statistics equal the linen model's."""
    module = get_model(
        "fcn_resnest50", nclass=4, aux=True, backbone="resnet18", backbone_kwargs=TINY
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = _filled(module, x)  # (init's random programs would take most of the test's time)
    model = to_nnx(module, example_input=x, variables=variables, rngs=nnx.Rngs(dropout=_key(4)))
    eval_out, train_out = _assert_forward_parity(module, model, x, dropout_seed=4)
    assert [o.shape for o in eval_out] == [o.shape for o in train_out] == [(2, 16, 16, 4)] * 2


class _DenseDrop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))


def test_errors():
    module = get_model("resnet18", num_classes=5, **TINY)
    variables = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(SHAPE))),
    )
    with pytest.raises(ValueError, match=r"get_model: unknown model 'resnet19'.*did you mean"):
        to_nnx("resnet19", input_shape=SHAPE, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"model must be a registered model name"):
        to_nnx(42, input_shape=SHAPE)
    with pytest.raises(TypeError, match=r"model keyword arguments \['num_classes'\]"):
        to_nnx(module, input_shape=SHAPE, variables=variables, num_classes=3)
    with pytest.raises(ValueError, match=r"exactly one of input_shape .* or example_input"):
        to_nnx(module, variables=variables)
    with pytest.raises(ValueError, match=r"exactly one of input_shape"):
        to_nnx(module, input_shape=SHAPE, example_input=jnp.zeros(SHAPE), variables=variables)
    with pytest.raises(ValueError, match=r"input_shape must be a tuple of positive ints"):
        to_nnx(module, input_shape=(4, 0, 16, 3), variables=variables)
    with pytest.raises(ValueError, match=r"rngs is needed to initialise"):
        to_nnx(module, input_shape=SHAPE)
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs"):
        to_nnx(module, input_shape=SHAPE, rngs=0)
    with pytest.raises(TypeError, match=r"variables must be a mapping"):
        to_nnx(module, input_shape=SHAPE, variables=[1])

    # Variables that do not fit the model: every bad leaf is named.
    bad = flatten_dict(variables["params"])
    del bad[("fc", "bias")]
    bad[("conv1", "kernel")] = jnp.zeros((1, 1, 3, 2))
    bad[("extra", "kernel")] = jnp.zeros((2,))
    bad_vars = {"params": unflatten_dict(bad), "batch_stats": variables["batch_stats"]}
    with pytest.raises(ValueError, match=r"variables do not fit ResNet") as info:
        to_nnx(module, input_shape=SHAPE, variables=bad_vars)
    msg = str(info.value)
    assert "params/fc/bias: missing in the variables" in msg
    assert (
        "params/conv1/kernel: shape (1, 1, 3, 2) in the variables, (7, 7, 3, 64) in the model"
        in msg
    )
    assert "params/extra/kernel: in the variables but not in the model" in msg
    with pytest.raises(ValueError, match=r"batch_stats/bn1/mean: missing in the variables"):
        to_nnx(module, input_shape=SHAPE, variables={"params": variables["params"]})
    with pytest.raises(ValueError, match=r"collection\(s\) \['cache'\]"):
        LinenModel(module, {**variables, "cache": {}})
    with pytest.raises(ValueError, match=r"no 'params' collection"):
        LinenModel(module, {"batch_stats": variables["batch_stats"]})
    with pytest.raises(TypeError, match=r"expected a jaxenc.nnx.LinenModel"):
        to_linen_variables(variables)
    with pytest.raises(TypeError, match=r"rng_streams must be a sequence of stream names"):
        LinenModel(module, variables, rng_streams="dropout")
    with pytest.raises(TypeError, match=r"LinenModel: variables must be a mapping"):
        LinenModel(module, [variables])
    bn = jnn.BatchNorm()
    x = jnp.arange(8.0).reshape(2, 4)
    no_stats = LinenModel(bn, {"params": bn.init(jax.random.key(0), x)["params"]})
    with pytest.raises(ValueError, match=r"training created batch_stats/mean, which the variables"):
        no_stats(x, train=True)

    # A model with dropout trained without an rng stream; a 'default' stream serves 'dropout'.
    small = _DenseDrop()
    small_vars = small.init(jax.random.key(0), x)
    no_rngs = to_nnx(small, example_input=x, variables=small_vars)
    np.testing.assert_array_equal(np.asarray(no_rngs(x)), np.asarray(small.apply(small_vars, x)))
    with pytest.raises(ValueError, match=r"needs an rng stream in training.*rngs=None"):
        no_rngs(x, train=True)
    with_default = to_nnx(small, example_input=x, variables=small_vars, rngs=nnx.Rngs(9))
    want = small.apply(
        small_vars, x, train=True, rngs={"dropout": jax.random.fold_in(jax.random.key(9), 0)}
    )
    np.testing.assert_array_equal(np.asarray(with_default(x, train=True)), np.asarray(want))
