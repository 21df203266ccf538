"""jaxenc.nn.BatchNorm: torch parity (values, gradients, running statistics), conventions, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import run_with_cpu_devices
from optional_torch import torch
from parity import assert_close, check_module_parity, random_input

from jaxenc.nn import BatchNorm, batch_moments


def _torch_bn(cls, c, **kw):
    bn = cls(c, **kw)
    if bn.affine:
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, 9, 5), (3, 1, 1, 4), (16, 10)])
def test_parity_values_gradients_running_stats(train, shape):
    cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    check_module_parity(
        _torch_bn(cls, shape[-1]), BatchNorm(), random_input(shape, seed=3), train=train
    )


def test_large_mean_keeps_precision():
    # Two-pass variance: E[x^2] - E[x]^2 would lose most digits at mean 1e3, std 1.
    x = random_input((8, 5, 5, 3), seed=1) + 1000.0
    check_module_parity(_torch_bn(torch.nn.BatchNorm2d, 3), BatchNorm(), x, train=True)


def test_running_stats_over_several_steps_and_momentum_convention():
    tb = _torch_bn(torch.nn.BatchNorm2d, 4, momentum=0.3)
    tb.train()
    from jaxenc.port import torch_to_flax

    x0 = random_input((4, 6, 6, 4))
    variables = torch_to_flax(BatchNorm(momentum=0.7), tb.state_dict(), x0)
    for step in range(3):
        x = random_input((4, 6, 6, 4), seed=step) * (step + 1) + step
        tb(torch.tensor(x.transpose(0, 3, 1, 2)))
        _, upd = BatchNorm(momentum=0.7).apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **upd}
    assert_close(variables["batch_stats"]["mean"], tb.running_mean.numpy(), what="running_mean")
    assert_close(
        variables["batch_stats"]["var"], tb.running_var.numpy(), what="running_var (unbiased)"
    )


def test_affine_false_and_feature_axis_1():
    tb = _torch_bn(torch.nn.BatchNorm2d, 3, affine=False)
    tb.train()
    x_nchw = random_input((2, 3, 5, 4))
    from jaxenc.port import torch_to_flax

    module = BatchNorm(axis=1, use_scale=False, use_bias=False)
    variables = torch_to_flax(module, tb.state_dict(), x_nchw)
    assert "params" not in variables
    y, upd = module.apply(variables, x_nchw, train=True, mutable=["batch_stats"])
    assert_close(y, tb(torch.tensor(x_nchw)).detach().numpy(), what="output")
    assert_close(upd["batch_stats"]["var"], tb.running_var.numpy(), what="running_var")


def test_init_in_train_mode_does_not_update_stats():
    v = BatchNorm().init(jax.random.key(0), random_input((4, 3)) + 5, train=True)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))


def test_bfloat16_compute_keeps_float32_statistics():
    x = random_input((4, 5, 5, 8))
    module = BatchNorm(dtype=jnp.bfloat16)
    v = module.init(jax.random.key(0), x)
    y, upd = module.apply(v, x.astype(jnp.bfloat16), train=True, mutable=["batch_stats"])
    y32, upd32 = BatchNorm().apply(v, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["var"].dtype == jnp.float32
    assert v["params"]["scale"].dtype == jnp.float32
    assert_close(y, y32, rtol=2e-2, what="bf16 output")
    assert_close(
        upd["batch_stats"]["var"], upd32["batch_stats"]["var"], rtol=2e-2, what="bf16 running var"
    )


def test_jit_and_vmap():
    x = random_input((3, 4, 6, 6, 2))
    module = BatchNorm()
    v = module.init(jax.random.key(0), x[0])
    f = lambda xx: module.apply(v, xx, train=True, mutable=["batch_stats"])[0]  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(x[0]), f(x[0]), rtol=1e-6, atol=1e-6)
    stacked = jax.vmap(f)(x)
    for i in range(3):
        np.testing.assert_allclose(stacked[i], f(x[i]), rtol=1e-6, atol=1e-6)


def test_mask_gives_statistics_of_the_kept_elements():
    x = random_input((6, 4))
    mask = np.array([1, 1, 0, 1, 0, 1], bool)[:, None]
    mean, var, count = batch_moments(jnp.asarray(x), (0,), mask=jnp.asarray(mask))
    kept = x[mask[:, 0]]
    assert_close(mean, kept.mean(0))
    assert_close(var, kept.var(0))
    np.testing.assert_array_equal(count, np.full(4, 4.0))


def test_errors_name_the_argument():
    with pytest.raises(
        ValueError,
        match=r"BatchNorm: num_features=4 but the input has 3 features on axis -1 \(shape \(2, 3\)\)",
    ):
        BatchNorm(num_features=4).init(jax.random.key(0), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"BatchNorm: expected an input of rank >= 2"):
        BatchNorm().init(jax.random.key(0), jnp.zeros((3,)))
    with pytest.raises(
        ValueError,
        match=r"BatchNorm: training needs more than 1 value per feature, got input shape \(1, 3\)",
    ):
        BatchNorm().init(jax.random.key(0), jnp.zeros((1, 3)), train=True)


def _sharded_bn_equals_whole_batch():
    """Runs with 4 CPU devices: BatchNorm(axis_name='data') under shard_map == whole-batch BN."""
    import jax
    import numpy as np
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from jaxenc.nn import BatchNorm

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    x = np.random.default_rng(0).standard_normal((8, 5, 5, 3)).astype(np.float32) * 3 + 1
    variables = BatchNorm().init(jax.random.key(0), x)
    whole, whole_upd = BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])

    def step(xs):
        return BatchNorm(axis_name="data").apply(variables, xs, train=True, mutable=["batch_stats"])

    sharded = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P()))
    )
    y, upd = sharded(x)
    np.testing.assert_allclose(y, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        upd["batch_stats"]["var"], whole_upd["batch_stats"]["var"], rtol=1e-5
    )
    print("ok", jax.device_count())


@pytest.mark.multidevice
def test_axis_name_statistics_are_global_on_4_cpu_devices():
    assert "ok 4" in run_with_cpu_devices(4, _sharded_bn_equals_whole_batch, timeout=240)
