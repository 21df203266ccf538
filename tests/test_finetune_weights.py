"""train/finetune.py: fine-tuning weights from Checkpointer directories and native .msgpack files."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_states import META, _assert_bitwise, _state, _variables

from jaxenc.models.store import save_checkpoint
from train.checkpoint import CHECKPOINT_DIR, Checkpointer
from train.finetune import load_params_for_finetune
from train.step import TrainState


def test_finetune_from_checkpointer_and_msgpack(tmp_path):
    source_state = _state(seed=3, step=5)
    workdir = tmp_path / "run"
    with Checkpointer(workdir) as ckpt:  # a dataclass state round-trips too
        ckpt.save(1, state=TrainState(**source_state), data_state=None, meta=META)
        restored, _, _ = ckpt.restore(
            abstract_state=jax.eval_shape(lambda: TrainState(**source_state))
        )
    assert isinstance(restored, TrainState)
    _assert_bitwise(restored, TrainState(**source_state))
    workdir = tmp_path / "run2"
    with Checkpointer(workdir) as ckpt:
        ckpt.save(5, state=source_state, data_state=None, meta=META)
    target = _variables(seed=9)
    expected = {"params": source_state["params"], "batch_stats": source_state["batch_stats"]}
    for path in (workdir, workdir / CHECKPOINT_DIR, workdir / CHECKPOINT_DIR / "5"):
        _assert_bitwise(load_params_for_finetune(path, target), expected)
    # the target may be abstract
    _assert_bitwise(load_params_for_finetune(workdir, jax.eval_shape(lambda: target)), expected)

    file = tmp_path / "weights.msgpack"
    save_checkpoint(file, _variables(seed=4), metadata={"model": "toy"})
    _assert_bitwise(load_params_for_finetune(file, target), _variables(seed=4))

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_params_for_finetune(tmp_path / "empty", target)
    with pytest.raises(ValueError, match="load_pretrained"):
        (tmp_path / "w.pth").write_bytes(b"")
        load_params_for_finetune(tmp_path / "w.pth", target)


def test_finetune_mismatch_strict_and_non_strict(tmp_path):
    file = tmp_path / "weights.msgpack"
    source = _variables(seed=4, classes=3)
    source["params"]["extra"] = {"kernel": jnp.ones(2)}
    save_checkpoint(file, source)
    target = _variables(seed=9, classes=5)  # new head with another number of classes
    target["params"]["new"] = {"bias": jnp.full(2, 7.0)}
    with pytest.raises(ValueError) as err:
        load_params_for_finetune(file, target)
    text = str(err.value)
    assert "params/head/kernel: shape (4, 3) in the checkpoint, (4, 5) in the target" in text
    assert "params/head/bias: shape (3,)" in text
    assert "params/new/bias: missing in the checkpoint" in text
    assert "params/extra/kernel: in the checkpoint but not in the target" in text

    loaded = load_params_for_finetune(file, target, strict=False)
    assert jax.tree.structure(loaded) == jax.tree.structure(target)
    np.testing.assert_array_equal(
        loaded["params"]["conv"]["kernel"], source["params"]["conv"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["bn"]["mean"], source["batch_stats"]["bn"]["mean"]
    )
    np.testing.assert_array_equal(
        loaded["params"]["head"]["kernel"], target["params"]["head"]["kernel"]
    )
    np.testing.assert_array_equal(loaded["params"]["new"]["bias"], np.full(2, 7.0))
    with pytest.raises(ValueError, match="ShapeDtypeStruct"):
        load_params_for_finetune(file, jax.eval_shape(lambda: target), strict=False)

    # the same from a Checkpointer directory, with the EMA weights
    workdir = tmp_path / "run"
    state = _state(seed=2)
    state["ema_params"] = jax.tree.map(lambda p: p + 1, state["params"])
    with Checkpointer(workdir) as ckpt:
        ckpt.save(1, state=state, data_state=None, meta=META)
    loaded = load_params_for_finetune(workdir, target, strict=False, use_ema=True)
    np.testing.assert_array_equal(
        loaded["params"]["conv"]["kernel"], state["ema_params"]["conv"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["params"]["head"]["kernel"], target["params"]["head"]["kernel"]
    )
