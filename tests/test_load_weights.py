"""jaxenc.models.load_weights (every source kind, subtree, strict), resolve_checkpoint, tree_differences."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import torch
from train_states import META, _state, _variables

from jaxenc.models import (
    load_weights,
    register_pretrained,
    resolve_checkpoint,
    save_checkpoint,
    store,
    tree_differences,
)
from jaxenc.models.store import PretrainedEntry
from jaxenc.nn import BatchNorm, Conv2d
from train.checkpoint import Checkpointer

X = jnp.zeros((1, 8, 8, 3), jnp.float32)


class Tiny(nn.Module):
    """Conv 3x3 (3->4) + BatchNorm + mean + Dense(3) (``fc``); a backbone with ``return_features``."""

    @nn.compact
    def __call__(self, x, train: bool = False, *, return_features: bool = False):
        x = BatchNorm(4, name="bn")(Conv2d(4, 3, padding=1, name="conv")(x), train=train)
        if return_features:
            return x
        return nn.Dense(3, name="fc")(x.mean(axis=(1, 2)))


def _tiny(seed: int):
    return Tiny().init(jax.random.key(seed), X)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tree_differences_lines():
    target = {"params": {"head": {"kernel": np.zeros((4, 5))}, "new": {"bias": np.zeros(2)}}}
    source = {"params": {"head": {"kernel": np.zeros((4, 3))}, "extra": {"k": np.zeros(1)}}}
    assert tree_differences(target, source) == [
        "params/new/bias: missing in the checkpoint",
        "params/head/kernel: shape (4, 3) in the checkpoint, (4, 5) in the target",
        "params/extra/k: in the checkpoint but not in the target",
    ]
    assert tree_differences(target, target) == []
    assert store.shape_problems is tree_differences  # the former name


def test_msgpack_strict_non_strict_and_abstract_targets(tmp_path, caplog):
    file = tmp_path / "w.msgpack"
    source = _variables(seed=4, classes=3)
    save_checkpoint(file, source)
    _assert_tree_equal(load_weights(file, _variables(seed=1)), source)
    abstract = jax.eval_shape(lambda: _variables(seed=1))
    _assert_tree_equal(load_weights(str(file), abstract), source)

    # dtypes follow the target
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _variables(seed=1))
    loaded = load_weights(file, half)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(loaded))

    target = _variables(seed=9, classes=5)
    with pytest.raises(
        ValueError,
        match=r"2 differences.*\n  params/head/bias: shape \(3,\) in the checkpoint, \(5,\)",
    ):
        load_weights(file, target)
    with caplog.at_level(logging.WARNING, logger="jaxenc.models.weights"):
        loaded = load_weights(file, target, strict=False)
    assert "kept the target's values for 2 leaves" in caplog.text
    np.testing.assert_array_equal(
        loaded["params"]["head"]["kernel"], target["params"]["head"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["params"]["conv"]["kernel"], source["params"]["conv"]["kernel"]
    )
    with pytest.raises(ValueError, match="ShapeDtypeStruct"):
        load_weights(file, jax.eval_shape(lambda: target), strict=False)


def test_store_name_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXENC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "_PRETRAINED", dict(store._PRETRAINED))
    source = _tiny(3)
    digest = save_checkpoint(tmp_path / "tiny.msgpack", source)
    entry = register_pretrained(PretrainedEntry("tiny_lw", sha256=digest, format="jaxenc"))
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        load_weights("tiny_lw", _tiny(0), model=Tiny(), example_input=X)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / entry.file_name).write_bytes((tmp_path / "tiny.msgpack").read_bytes())
    _assert_tree_equal(load_weights("tiny_lw", _tiny(0), model=Tiny(), example_input=X), source)
    with pytest.raises(ValueError, match="use_ema"):
        load_weights("tiny_lw", _tiny(0), model=Tiny(), example_input=X, use_ema=True)


def test_subtree_drops_the_classifier_and_keeps_the_rest(tmp_path):
    file = tmp_path / "classifier.msgpack"
    source = _tiny(5)
    save_checkpoint(file, source)
    backbone = Tiny().init(jax.random.key(0), X, return_features=True)
    target = {
        "params": {"pretrained": backbone["params"], "head": {"kernel": jnp.ones((4, 2))}},
        "batch_stats": {"pretrained": backbone["batch_stats"]},
    }
    loaded = load_weights(file, target, subtree="pretrained")
    assert "fc" not in loaded["params"]["pretrained"]
    np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], np.ones((4, 2)))
    np.testing.assert_array_equal(
        loaded["params"]["pretrained"]["conv"]["kernel"], source["params"]["conv"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["pretrained"]["bn"]["var"], source["batch_stats"]["bn"]["var"]
    )
    with pytest.raises(ValueError, match="no 'pretrained' submodule"):
        load_weights(file, source, subtree="pretrained")


def _torch_tiny(path, seed=0):
    torch.manual_seed(seed)
    tm = torch.nn.ModuleDict(
        {
            "conv": torch.nn.Conv2d(3, 4, 3, padding=1),
            "bn": torch.nn.BatchNorm2d(4),
            "fc": torch.nn.Linear(4, 3),
        }
    )
    with torch.no_grad():
        tm["bn"].running_var.uniform_(0.5, 1.5)
    torch.save(tm.state_dict(), path)
    return {k: v.numpy() for k, v in tm.state_dict().items()}


def test_pth_from_a_torch_state_dict(tmp_path):
    sd = _torch_tiny(tmp_path / "tiny.pth")
    loaded = load_weights(
        tmp_path / "tiny.pth", jax.eval_shape(lambda: _tiny(0)), model=Tiny(), example_input=X
    )
    np.testing.assert_array_equal(
        loaded["params"]["conv"]["kernel"], sd["conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(loaded["batch_stats"]["bn"]["var"], sd["bn.running_var"])
    with pytest.raises(ValueError, match="needs model="):
        load_weights(tmp_path / "tiny.pth", _tiny(0))

    # as a backbone: the classifier's keys are dropped, the model traced with return_features
    backbone = Tiny().init(jax.random.key(0), X, return_features=True)
    target = {
        "params": {"pretrained": backbone["params"]},
        "batch_stats": {"pretrained": backbone["batch_stats"]},
    }
    loaded = load_weights(
        tmp_path / "tiny.pth", target, subtree="pretrained", model=Tiny(), example_input=X
    )
    assert set(loaded["params"]["pretrained"]) == {"conv", "bn"}
    np.testing.assert_array_equal(
        loaded["batch_stats"]["pretrained"]["bn"]["var"], sd["bn.running_var"]
    )


def test_trainer_checkpoints_and_resolve_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    state = _state(seed=2)
    state["ema_params"] = jax.tree.map(lambda p: p + 1, state["params"])
    best = _state(seed=3)
    best["ema_params"] = best["params"]
    with Checkpointer(workdir) as ckpt:
        ckpt.save(1, state=best, data_state=None, meta=META)
        ckpt.save(2, state=state, data_state=None, meta=META)
    target = _variables(seed=9)
    expected = {"params": state["params"], "batch_stats": state["batch_stats"]}
    step_dir, step, wd = resolve_checkpoint(workdir)
    assert (step_dir.parent.name, step, wd) == ("checkpoints", 2, workdir.resolve())
    _assert_tree_equal(load_weights(step_dir, target), expected)
    _assert_tree_equal(load_weights(step_dir / "state", jax.eval_shape(lambda: target)), expected)
    _assert_tree_equal(load_weights(workdir / "checkpoints", target), expected)
    ema = load_weights(step_dir, target, use_ema=True)
    _assert_tree_equal(ema["params"], state["ema_params"])
    with Checkpointer(tmp_path / "plain") as ckpt:
        ckpt.save(1, state=_state(seed=1), data_state=None, meta=META)
    with pytest.raises(ValueError, match=r"no \(non-empty\) ema_params"):
        load_weights(tmp_path / "plain", target, use_ema=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")


def test_a_workdir_prefers_its_best_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    with Checkpointer(workdir, best_metric="mIoU") as ckpt:
        ckpt.save(2, state=_state(seed=2), data_state=None, meta=META)
        ckpt.save_best(1, state=_state(seed=5), data_state=None, meta=META, metrics={"mIoU": 0.5})
    assert resolve_checkpoint(workdir, use_best=None)[0].parent.name == "best"
    assert resolve_checkpoint(workdir)[0].parent.name == "checkpoints"
    assert resolve_checkpoint(workdir / "checkpoints", use_best=True)[0].parent.name == "best"
    loaded = load_weights(workdir, _variables(seed=9))
    _assert_tree_equal(loaded["params"], _state(seed=5)["params"])


def test_source_errors(tmp_path):
    target = _variables()
    with pytest.raises(FileNotFoundError, match="not a model-store name"):
        load_weights(tmp_path / "missing.msgpack", target)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="neither"):
        load_weights(tmp_path / "w.txt", target)
    save_checkpoint(tmp_path / "w.msgpack", target)
    with pytest.raises(ValueError, match="use_ema"):
        load_weights(tmp_path / "w.msgpack", target, use_ema=True)
    with pytest.raises(TypeError, match="dict of collections"):
        load_weights(tmp_path / "w.msgpack", np.zeros(3))
