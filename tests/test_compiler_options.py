"""jaxenc.compiler_options: the per-backend XLA options, their fallback on an unknown option, and
what they do on CPU (same numbers for a conv net; remat keeps its memory saving)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxenc import compiler_options as co
from jaxenc.models import get_model
from train.step import StepConfig, TrainState, make_mesh, make_train_step


def test_per_backend_options():
    assert co.compiler_options("gpu") == {} and co.compiler_options("tpu", remat=True) == {}
    assert co.compiler_options("cpu") == co.CPU_CONV_NETS
    assert co.compiler_options("cpu", remat=True) == co.CPU_KEEP_REMAT
    assert co.compiler_options() == co.compiler_options(jax.default_backend())
    options = co.compiler_options("cpu")
    options["x"] = 1  # a fresh dict each call
    assert "x" not in co.compiler_options("cpu")


def test_an_option_this_jaxlib_rejects_is_dropped_with_a_warning():
    with pytest.warns(RuntimeWarning, match="rejects xla_jaxenc_no_such_option=True"):
        kept = co.supported_options({"xla_jaxenc_no_such_option": True, **co.CPU_CONV_NETS}, "cpu")
    assert kept == co.CPU_CONV_NETS


def test_a_conv_net_computes_the_same_numbers_with_the_options():
    model = get_model("resnet18", num_classes=5)
    # Batch 8 at 64 x 64: with 2 images at 32 x 32 layer4's BatchNorm sees 2 values per channel and
    # amplifies float32 rounding to 1e-3 relative, whatever the options.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64, 64, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        out, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out**2)

    plain = jax.jit(jax.value_and_grad(loss))(variables["params"])
    tuned = jax.jit(jax.value_and_grad(loss), compiler_options=co.compiler_options())(
        variables["params"]
    )
    np.testing.assert_allclose(tuned[0], plain[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(tuned[1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def _train_step_temp_bytes(remat: str, options_override: dict | None = None) -> int:
    """Temporaries of the trainer's train step (make_train_step) for resnet18 at batch 8, 160 x 160."""
    model = get_model("resnet18", num_classes=10, remat=remat)
    tx = optax.sgd(0.1)

    def init_state():
        variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            ema_params={},
            rng=jax.random.key_data(jax.random.key(0)),
        )

    batch = {
        "image": jax.ShapeDtypeStruct((8, 160, 160, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((8,), jnp.int32),
    }
    step = make_train_step(
        model, tx, StepConfig(task="recognition", num_classes=10), make_mesh(jax.devices()[:1])
    )
    lowered = step.lower(jax.eval_shape(init_state), batch)
    compiled = lowered.compile(options_override) if options_override else lowered.compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the XLA:CPU barrier pass")
def test_the_trainers_remat_step_keeps_its_memory_saving_on_cpu():
    none, block = _train_step_temp_bytes("none"), _train_step_temp_bytes("block")
    expanded = _train_step_temp_bytes(
        "block", {"xla_disable_hlo_passes": ""}
    )  # XLA:CPU's default pipeline
    assert block < 0.75 * none, (block, none)
    # jax 0.10.2's XLA:CPU undoes the recomputation when it expands the barriers (146 MB here against
    # 104 MB); jax 0.12's plans the same either way (to within a kilobyte). Keeping them never costs.
    assert block <= 1.001 * expanded, (block, expanded)
