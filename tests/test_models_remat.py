"""Rematerialisation (``remat="block"``, activation checkpointing) of the backbones and heads.

The same variables (paths, shapes and values at init) as ``remat="none"``, the same loss, gradients and
batch statistics in training (dropout / DropBlock draws included), a ``remat`` primitive per
checkpointed unit in the program, and a compiled train step whose temporaries shrink.

The programs are compiled with XLA:CPU's ``cse_barrier_expander`` pass disabled (as
benchmarks/memory.py does): by default XLA:CPU drops jax.checkpoint's optimization barriers before
CSE, which merges much of the recomputation back into the forward pass (GPU/TPU keep them). Backend
optimisation level 0 keeps the compiles short; it changes LLVM code generation, not the memory plan.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxenc.models import get_model, get_segmentation_model
from jaxenc.models.resnet import REMAT_MODES

FAST = {"xla_backend_optimization_level": 0}
COMPILE_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander", **FAST}
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def _resnest(remat: str):
    """A dilated (output stride 8, as the segmentation backbones) ResNeSt-50-style classifier (radix 2,
    deep stem, avd, avg-down, dropout before fc) with one narrow block per stage."""
    return get_model(
        "resnest50",
        num_classes=5,
        dilated=True,
        final_drop=0.2,
        layers=(1, 1, 1, 1),
        stage_planes=(8, 16, 32, 64),
        stem_width=8,
        remat=remat,
    )


def _deeplab(remat: str):
    """DeepLabV3 (ASPP head + aux FCN head, both with dropout) on a tiny basic-block ResNet with
    DropBlock in layer3/4 (drawn inside the checkpointed blocks)."""
    return get_segmentation_model(
        "deeplab",
        backbone="resnet18",
        nclass=4,
        aux=True,
        remat=remat,
        backbone_kwargs=dict(layers=(1, 1, 1, 1), stage_planes=(8, 16, 32, 64), dropblock_prob=0.1),
    )


MODELS = {"resnest": (_resnest, (2, 64, 64, 3)), "deeplab": (_deeplab, (2, 32, 32, 3))}


def _loss_fn(model, x):
    """(params, batch_stats) -> ((loss, new batch_stats), grads) of a train=True forward with dropout."""

    def loss(params, batch_stats):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": RNGS["dropout"]},
        )
        outs = out if isinstance(out, tuple) else (out,)
        return sum(jnp.mean(jnp.square(o.astype(jnp.float32) - 0.5)) for o in outs), updates[
            "batch_stats"
        ]

    return jax.value_and_grad(loss, has_aux=True)


def _runs(name: str) -> dict:
    """Both variants of one model: variables at init, (loss, batch_stats, grads) of the compiled train
    step from the same variables, and the step's planned temporaries."""
    build, shape = MODELS[name]
    models = {remat: build(remat) for remat in ("none", "block")}
    x = jax.random.normal(jax.random.key(2), shape)
    # One program initialises both (XLA shares what is common: the compile costs about one init).
    init = jax.jit(lambda: {r: m.init(RNGS, x, train=False) for r, m in models.items()})
    variables = init.lower().compile(FAST)()
    start = variables["none"]
    out = {}
    for remat, model in models.items():
        step = (
            jax.jit(_loss_fn(model, x))
            .lower(start["params"], start["batch_stats"])
            .compile(COMPILE_OPTIONS)
        )
        (loss, stats), grads = step(start["params"], start["batch_stats"])
        out[remat] = dict(
            model=model,
            x=x,
            variables=variables[remat],
            loss=loss,
            stats=stats,
            grads=grads,
            temp=step.memory_analysis().temp_size_in_bytes,
        )
    return out


@pytest.fixture(scope="module")
def runs():
    return {name: _runs(name) for name in MODELS}


def _assert_same_tree(a, b, rtol=0.0, atol=0.0):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert list(fa) == list(fb)  # same paths, same order
    for path in fa:
        assert fa[path].shape == fb[path].shape and fa[path].dtype == fb[path].dtype, path
        np.testing.assert_allclose(
            np.asarray(fb[path]), np.asarray(fa[path]), rtol=rtol, atol=atol, err_msg="/".join(path)
        )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_variables_identical(runs, name):
    """Same variable paths, shapes and init values: checkpoints and pretrained weights load unchanged."""
    _assert_same_tree(runs[name]["none"]["variables"], runs[name]["block"]["variables"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_loss_gradients_and_batch_stats(runs, name):
    """train=True with a dropout rng: the recomputed forward draws the same dropout and DropBlock masks,
    so the loss, the gradients and the new batch statistics agree with the stored-activation program.

    Not bit-exact: the two programs fuse differently, so float32 sums round differently, and the
    batch norms over few elements amplify that towards the input. Measured: loss within 1e-6
    relative, batch statistics within 2e-6 of their scale, gradients within 1.2e-4 of the largest
    gradient (the stem's; 4e-7 for the DeepLab). A different mask would move them by O(10%)."""
    a, b = runs[name]["none"], runs[name]["block"]
    np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-5)
    for what, tol in (("stats", 1e-5), ("grads", 1e-3)):
        fa, fb = flatten_dict(a[what]), flatten_dict(b[what])
        assert list(fa) == list(fb)
        scale = max(float(np.max(np.abs(v))) for v in fa.values())
        for path, va in fa.items():
            err = float(np.max(np.abs(np.asarray(fb[path]) - np.asarray(va))))
            assert err <= tol * scale, (what, "/".join(path), err, scale)


def _remat_count(jaxpr) -> int:
    """Number of checkpoint (remat) equations in a closed jaxpr, nested ones included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("remat2", "checkpoint", "remat")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _remat_count(sub)
    return count


@pytest.mark.parametrize("name, units", [("resnest", 5), ("deeplab", 7)])
def test_program_recomputes(runs, name, units):
    """One checkpoint per residual block and the stem (+ head and aux head) with remat="block", none
    without; the gradient program carries them too (the backward recomputes the blocks)."""
    for remat, expected in (("none", 0), ("block", units)):
        run = runs[name][remat]
        model, x, v = run["model"], run["x"], run["variables"]
        forward = jax.make_jaxpr(
            lambda v: model.apply(
                v, x, train=True, mutable=["batch_stats"], rngs={"dropout": RNGS["dropout"]}
            )
        )(v)
        assert _remat_count(forward.jaxpr) == expected
        grad = jax.make_jaxpr(_loss_fn(model, x))(v["params"], v["batch_stats"])
        assert (_remat_count(grad.jaxpr) > 0) == (remat == "block")


def test_temporaries_shrink(runs):
    """The compiled train step of the 64x64 ResNeSt keeps at most 0.6x the temporaries (measured: see
    the report in benchmarks/results/memory.json for the full-size recipes)."""
    none, block = runs["resnest"]["none"]["temp"], runs["resnest"]["block"]["temp"]
    assert block <= 0.6 * none, (block, none, block / none)


def test_bad_remat_value():
    assert REMAT_MODES == ("none", "block")
    message = r"remat must be one of \('none', 'block'\), got 'x'"
    with pytest.raises(ValueError, match=rf"^resnest50: ResNet: {message}$"):
        get_model("resnest50", remat="x")
    with pytest.raises(ValueError, match=rf"^xception65: Xception65: {message}$"):
        get_model("xception65", remat="x")
    with pytest.raises(ValueError, match=rf"^wideresnet38: WideResNet: {message}$"):
        get_model("wideresnet38", remat="x")
    x = jnp.zeros((1, 32, 32, 3))
    for model, where in (
        (get_segmentation_model("deeplab", backbone="resnet18", nclass=2, remat="x"), "DeepLabV3"),
        (get_model("deepten_resnet50_minc", remat="x"), "DeepTen"),
    ):
        with pytest.raises(ValueError, match=rf"^{where}: {message}"):
            jax.eval_shape(lambda: model.init(RNGS, x, train=False))
    seg = get_segmentation_model(
        "fcn", backbone="resnet18", nclass=2, backbone_kwargs={"remat": "block"}
    )
    with pytest.raises(ValueError, match=r"backbone_kwargs must not set \['remat'\]"):
        jax.eval_shape(lambda: seg.init(RNGS, x, train=False))


@pytest.mark.parametrize(
    "name, kwargs, units",
    [
        ("xception65", dict(num_middle_blocks=1), 5),  # block1..3, one middle block, block20
        ("wideresnet38", dict(layers=(1, 1, 1, 1, 1, 1)), 6),
        ("deepten_resnet50_minc", {}, 18),  # 16 backbone blocks + stem + head
    ],
)
def test_other_families(name, kwargs, units):
    """The other model families take the same field: same variable tree (shapes, traced only) and one
    checkpoint per block."""
    x = jnp.zeros((2, 64, 64, 3))
    trees, counts = {}, {}
    for remat in ("none", "block"):
        model = get_model(name, remat=remat, **kwargs)
        trees[remat] = jax.eval_shape(lambda: model.init(RNGS, x, train=False))
        forward = jax.make_jaxpr(
            lambda v: model.apply(
                v, x, train=True, mutable=["batch_stats"], rngs={"dropout": RNGS["dropout"]}
            )
        )(trees[remat])
        counts[remat] = _remat_count(forward.jaxpr)
    assert jax.tree.structure(trees["none"]) == jax.tree.structure(trees["block"])
    assert jax.tree.map(lambda s: (s.shape, s.dtype), trees["none"]) == jax.tree.map(
        lambda s: (s.shape, s.dtype), trees["block"]
    )
    assert counts == {"none": 0, "block": units}


def test_trainer_passes_config_remat():
    """``config.model.remat`` (default "none" in every recipe) reaches the model and its backbone."""
    from tiny_config import tiny_config

    from train.trainer import build_model

    assert tiny_config().model.remat == "none"
    model = build_model(tiny_config(**{"model.remat": "block"}))
    assert model.remat == "block"
    x = jnp.zeros((2, 32, 32, 3))
    v = jax.eval_shape(lambda: model.init(RNGS, x, train=False))
    forward = jax.make_jaxpr(
        lambda v: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": RNGS["dropout"]}
        )
    )(v)
    assert _remat_count(forward.jaxpr) == 7  # stem + 4 blocks + EncHead + aux head
    recognition = build_model(
        tiny_config(
            **{
                "task": "recognition",
                "model.name": "resnet18",
                "model.kwargs": {},
                "model.remat": "block",
            }
        )
    )
    assert recognition.remat == "block"
