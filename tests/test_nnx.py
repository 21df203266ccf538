"""jaxenc.nnx: jaxenc models as Flax NNX modules, trained with nnx.Optimizer exactly as the linen
path trains them, and their variables saved and loaded as native checkpoints."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from jaxenc.models import get_model, init_variables, load_checkpoint, save_checkpoint
from jaxenc.nnx import LinenModel, to_linen_variables, to_nnx

# configs/tiny_cls.py's ResNet-18 (one block per stage, 8..64 channels) with dropout before fc.
CLS_KWARGS = dict(num_classes=5, layers=(1, 1, 1, 1), stage_planes=(8, 16, 32, 64), final_drop=0.5)
SHAPE = (4, 16, 16, 3)
STEPS = 4
DROPOUT_SEED = 7


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
    return optax.sgd(0.05, momentum=0.9)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_allclose(
            np.asarray(fa[k]), np.asarray(fb[k]), rtol=rtol, atol=atol, err_msg="/".join(k)
        )


@pytest.fixture(scope="module")
def cls_model():
    module = get_model("resnet18", **CLS_KWARGS)
    variables = init_variables(module, jax.random.key(0), jnp.zeros((1,) + SHAPE[1:]))
    return module, variables


def _linen_train(module, variables, batches, keys):
    """The plain linen + optax loop: per-step losses and the final variables."""

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

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = _tx().init(params)
    losses = []
    for (x, y), key in zip(batches, keys):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y, key)
        losses.append(float(loss))
    return losses, {"params": params, "batch_stats": batch_stats}, step


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    def loss_fn(model):
        return _ce(model(x, train=True), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@pytest.fixture(scope="module")
def trained(cls_model):
    """The same init, batches and dropout keys trained STEPS steps in NNX and in linen."""
    module, variables = cls_model
    batches = _batches()
    model = to_nnx(
        module, input_shape=SHAPE, variables=variables, rngs=nnx.Rngs(dropout=DROPOUT_SEED)
    )
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    nnx_losses = [float(_nnx_step(model, optimizer, x, y)) for x, y in batches]
    # nnx.Rngs draws fold_in(key, n) for its n-th call of a stream.
    keys = [jax.random.fold_in(jax.random.key(DROPOUT_SEED), i) for i in range(STEPS)]
    linen_losses, linen_vars, linen_step = _linen_train(module, variables, batches, keys)
    return dict(
        module=module,
        init=variables,
        batches=batches,
        keys=keys,
        model=model,
        nnx_losses=nnx_losses,
        linen_losses=linen_losses,
        linen_vars=linen_vars,
        linen_step=linen_step,
    )


def test_forward_parity_classification(cls_model):
    module, variables = cls_model
    x = _batches()[0][0]
    model = to_nnx(module, example_input=x, variables=variables)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(module.apply(variables, x)))
    assert isinstance(model, nnx.Module)
    # The NNX state is the linen tree, under the same paths, as Param / BatchStat variables.
    params = nnx.state(model, nnx.Param)
    stats = nnx.state(model, nnx.BatchStat)
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(variables["params"]))
    assert len(jax.tree.leaves(stats)) == len(jax.tree.leaves(variables["batch_stats"]))
    _assert_trees_close(to_linen_variables(model), variables, rtol=0, atol=0)


def test_init_from_rngs_is_the_trainers_init():
    """Without variables, to_nnx initialises as jaxenc.models.init_variables with rngs.params()."""
    kw = dict(CLS_KWARGS, final_drop=0.0)
    model = to_nnx("resnet18", input_shape=(1, 16, 16, 3), rngs=nnx.Rngs(params=3), **kw)
    want = init_variables(
        get_model("resnet18", **kw), jax.random.fold_in(jax.random.key(3), 0), jnp.zeros(SHAPE)
    )
    _assert_trees_close(to_linen_variables(model), want, rtol=0, atol=0)


def test_forward_parity_segmentation():
    """An FCN with aux head: eval output and the training-mode tuple (dropout, BN updates) equal
    the linen model's."""
    module = get_model(
        "fcn_resnest50",
        nclass=4,
        aux=True,
        backbone="resnet18",
        backbone_kwargs={"layers": (1, 1, 1, 1), "stage_planes": (8, 16, 32, 64)},
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    model = to_nnx(module, example_input=x, rngs=nnx.Rngs(params=0, dropout=5))
    variables = to_linen_variables(model)
    eval_nnx, eval_linen = model(x), module.apply(variables, x)
    assert len(eval_nnx) == len(eval_linen) == 2
    for a, b in zip(eval_nnx, eval_linen):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    train_nnx = model(x, train=True)
    train_linen, updates = module.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.fold_in(jax.random.key(5), 0)},
    )
    for a, b in zip(train_nnx, train_linen):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    _assert_trees_close(to_linen_variables(model)["batch_stats"], updates["batch_stats"])
    assert not np.allclose(  # the statistics did move, in place
        np.asarray(to_linen_variables(model)["batch_stats"]["pretrained"]["bn1"]["mean"]),
        np.asarray(variables["batch_stats"]["pretrained"]["bn1"]["mean"]),
    )


def test_training_parity_with_linen(trained):
    """nnx.Optimizer(optax.sgd(momentum)) steps give the linen + optax loop's losses step by step,
    and the same parameters and BatchNorm statistics at the end."""
    np.testing.assert_allclose(trained["nnx_losses"], trained["linen_losses"], rtol=1e-5)
    final = to_linen_variables(trained["model"])
    _assert_trees_close(final["batch_stats"], trained["linen_vars"]["batch_stats"])
    _assert_trees_close(final["params"], trained["linen_vars"]["params"], rtol=1e-4, atol=1e-5)
    # Training moved the parameters and statistics; the losses are not one value repeated.
    assert len(set(trained["nnx_losses"])) == STEPS
    init_stats = flatten_dict(trained["init"]["batch_stats"])
    assert not np.allclose(
        np.asarray(flatten_dict(final["batch_stats"])[("bn1", "var")]),
        np.asarray(init_stats[("bn1", "var")]),
    )


def test_dropout_is_active_in_the_parity_run(trained):
    """The first step with another dropout key gives another loss: the dropout masks matter, so
    the equal losses above mean NNX drew the very keys the linen loop used."""
    module, init = trained["module"], trained["init"]
    x, y = trained["batches"][0]
    opt_state = _tx().init(init["params"])
    step = trained["linen_step"]
    same = step(init["params"], init["batch_stats"], opt_state, x, y, trained["keys"][0])[3]
    other = step(init["params"], init["batch_stats"], opt_state, x, y, jax.random.key(123))[3]
    assert float(same) == pytest.approx(trained["nnx_losses"][0], rel=1e-5)
    assert abs(float(other) - float(same)) > 1e-3
    assert module.final_drop == 0.5


def test_nnx_trained_weights_round_trip_a_native_checkpoint(trained, tmp_path):
    model, module = trained["model"], trained["module"]
    variables = to_linen_variables(model)
    path = tmp_path / "nnx_trained.msgpack"
    save_checkpoint(path, variables, metadata={"model": "resnet18"})
    target = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(SHAPE)))
    loaded = load_checkpoint(path, target=target)
    _assert_trees_close(loaded, variables, rtol=0, atol=0)
    x = trained["batches"][0][0]
    np.testing.assert_array_equal(np.asarray(module.apply(loaded, x)), np.asarray(model(x)))
    # ... and back into NNX.
    again = to_nnx(module, input_shape=SHAPE, variables=loaded)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(model(x)))


class _DenseDrop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))


def test_errors(cls_model):
    module, variables = cls_model
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

    # Variables that do not fit the model: every bad leaf is named.
    params = flatten_dict(variables["params"])
    bad = dict(params)
    del bad[("fc", "bias")]
    bad[("conv1", "kernel")] = jnp.zeros((1, 1, 3, 2))
    bad[("extra", "kernel")] = jnp.zeros((2,))
    bad_vars = {"params": bad_tree(bad), "batch_stats": variables["batch_stats"]}
    with pytest.raises(ValueError, match=r"variables do not fit ResNet") as info:
        to_nnx(module, input_shape=SHAPE, variables=bad_vars)
    msg = str(info.value)
    assert "params/fc/bias: missing in the variables" in msg
    assert "params/conv1/kernel: shape (1, 1, 3, 2) in the variables" in msg
    assert "params/extra/kernel: in the variables but not in the model" in msg
    with pytest.raises(ValueError, match=r"batch_stats/bn1/mean: missing in the variables"):
        to_nnx(module, input_shape=SHAPE, variables={"params": variables["params"]})
    with pytest.raises(ValueError, match=r"collection\(s\) \['cache'\]"):
        LinenModel(module, {**variables, "cache": {}})
    with pytest.raises(TypeError, match=r"expected a jaxenc.nnx.LinenModel"):
        to_linen_variables(variables)

    # A model with dropout trained without an rng stream.
    small = _DenseDrop()
    x = jnp.ones((2, 4))
    small_vars = small.init(jax.random.key(0), x)
    no_rngs = to_nnx(small, example_input=x, variables=small_vars)
    np.testing.assert_array_equal(np.asarray(no_rngs(x)), np.asarray(small.apply(small_vars, x)))
    with pytest.raises(ValueError, match=r"needs an rng stream in training.*rngs=None"):
        no_rngs(x, train=True)
    # A 'default' stream serves the dropout stream, as nnx.Rngs does.
    with_default = to_nnx(small, example_input=x, variables=small_vars, rngs=nnx.Rngs(9))
    y = with_default(x, train=True)
    want = small.apply(
        small_vars, x, train=True, rngs={"dropout": jax.random.fold_in(jax.random.key(9), 0)}
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def bad_tree(flat):
    from flax.traverse_util import unflatten_dict

    return unflatten_dict(flat)
