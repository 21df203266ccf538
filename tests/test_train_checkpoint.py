"""train/checkpoint.py: orbax round trips, pruning, best selection, config checks, signals, fine-tuning."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from train_states import META, _assert_bitwise, _state

from train.checkpoint import (
    BEST_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    PREVIOUS_CONFIG_FILE,
    Checkpointer,
    GracefulShutdown,
    check_config,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- save/restore


def test_round_trip_bitwise(tmp_path):
    state = _state(seed=1, step=7)
    # a grain DatasetIterator state; numpy scalars (grain's recommendation) are stored as numbers
    data_state = {"next_index": np.int64(13), "epoch": [1, 2], "name": "grain"}
    meta = {"config_hash": "deadbeef", "best_so_far": 0.5}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state=state, data_state=data_state, meta=meta)
        ckpt.wait()
        abstract = jax.eval_shape(lambda: state)
        restored, ds, m = ckpt.restore(abstract_state=abstract)
    _assert_bitwise(restored, state)
    assert isinstance(
        restored["opt_state"][0], optax.TraceState
    )  # container types come from the target
    assert int(restored["step"]) == 7 and restored["rng"].dtype == jnp.uint32
    assert ds == data_state and m == meta
    # a Python int leaf comes back as a 0-d array of the abstract dtype
    with Checkpointer(tmp_path / "py") as ckpt:
        ckpt.save(1, state={"epoch": 3, "w": jnp.ones(2)}, data_state=None, meta={})
        back, _, _ = ckpt.restore(
            abstract_state=jax.eval_shape(lambda: {"epoch": 3, "w": jnp.ones(2)})
        )
    assert int(back["epoch"]) == 3 and np.ndim(back["epoch"]) == 0
    # a fresh Checkpointer (a restart) reads the same; concrete arrays work as the abstract state
    with Checkpointer(tmp_path, keep=2) as again:
        assert again.latest_step() == 7
        restored2, ds2, _ = again.restore(7, abstract_state=state)
    _assert_bitwise(restored2, state)
    assert ds2 == data_state


def test_grain_bytes_state_and_none(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state=_state(), data_state=b'{"version": 2}', meta={})
        ckpt.save(2, state=_state(), data_state=None, meta={})
        ckpt.wait()
        assert ckpt.restore(1, abstract_state=_state())[1] == b'{"version": 2}'
        assert ckpt.restore(2, abstract_state=_state())[1] is None
        with pytest.raises(TypeError, match="meta"):
            ckpt.save(3, state=_state(), data_state=None, meta={"x": object()})
        with pytest.raises(TypeError, match="key_data.*'rng'"):
            ckpt.save(3, state={"rng": jax.random.key(0)}, data_state=None, meta={})
        # grain states are JSON: a bad one fails at the call site, not in orbax's background thread
        with pytest.raises(TypeError, match=r"data_state\['blob'\]"):
            ckpt.save(3, state=_state(), data_state={"blob": b"\x00"}, meta={})
        with pytest.raises(TypeError, match="UTF-8"):
            ckpt.save(3, state=_state(), data_state=b"\xff", meta={})
        assert ckpt.all_steps() == [1, 2]
    # grain's handler writes one file per process, named by the process count
    data_dir = tmp_path / CHECKPOINT_DIR / "1" / "data"
    assert sorted(p.name for p in data_dir.glob("process_*")) == ["process_0-of-1.json"]
    # a checkpoint written by another number of processes: the input restarts (data_state None)
    for rank in range(2):
        (data_dir / f"process_{rank}-of-2.json").write_text('{"i": 1}')
    (data_dir / "process_0-of-1.json").unlink()
    with Checkpointer(tmp_path) as ckpt:
        state, data_state, _ = ckpt.restore(1, abstract_state=_state())
    _assert_bitwise(state, _state())
    assert data_state is None and "saved by 2 processes, this run has 1" in caplog.text


def test_keep_n_and_latest(tmp_path):
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            assert ckpt.save(
                step, state=_state(step=step), data_state={"next_index": step}, meta=META
            )
        # a step at or before the latest is skipped (the final save after a periodic one)
        assert not ckpt.save(40, state=_state(), data_state=None, meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40]
        assert ckpt.latest_step() == 40
        state, ds, _ = ckpt.restore(abstract_state=_state())
        assert int(state["step"]) == 40 and ds == {"next_index": 40}
        with pytest.raises(ValueError, match=r"step 10 .*available steps: \[30, 40\]"):
            ckpt.restore(10, abstract_state=_state())
    assert sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()) == ["30", "40"]


@pytest.mark.parametrize(
    "mode, values, best",
    [
        ("max", [0.1, 0.5, 0.3, 0.7, 0.7, 0.2], (4, 0.7)),  # a tie keeps the earlier one
        ("min", [0.9, 0.4, 0.6, float("nan"), 0.1, 0.3], (5, 0.1)),  # NaN never wins
    ],
)
def test_best_checkpoint(tmp_path, mode, values, best):
    with Checkpointer(tmp_path, keep=2, best_metric="mIoU", best_mode=mode) as ckpt:
        written = []
        for step, v in enumerate(values, start=1):
            written.append(
                ckpt.save(
                    step,
                    state=_state(seed=step, step=step),
                    data_state=None,
                    meta=META,
                    metrics={"mIoU": v, "loss": 1.0},
                )
            )
        ckpt.wait()
        assert all(written)  # periodic saves always happen
        assert ckpt.all_steps() == [len(values) - 1, len(values)]
        assert (ckpt.best_step(), ckpt.best_value()) == best
        state, _, _ = ckpt.restore(abstract_state=_state(), best=True)
        _assert_bitwise(state, _state(seed=best[0], step=best[0]))
    assert [p.name for p in (tmp_path / BEST_DIR).iterdir() if p.is_dir()] == [str(best[0])]
    # after a restart the stored best is still the bar
    with Checkpointer(tmp_path, best_metric="mIoU", best_mode=mode) as again:
        assert again.best_value() == best[1]
        worse = best[1] - 1 if mode == "max" else best[1] + 1
        assert not again.save_best(
            99, state=_state(), data_state=None, meta=META, metrics={"mIoU": worse}
        )
        # a better value at an earlier step (resumed from an older checkpoint) still wins
        better = best[1] + 1 if mode == "max" else best[1] - 1
        assert again.save_best(
            2, state=_state(), data_state=None, meta=META, metrics={"mIoU": better}
        )
        again.wait()
        assert (again.best_step(), again.best_value()) == (2, better)
        with pytest.raises(ValueError, match="'mIoU'.*'top1'"):
            again.save_best(3, state=_state(), data_state=None, meta=META, metrics={"top1": 1.0})


def test_restore_mismatch_names_leaves(tmp_path):
    state = _state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state=state, data_state=None, meta=META)
        ckpt.wait()
        abstract = jax.eval_shape(lambda: state)
        bad = jax.tree.map(lambda x: x, abstract)
        bad["params"]["head"]["kernel"] = jax.ShapeDtypeStruct((4, 5), jnp.float32)
        with pytest.raises(
            ValueError, match=r"params/head/kernel: shape \(4, 3\) in the checkpoint, \(4, 5\)"
        ):
            ckpt.restore(abstract_state=bad)
        bad = jax.tree.map(lambda x: x, abstract)
        bad["batch_stats"]["bn"]["mean"] = jax.ShapeDtypeStruct((4,), jnp.bfloat16)
        with pytest.raises(
            ValueError, match="batch_stats/bn/mean: dtype float32 in the checkpoint, bfloat16"
        ):
            ckpt.restore(abstract_state=bad)
        bad = jax.tree.map(lambda x: x, abstract)
        bad["params"]["new"] = jax.ShapeDtypeStruct((2,), jnp.float32)
        del bad["batch_stats"]["bn"]["var"]
        with pytest.raises(ValueError) as err:
            ckpt.restore(abstract_state=bad)
        assert "params/new: missing in the checkpoint" in str(err.value)
        assert "batch_stats/bn/var: in the checkpoint but not in abstract_state" in str(err.value)


def test_empty_workdir_restore_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(abstract_state=_state())
        with pytest.raises(ValueError, match="best_metric=None"):
            ckpt.save_best(1, state=_state(), data_state=None, meta={}, metrics={"a": 1})
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(tmp_path, best_metric="a", best_mode="largest")
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp, numpy as np
    from train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], keep=3)
    small = {"w": jnp.ones((4,), jnp.float32)}
    ckpt.save(1, state=small, data_state={"next_index": 1}, meta={})
    ckpt.wait()
    # 64 MiB in several arrays: the async write is still running when the process dies.
    big = {"w": jnp.ones((4,), jnp.float32), "x": [np.full((4 << 20,), i, np.float32) for i in range(4)]}
    ckpt.save(2, state=big, data_state={"next_index": 2}, meta={})
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_mid_save_keeps_latest(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with Checkpointer(tmp_path, keep=3) as ckpt:
        if ckpt.latest_step() == 2:
            pytest.skip("the save finished before SIGKILL arrived (fast disk); nothing to check")
        assert ckpt.latest_step() == 1
        state, ds, _ = ckpt.restore(abstract_state={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
        assert ds == {"next_index": 1} and np.array_equal(state["w"], np.ones(4))
        # the next save of step 2 works (the stale temporary directory is gone or ignored)
        assert ckpt.save(2, state={"w": jnp.zeros(4)}, data_state=None, meta={})
        ckpt.wait()
        assert ckpt.latest_step() == 2


_MP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    rank, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                               initialization_timeout=60)
    from train.checkpoint import Checkpointer, GracefulShutdown, check_config
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    rows = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x[rank * 4:(rank + 1) * 4], x.shape)
    state = {"x": rows, "w": jax.device_put(np.ones(5, np.float32), NamedSharding(mesh, P()))}
    check_config(workdir, {"a": 1})
    with Checkpointer(workdir, keep=2, best_metric="acc") as ckpt:
        # both managers save step 4 at once: their multi-process barriers must not collide
        ckpt.save(4, state=state, data_state={"next_index": 10 + rank}, meta={"h": 1}, metrics={"acc": 0.5})
        ckpt.save(8, state=state, data_state={"next_index": 20 + rank}, meta={"h": 1}, metrics={"acc": 0.4})
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        restored, data_state, meta = ckpt.restore(abstract_state=abstract)
        _, best_data, _ = ckpt.restore(abstract_state=abstract, best=True)
        full = np.asarray(multihost_utils.process_allgather(restored["x"], tiled=True))
        result = {"rank": rank, "x_ok": bool(np.array_equal(full, x)), "data": data_state, "best_data": best_data,
                  "latest": ckpt.latest_step(), "best": ckpt.best_step(), "meta": meta}
    with GracefulShutdown() as stop:
        if rank == 1:
            stop.request("test")  # only one process is asked to stop ...
        result["stop"] = stop.should_stop()  # ... and both agree to
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()
    """
)


@pytest.mark.multidevice
def test_two_processes(tmp_path):
    """2 processes x 2 CPU devices over loopback: sharded save/restore, per-process input state, stop flag."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MP_WORKER, str(rank), str(port), str(tmp_path)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0].decode())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, out[-3000:]
        result = json.loads(
            next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :]
        )
        assert result == {
            "rank": rank,
            "x_ok": True,
            "data": {"next_index": 20 + rank},
            "best_data": {"next_index": 10 + rank},
            "latest": 8,
            "best": 4,
            "meta": {"h": 1},
            "stop": True,
        }


# ---------------------------------------------------------------------------------------------- config


def _config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.optim = ml_collections.ConfigDict(
        {"lr": 0.01, "schedule": "poly", "step_boundaries": (10, 20)}
    )
    c.input = ml_collections.ConfigDict({"global_batch_size": 8, "worker_count": 0})
    c.train = ml_collections.ConfigDict(
        {"num_steps": 100, "log_every": 10, "allow_config_change": False}
    )
    return c


def test_check_config(tmp_path):
    cfg = _config()
    assert check_config(tmp_path, cfg) is None
    stored = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert stored["optim"]["step_boundaries"] == [10, 20] and list(stored) == sorted(stored)
    assert check_config(tmp_path, _config()) is None  # identical restart

    cfg = _config()
    cfg.train.num_steps = 200
    cfg.input.worker_count = 4
    msg = check_config(tmp_path, cfg)
    assert "train.num_steps: 100 -> 200" in msg and "input.worker_count: 0 -> 4" in msg
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["train"]["num_steps"] == 200
    assert json.loads((tmp_path / PREVIOUS_CONFIG_FILE).read_text())["train"]["num_steps"] == 100

    bad = _config()
    bad.train.num_steps = 200
    bad.input.worker_count = 4
    bad.optim.lr = 0.1
    bad.optim.schedule = "cosine"
    bad.model = ml_collections.ConfigDict({"name": "fcn"})
    with pytest.raises(ValueError) as err:
        check_config(tmp_path, bad)
    text = str(err.value)
    for expected in (
        "optim.lr: 0.01 -> 0.1",
        "optim.schedule: 'poly' -> 'cosine'",
        "model.name: '<absent>' -> 'fcn'",
        "allow_config_change=True",
        "--workdir",
    ):
        assert expected in text
    assert "num_steps" not in text  # allowed keys are not reported as errors
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["optim"]["lr"] == 0.01  # untouched

    warning = check_config(tmp_path, bad, allow_change=True)
    assert "WARNING" in warning and "optim.lr: 0.01 -> 0.1" in warning
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["optim"]["lr"] == 0.1
    assert json.loads((tmp_path / PREVIOUS_CONFIG_FILE).read_text())["optim"]["lr"] == 0.01
    assert check_config(tmp_path, bad) is None  # the new config is now the reference
    # a non-writing process (multi-process: not process 0) checks but writes nothing
    assert check_config(tmp_path / "other", _config(), write=False) is None
    assert not (tmp_path / "other").exists()


def test_runs_started_before_the_remat_and_compile_cache_keys_resume(tmp_path):
    """A workdir whose config.json predates ``model.remat`` / ``train.compile_cache`` resumes with them."""
    assert check_config(tmp_path, _config()) is None
    newer = _config()
    newer.train.compile_cache = "user"
    newer.model = ml_collections.ConfigDict({"remat": "block"})
    msg = check_config(tmp_path, newer)
    assert (
        "train.compile_cache: '<absent>' -> 'user'" in msg
        and "model.remat: '<absent>' -> 'block'" in msg
    )


def test_runs_started_before_dataset_seed_was_declared_resume(tmp_path):
    """``dataset.seed`` (ADDED_CONFIG_KEYS) absent from the stored config reads as its old default 0."""
    old = _config()
    assert check_config(tmp_path, old) is None
    newer = _config()
    newer.dataset = ml_collections.ConfigDict({"seed": 0})
    assert check_config(tmp_path, newer) is None  # same data as before
    newer.dataset.seed = 3
    with pytest.raises(ValueError, match=r"dataset.seed: 0 -> 3"):
        check_config(tmp_path, newer)


# ---------------------------------------------------------------------------------------------- signals


def test_graceful_shutdown_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulShutdown() as stop:
        assert stop.installed and not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the Python-level handler runs at the next bytecode boundary
            if stop.requested:
                break
            time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"
        assert stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM is harmless
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before


def test_graceful_shutdown_second_sigint_forces_quit():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        with GracefulShutdown() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.requested and stop.signal_name == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before
