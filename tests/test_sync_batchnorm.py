"""SyncBatchNorm across devices (shard_map, pmap) and processes, conversion, precise BN."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import REPO, run_with_cpu_devices
from optional_torch import import_oracle
from parity import assert_close, check_module_parity, random_input, randomise_batchnorm

from jaxenc.nn import (
    BatchNorm,
    SyncBatchNorm,
    convert_sync_batchnorm,
    recompute_batch_stats,
    revert_sync_batchnorm,
)

ATOL, RTOL = 1e-5, 1e-4  # Synchronized-BatchNorm-PyTorch's tests use atol 1e-5 / rtol 1e-3


# --------------------------------------------------------------------------------------------------
# Bodies run with N forced CPU devices (tests/multidevice.py)


def sharded_equals_whole_batch(layout: str, mapping: str) -> None:
    """3 training steps: SyncBN over a batch sharded on every device == BN on the whole batch."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    shape = (2 * n, 5, 3, 4) if layout == "nhwc" else (3 * n, 6)
    rng = np.random.default_rng(0)
    sync, whole = SyncBatchNorm(axis_name="data", momentum=0.8), BatchNorm(momentum=0.8)
    variables = sync.init(jax.random.key(0), jnp.zeros(shape))  # init outside the mapped context
    params = {
        "scale": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
    }
    stats_ref = stats_sync = variables["batch_stats"]

    if mapping == "shard_map":
        mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
        mapped = jax.shard_map(
            lambda p, s, xs: sync.apply(
                {"params": p, "batch_stats": s}, xs, train=True, mutable=["batch_stats"]
            ),
            mesh=mesh,
            in_specs=(P(), P(), P("data")),
            out_specs=(P("data"), P()),
        )
        run = lambda p, s, x: mapped(p, s, x)  # noqa: E731
    else:
        mapped = jax.pmap(
            lambda p, s, xs: sync.apply(
                {"params": p, "batch_stats": s}, xs, train=True, mutable=["batch_stats"]
            ),
            axis_name="data",
            in_axes=(None, None, 0),
        )

        def run(p, s, x):
            y, upd = mapped(p, s, x.reshape(n, -1, *x.shape[1:]))
            return y.reshape(x.shape), jax.tree_util.tree_map(lambda a: a[0], upd)

    for step in range(3):
        x = jnp.asarray(rng.normal(size=shape) * (step + 1) + step, jnp.float32)
        cot = jnp.asarray(rng.normal(size=shape), jnp.float32)

        def ref(p, xx):
            y, upd = whole.apply(
                {"params": p, "batch_stats": stats_ref}, xx, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(y * cot), (y, upd["batch_stats"])

        def synced(p, xx):
            y, upd = run(p, stats_sync, xx)
            return jnp.sum(y * cot), (y, upd["batch_stats"])

        (_, (y_ref, stats_ref)), (gp_ref, gx_ref) = jax.value_and_grad(ref, (0, 1), has_aux=True)(
            params, x
        )
        (_, (y_sync, stats_sync)), (gp_sync, gx_sync) = jax.jit(
            jax.value_and_grad(synced, (0, 1), has_aux=True)
        )(params, x)
        np.testing.assert_allclose(
            y_sync, y_ref, rtol=RTOL, atol=ATOL, err_msg=f"output, step {step}"
        )
        np.testing.assert_allclose(
            gx_sync, gx_ref, rtol=RTOL, atol=ATOL, err_msg=f"input gradient, step {step}"
        )
        for k in ("scale", "bias"):
            np.testing.assert_allclose(
                gp_sync[k], gp_ref[k], rtol=RTOL, atol=ATOL, err_msg=f"{k} gradient, step {step}"
            )
        for k in ("mean", "var"):
            np.testing.assert_allclose(
                stats_sync[k],
                stats_ref[k],
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"running {k}, step {step}",
            )
    print("ok", n, layout, mapping)


def unequal_valid_counts() -> None:
    """Devices with different numbers of valid (masked-in) rows still get the exact global statistics."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    per_device = 4
    valid_per_device = [1 + (d % per_device) for d in range(n)]  # 1, 2, 3, 4, 1, ...
    mask = np.zeros((n * per_device, 1), bool)
    for d, v in enumerate(valid_per_device):
        mask[d * per_device : d * per_device + v] = True
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(n * per_device, 5)) * 3 + 2).astype(np.float32)
    sync = SyncBatchNorm(axis_name="data")
    variables = sync.init(jax.random.key(0), x)
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    y, upd = jax.jit(
        jax.shard_map(
            lambda xs, ms: sync.apply(variables, xs, train=True, mask=ms, mutable=["batch_stats"]),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=(P("data"), P()),
        )
    )(x, mask)
    kept = x[mask[:, 0]]
    mean, var = kept.mean(0), kept.var(0)
    np.testing.assert_allclose(
        y[mask[:, 0]], (kept - mean) / np.sqrt(var + 1e-5), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        upd["batch_stats"]["var"], 0.9 + 0.1 * kept.var(0, ddof=1), rtol=RTOL, atol=ATOL
    )
    # A mean of per-device means (flax's pmean) would weight the 1-row device like the 4-row one.
    naive = np.mean(
        [x[d * per_device : d * per_device + v].mean(0) for d, v in enumerate(valid_per_device)], 0
    )
    assert np.abs(naive - mean).max() > 1e-2
    print("ok", n)


def converted_model_matches() -> None:
    """convert_sync_batchnorm on a model mixing jaxenc and flax BatchNorms: sharded == whole batch."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    model = MixedBatchNormNet()
    x = np.random.default_rng(2).normal(size=(2 * n, 4, 4, 3)).astype(np.float32) + 1
    variables = model.init(jax.random.key(0), x)
    converted = convert_sync_batchnorm(model, "data")
    assert jax.tree_util.tree_structure(
        converted.init(jax.random.key(0), x)
    ) == jax.tree_util.tree_structure(variables)
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    y, upd = jax.jit(
        jax.shard_map(
            lambda xs: converted.apply(variables, xs, train=True, mutable=["batch_stats"]),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=(P("data"), P()),
        )
    )(x)
    y_ref, upd_ref = revert_sync_batchnorm(model).apply(
        variables, x, train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
    for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(upd_ref)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    # Without conversion the same shard_map gives per-device statistics: a different answer.
    y_local, _ = jax.jit(
        jax.shard_map(
            lambda xs: model.apply(variables, xs, train=True, mutable=["batch_stats"]),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=(P("data"), P("data")),
        )
    )(x)
    assert np.abs(np.asarray(y_local) - np.asarray(y_ref)).max() > 1e-3
    print("ok", n)


def grouped_statistics() -> None:
    """axis_index_groups [[0, 1], [2, 3]] under pmap: each pair of devices normalises over its own half."""
    x = (
        np.random.default_rng(3).normal(size=(4, 3, 6)).astype(np.float32) * 2 + 1
    )  # (devices, batch, D)
    sync = SyncBatchNorm(axis_name="data", axis_index_groups=[[0, 1], [2, 3]])
    variables = sync.init(jax.random.key(0), x[0])
    y, upd = jax.pmap(
        lambda xs: sync.apply(variables, xs, train=True, mutable=["batch_stats"]), axis_name="data"
    )(x)
    y, means = np.asarray(y), np.asarray(upd["batch_stats"]["mean"])
    for group in ([0, 1], [2, 3]):
        half = x[group].reshape(-1, 6)
        expected = (half - half.mean(0)) / np.sqrt(half.var(0) + 1e-5)
        np.testing.assert_allclose(y[group].reshape(-1, 6), expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(means[group[0]], 0.1 * half.mean(0), rtol=RTOL, atol=ATOL)
    print("ok", jax.device_count())


class MixedBatchNormNet(nn.Module):
    """jaxenc BatchNorm, a flax.linen.BatchNorm and a conv, for the conversion tests."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = BatchNorm(name="bn0")(x, train=train)
        x = nn.Conv(5, (3, 3), padding=1, name="conv")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="flax_bn")(x)


@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.parametrize("n_devices", [4, 8])
def test_sync_batchnorm_equals_whole_batch_bn(n_devices):
    out = run_with_cpu_devices(
        n_devices,
        """
        from test_sync_batchnorm import sharded_equals_whole_batch
        for layout in ("nhwc", "bd"):
            for mapping in ("shard_map", "pmap"):
                sharded_equals_whole_batch(layout, mapping)
        """,
        timeout=600,
    )
    assert out.count(f"ok {n_devices}") == 4, out


@pytest.mark.multidevice
@pytest.mark.parametrize("n_devices", [4, 8])
def test_unequal_valid_counts_give_exact_global_statistics(n_devices):
    assert f"ok {n_devices}" in run_with_cpu_devices(n_devices, unequal_valid_counts, timeout=300)


@pytest.mark.multidevice
def test_axis_index_groups_synchronise_within_groups():
    assert "ok 4" in run_with_cpu_devices(4, grouped_statistics, timeout=300)


@pytest.mark.multidevice
def test_convert_sync_batchnorm_under_shard_map():
    assert "ok 4" in run_with_cpu_devices(4, converted_model_matches, timeout=300)


# --------------------------------------------------------------------------------------------------
# Two processes x two CPU devices over loopback (gloo)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_two_devices_each():
    port = _free_port()
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]),
    )
    worker = str(Path(__file__).with_name("sync_bn_multiprocess_worker.py"))
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(rank), "2", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (code, out, err) in enumerate(outputs):
        assert code == 0, f"rank {rank} exited {code}:\n{out}\n{err[-4000:]}"
        # gloo prints its own connection lines to stdout too; the worker's result is the JSON line.
        result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        assert result["process_count"] == 2 and result["global_devices"] == 4, result
        assert result["max_error"] < 1e-4, result


# --------------------------------------------------------------------------------------------------
# Single device: parity, eps modes, activation, errors, conversion, precise BN


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("shape", [(4, 5, 3, 6), (16, 10)])
def test_single_device_equals_synchronized_batchnorm_pytorch(train, shape):
    sbn = import_oracle("sync_batchnorm")
    cls = sbn.SynchronizedBatchNorm2d if len(shape) == 4 else sbn.SynchronizedBatchNorm1d
    check_module_parity(
        randomise_batchnorm(cls(shape[-1])),
        SyncBatchNorm(),
        random_input(shape, seed=4),
        train=train,
    )


def test_eps_mode_clamp_and_plus():
    x = random_input((6, 3)) * 1e-3  # variance ~1e-6 < eps: the two modes differ
    mean, var = x.mean(0), x.var(0)
    for mode, denominator in (
        ("plus", np.sqrt(var + 1e-5)),
        ("clamp", np.sqrt(np.maximum(var, 1e-5))),
    ):
        module = SyncBatchNorm(eps_mode=mode)
        y, _ = module.apply(
            module.init(jax.random.key(0), x), x, train=True, mutable=["batch_stats"]
        )
        assert_close(y, (x - mean) / denominator, what=mode)
    with pytest.raises(
        ValueError, match=r"SyncBatchNorm: eps_mode must be one of \('plus', 'clamp'\), got 'max'"
    ):
        SyncBatchNorm(eps_mode="max").init(jax.random.key(0), x)


@pytest.mark.parametrize("train", [False, True])
def test_leaky_relu_activation_in_training_and_inference(train):
    x = random_input((8, 4), seed=5)
    module = SyncBatchNorm(activation="leaky_relu", slope=0.2)
    variables = module.init(jax.random.key(0), x)
    plain = BatchNorm().apply(
        variables, x, train=train, mutable=["batch_stats"] if train else False
    )
    plain = plain[0] if train else plain
    y = module.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
    y = y[0] if train else y
    assert_close(y, np.where(plain > 0, plain, 0.2 * plain))
    with pytest.raises(
        ValueError, match=r"activation must be one of \('none', 'leaky_relu'\), got 'relu6'"
    ):
        SyncBatchNorm(activation="relu6").init(jax.random.key(0), x)


def test_unbound_axis_name_is_a_clear_error_but_init_works():
    x = random_input((4, 3))
    module = SyncBatchNorm(axis_name="data")
    variables = module.init(jax.random.key(0), x, train=True)  # outside any mapped context
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    with pytest.raises(
        ValueError,
        match=r"SyncBatchNorm: axis_name='data' is not a mapped axis here\. Call the module inside jax\.shard_map / jax\.pmap",
    ):
        module.apply(variables, x, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match=r"not a mapped axis"):
        jax.jit(lambda v, xx: module.apply(v, xx, train=True, mutable=["batch_stats"]))(
            variables, x
        )
    assert_close(
        module.apply(variables, x), BatchNorm().apply(variables, x)
    )  # inference never syncs


def test_bfloat16_sync_batchnorm():
    x = random_input((8, 5))
    module = SyncBatchNorm(dtype=jnp.bfloat16, activation="leaky_relu")
    v = module.init(jax.random.key(0), x)
    y, upd = module.apply(v, x.astype(jnp.bfloat16), train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["var"].dtype == jnp.float32


def test_revert_sync_batchnorm_runs_unmapped_and_equals_batchnorm():
    class SyncNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return SyncBatchNorm(axis_name="data", name="bn")(x, train=train)

    x = random_input((6, 4))
    variables = SyncNet().init(jax.random.key(0), x)
    y, upd = revert_sync_batchnorm(SyncNet()).apply(
        variables, x, train=True, mutable=["batch_stats"]
    )
    y_ref, upd_ref = BatchNorm().apply(
        {"params": variables["params"]["bn"], "batch_stats": variables["batch_stats"]["bn"]},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    assert_close(y, y_ref)
    assert_close(upd["batch_stats"]["bn"]["var"], upd_ref["batch_stats"]["var"])
    # Converting twice replaces the axis instead of nesting.
    twice = convert_sync_batchnorm(convert_sync_batchnorm(SyncNet(), "a"), "b")
    assert twice.axis_name == "b" and isinstance(twice.module, SyncNet)
    with pytest.raises(
        TypeError, match="convert_sync_batchnorm: expected a flax.linen.Module, got dict"
    ):
        convert_sync_batchnorm({})


def test_flax_batchnorm_converted_uses_torch_numerics():
    x = random_input((8, 4, 4, 3), seed=6)
    model = MixedBatchNormNet()
    variables = model.init(jax.random.key(0), x)
    _, upd = revert_sync_batchnorm(model).apply(variables, x, train=True, mutable=["batch_stats"])
    feats = nn.Conv(5, (3, 3), padding=1).apply(
        {"params": variables["params"]["conv"]},
        BatchNorm().apply(
            {"params": variables["params"]["bn0"], "batch_stats": variables["batch_stats"]["bn0"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )[0],
    )
    flat = np.asarray(feats).reshape(-1, 5)
    assert_close(
        upd["batch_stats"]["flax_bn"]["var"],
        0.9 + 0.1 * flat.var(0, ddof=1),
        what="unbiased running var",
    )


def test_recompute_batch_stats_is_the_average_of_per_batch_statistics():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = BatchNorm(momentum=0.7, name="a")(x, train=train)
            return nn.BatchNorm(use_running_average=not train, momentum=0.95, name="b")(
                nn.Dense(3)(x)
            )

    model = Net()
    batches = [random_input((16, 4), seed=s) * (s + 1) + s for s in range(4)]
    variables = model.init(jax.random.key(0), batches[0])
    apply_fn = jax.jit(lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]))
    precise = recompute_batch_stats(apply_fn, variables, batches)
    assert_close(
        precise["batch_stats"]["a"]["mean"], np.mean([b.mean(0) for b in batches], 0), rtol=1e-5
    )
    assert_close(
        precise["batch_stats"]["a"]["var"],
        np.mean([b.var(0, ddof=1) for b in batches], 0),
        rtol=1e-5,
    )

    # Layer b (flax's BatchNorm, biased variance) sees the Dense features of a's BATCH-normalised
    # output in training; precise BN averages what each layer computes per batch.
    def b_inputs(batch):
        a_out = BatchNorm(momentum=0.7).apply(
            {"params": variables["params"]["a"], "batch_stats": variables["batch_stats"]["a"]},
            batch,
            train=True,
            mutable=["batch_stats"],
        )[0]
        return np.asarray(nn.Dense(3).apply({"params": variables["params"]["Dense_0"]}, a_out))

    assert_close(
        precise["batch_stats"]["b"]["var"],
        np.mean([b_inputs(b).var(0) for b in batches], 0),
        rtol=1e-5,
    )
    assert precise["params"] is variables["params"]
    with pytest.raises(ValueError, match="recompute_batch_stats: batches is empty"):
        recompute_batch_stats(apply_fn, variables, [])
