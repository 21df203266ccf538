"""The train loop does not wait for the device without need (train/trainer.py, ``train_and_evaluate``).

Metrics stay on the device and are fetched once per flush (log, eval, checkpoint, stop, end), the
next batch is read while the current step runs, and neither changes what the run computes, logs or
saves: the non-finite-loss stop still names the first bad step and saves nothing after it, and a
run stopped mid-window and resumed ends with the same state as an uninterrupted one.

Cheap: a 2-layer classifier (``_TinyNet``, swapped in for ``build_model``) on the built-in
``shapes_cls`` set at 32 px, so each run is a few seconds of compilation and milliseconds of steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_main import _final_state, _train_losses
from tiny_config import tiny_config

from train import checkpoint, observe, trainer
from train.data import pipeline


class _TinyNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=(4, 4))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(self.num_classes)(jnp.mean(nn.relu(x), axis=(1, 2)))


def _config(**overrides):
    c = tiny_config(
        **{
            "task": "recognition",
            "dataset.name": "shapes_cls",
            "dataset.num_classes": 5,
            "train.best_metric": "top1",
            "model.norm": "bn",
            "train.sample_predictions": 0,
            "optim.warmup_steps": 1,
            **overrides,
        }
    )
    c.model.name = "resnet18"  # not built: _TinyNet replaces build_model
    c.model.kwargs = {}
    return c


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setattr(trainer, "build_model", lambda config: _TinyNet(config.dataset.num_classes))


class _Events(list):
    def __init__(self):
        super().__init__()
        self.losses: dict[int, jax.Array] = {}
        self.nan_at: set[int] = set()


@pytest.fixture
def events(monkeypatch, tiny_model):
    """Records, in order, every train step dispatched ("step", n), every batch read from the train
    iterator ("next",) and every host fetch of step metrics ("fetch", n_steps); ``events.losses``
    keeps each step's loss (a device array) and ``events.nan_at`` makes chosen steps' losses NaN."""
    log = _Events()
    real_make_train_step = trainer.make_train_step
    real_device_get = jax.device_get
    real_train_iterator = pipeline.train_iterator

    def make_train_step(*args, **kwargs):
        step_fn = real_make_train_step(*args, **kwargs)

        def wrapped(state, batch):
            new_state, out = step_fn(state, batch)
            n = len(log.losses) + 1  # the runs here start at step 0
            log.append(("step", n))
            if n in log.nan_at:
                out = {**out, "loss": out["loss"] * jnp.nan}  # on the device: no fetch
            log.losses[n] = out["loss"]
            return new_state, out

        return wrapped

    def device_get(x):
        def has_loss(t):
            return (isinstance(t, dict) and "loss" in t) or (
                isinstance(t, list) and any(has_loss(e) for e in t)
            )

        if has_loss(x):
            log.append(("fetch", len(x) if isinstance(x, list) else 1))
        return real_device_get(x)

    class Iterator:
        def __init__(self, it):
            self._it = it

        def __next__(self):
            log.append(("next",))
            return next(self._it)

        def get_state(self):
            return self._it.get_state()

        def set_state(self, state):
            self._it.set_state(state)

    monkeypatch.setattr(trainer, "make_train_step", make_train_step)
    monkeypatch.setattr(jax, "device_get", device_get)
    monkeypatch.setattr(
        pipeline, "train_iterator", lambda *a, **k: Iterator(real_train_iterator(*a, **k))
    )
    return log


def _checkpoint_steps(workdir) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_metrics_are_fetched_once_per_log_window_and_the_next_batch_is_read_first(tmp_path, events):
    c = _config(
        **{
            "train.num_steps": 8,
            "train.log_every": 4,
            "train.eval_every": 8,
            "train.checkpoint_every": 8,
        }
    )
    result = trainer.train_and_evaluate(c, tmp_path)
    assert result["step"] == 8
    # One fetch of four steps per logging window, none per step (the old loop fetched 8 times).
    assert [e for e in events if e[0] == "fetch"] == [("fetch", 4), ("fetch", 4)]
    # After dispatching step n the loop reads batch n + 1 before anything else; no batch past the end.
    kinds = [e[0] for e in events]
    assert kinds.count("next") == 8 and kinds[0] == "next"
    for i, e in enumerate(events):
        if e[0] == "step" and e[1] < 8:
            assert events[i + 1] == ("next",), events
    # The logged numbers are what the old loop logged: the mean over the window of float(loss).
    losses = {n: float(v) for n, v in jax.device_get(events.losses).items()}
    logged = _train_losses(tmp_path)
    assert sorted(logged) == [4, 8]
    assert logged[4] == sum(losses[n] for n in range(1, 5)) / 4
    assert logged[8] == sum(losses[n] for n in range(5, 9)) / 4


@pytest.mark.parametrize(
    "bad, persist, eval_every, flush_at",
    [
        (
            3,
            True,
            100,
            "checkpoint",
        ),  # NaN from step 3 on; caught at the step-4 checkpoint (window 1..5)
        (4, False, 4, "eval"),  # NaN at step 4 alone; caught before the step-4 eval
    ],
)
def test_non_finite_loss_mid_window_names_the_first_bad_step(
    tmp_path, events, bad, persist, eval_every, flush_at
):
    events.nan_at.update(range(bad, 9) if persist else {bad})
    c = _config(
        **{
            "train.num_steps": 8,
            "train.log_every": 5,
            "train.checkpoint_every": 2,
            "train.eval_every": eval_every,
        }
    )
    with pytest.raises(
        FloatingPointError,
        match=rf"non-finite loss \(nan\) at step {bad}; training stopped without saving\. "
        r"The last good checkpoint is step 2 in ",
    ):
        trainer.train_and_evaluate(c, tmp_path)
    assert _checkpoint_steps(tmp_path) == [2]  # nothing after the last good step was saved
    best = tmp_path / "best"
    assert not (best.is_dir() and any(p.name.isdigit() for p in best.iterdir()))
    assert observe.read_metrics(tmp_path, split="eval") == []  # the bad state was never evaluated
    assert observe.read_metrics(tmp_path, split="train") == []  # the step-5 log never came
    assert ("fetch", 2) in events  # the steps since the step-2 flush, in one fetch


def test_stop_mid_window_then_resume_equals_uninterrupted_run(tmp_path, tiny_model, monkeypatch):
    c = _config(
        **{
            "train.num_steps": 8,
            "train.log_every": 4,
            "train.eval_every": 100,
            "train.checkpoint_every": 100,
        }
    )
    trainer.train_and_evaluate(c, tmp_path / "reference")

    calls = {"n": 0}
    real_should_stop = checkpoint.GracefulShutdown.should_stop

    def should_stop(self):
        calls["n"] += 1
        if calls["n"] == 3:  # after step 3: mid-window, one batch already read ahead
            self.request("test")
        return real_should_stop(self)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.GracefulShutdown, "should_stop", should_stop)
        stopped = trainer.train_and_evaluate(c, tmp_path / "resumed")
    assert (
        stopped["stopped_early"]
        and stopped["step"] == 3
        and _checkpoint_steps(tmp_path / "resumed") == [3]
    )
    assert trainer.train_and_evaluate(c, tmp_path / "resumed")["step"] == 8

    a, b = _final_state(tmp_path / "reference", 8), _final_state(tmp_path / "resumed", 8)
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), (
            f"{jax.tree_util.keystr(path)} differs after resume"
        )
    assert _train_losses(tmp_path / "reference")[8] == _train_losses(tmp_path / "resumed")[8]
