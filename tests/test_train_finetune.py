"""Trainer weights from outside the run and the optional training paths, end to end (issue 7).

* ``config.model.backbone_pretrained``: ImageNet backbone weights (an upstream ``.pth`` converted
  through ``jaxenc.port``, or a native ``.msgpack``) placed under ``params/pretrained``; a file whose
  backbone does not fit is refused with the differing leaves named.
* ``config.model.pretrained``: a whole-model checkpoint starts a run.
* EMA of weights, gradient accumulation, bfloat16 compute and per-device BatchNorm, together, in one
  short run of the real trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import torch
from tiny_config import tiny_config
from torch_ref import resnest_torch

from jaxenc import models
from jaxenc.models import store
from train import checkpoint, finetune
from train.trainer import build_model, load_backbone, train_and_evaluate

SMALL = {"layers": (1, 1, 1, 1), "stage_planes": (8, 16, 32, 64)}


_config = tiny_config


def _abstract_variables(config):
    size = config.dataset.image_size
    return jax.eval_shape(
        lambda: build_model(config).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    )


def _final_params(workdir, config):
    target = _abstract_variables(config)
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
    return finetune.load_params_for_finetune(
        workdir, {"params": target["params"], "batch_stats": target["batch_stats"]}
    )["params"]


def _upstream_resnet_pth(path, layers=(1, 1, 1, 1)):
    """An upstream-layout ResNet-50s-style state_dict (deep stem 64, plain bottlenecks) with random weights."""
    ref = resnest_torch().resnet
    torch.manual_seed(0)
    tm = ref.ResNet(
        ref.Bottleneck, list(layers), radix=0, deep_stem=True, stem_width=64, num_classes=1000
    )
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(tm.state_dict(), path)
    return tm.state_dict()


def test_backbone_from_upstream_pth_lands_under_pretrained(tmp_path):
    sd = _upstream_resnet_pth(tmp_path / "resnet50s_small.pth")
    c = _config(
        **{
            "model.backbone": "resnet50s",
            "model.backbone_pretrained": str(tmp_path / "resnet50s_small.pth"),
        }
    )
    c.model.kwargs.backbone_kwargs = {"layers": (1, 1, 1, 1)}
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _abstract_variables(c))
    params, stats = load_backbone(c, variables["params"], variables["batch_stats"])

    # torch conv weights are (O, I, kh, kw), flax kernels (kh, kw, I, O); running_var stays unbiased.
    leaves = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(params["pretrained"])[0]
    }
    want = sd["conv1.0.weight"].numpy().transpose(2, 3, 1, 0)
    assert any(v.shape == want.shape and np.array_equal(v, want) for v in leaves.values()), (
        f"the stem conv of the .pth is not in params/pretrained (found {sorted(leaves)[:5]} ...)"
    )
    last_bn = sd["layer4.0.bn3.running_var"].numpy()
    stat_leaves = [np.asarray(v) for v in jax.tree.leaves(stats["pretrained"])]
    assert any(v.shape == last_bn.shape and np.array_equal(v, last_bn) for v in stat_leaves)
    # Everything outside the backbone is untouched, and the backbone has no classifier.
    assert "fc" not in params["pretrained"]
    for key in params:
        if key != "pretrained":
            assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(params[key]))
    n_file = sum(
        int(np.prod(v.shape))
        for k, v in sd.items()
        if not k.startswith("fc.") and "num_batches_tracked" not in k
    )
    n_loaded = sum(
        int(np.prod(np.shape(v)))
        for v in jax.tree.leaves((params["pretrained"], stats["pretrained"]))
    )
    assert n_loaded == n_file


def test_backbone_that_does_not_fit_is_refused(tmp_path):
    _upstream_resnet_pth(tmp_path / "r.pth")
    c = _config(
        **{"model.backbone": "resnet50s", "model.backbone_pretrained": str(tmp_path / "r.pth")}
    )
    c.model.kwargs.backbone_kwargs = {"layers": (1, 1, 1, 1), "stage_planes": (16, 32, 64, 128)}
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _abstract_variables(c))
    with pytest.raises(ValueError, match=r"backbone_pretrained=.*r\.pth.*does not fit|torch"):
        load_backbone(c, variables["params"], variables["batch_stats"])


def test_native_backbone_that_does_not_fit_names_the_leaves(tmp_path):
    wide = models.get_model(
        "resnet18", num_classes=7, layers=(1, 1, 1, 1), stage_planes=(16, 16, 32, 64)
    )
    store.save_checkpoint(
        tmp_path / "wide.msgpack", wide.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    c = _config(**{"model.backbone_pretrained": str(tmp_path / "wide.msgpack")})
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _abstract_variables(c))
    want = r"(?s)backbone_pretrained=.*wide\.msgpack.*does not fit.*params/layer1/0/bn1/scale: shape \(16,\) in the checkpoint, \(8,\) in the target"
    with pytest.raises(ValueError, match=want):
        load_backbone(c, variables["params"], variables["batch_stats"])


def test_backbone_pretrained_store_name_not_cached_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXENC_CACHE", str(tmp_path / "cache"))
    c = _config(**{"model.backbone": "resnet50s", "model.backbone_pretrained": "resnet50s"})
    c.model.kwargs.backbone_kwargs = {}
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _abstract_variables(c))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cache")):
        load_backbone(c, variables["params"], variables["batch_stats"])


def test_runs_start_from_backbone_and_whole_model_checkpoints(tmp_path):
    # A native backbone checkpoint (ResNet-18-style classifier with an fc that must be dropped).
    classifier = models.get_model("resnet18", num_classes=7, **SMALL)
    cls_vars = classifier.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
    cls_vars = jax.tree.map(lambda v: v + 0.01, cls_vars)  # not the trainer's own init
    store.save_checkpoint(tmp_path / "backbone.msgpack", cls_vars)

    # lr 0 (AdamW's decoupled decay is scaled by lr too): the final params are the loaded ones.
    frozen = {
        "optim.lr": 0.0,
        "optim.warmup_steps": 0,
        "train.num_steps": 2,
        "train.eval_every": 2,
        "train.checkpoint_every": 2,
    }
    c = _config(**frozen, **{"model.backbone_pretrained": str(tmp_path / "backbone.msgpack")})
    train_and_evaluate(c, tmp_path / "a")
    got = _final_params(tmp_path / "a", c)["pretrained"]
    want = {k: v for k, v in cls_vars["params"].items() if k != "fc"}
    jax.tree.map(
        lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), got, want
    )

    # That run's whole model, exported natively, starts a second run.
    whole = {"params": _final_params(tmp_path / "a", c)}
    whole["params"] = jax.tree.map(lambda v: np.asarray(v) * 0.5, whole["params"])
    stats = _abstract_variables(c)["batch_stats"]
    store.save_checkpoint(
        tmp_path / "whole.msgpack",
        {**whole, "batch_stats": jax.tree.map(lambda s: np.ones(s.shape, s.dtype), stats)},
    )
    c2 = _config(**frozen, **{"model.pretrained": str(tmp_path / "whole.msgpack")})
    train_and_evaluate(c2, tmp_path / "b")
    jax.tree.map(
        lambda g, w: np.testing.assert_array_equal(np.asarray(g), w),
        _final_params(tmp_path / "b", c2),
        whole["params"],
    )


def _raw_state(workdir, step):
    """The trainer's saved state as plain nested dicts of numpy arrays (no target structure needed)."""
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(
        (workdir / checkpoint.CHECKPOINT_DIR / str(step) / "state").absolute()
    )


def test_ema_accumulation_bfloat16_and_per_device_bn_together(tmp_path):
    c = _config(
        **{
            "optim.ema_decay": 0.5,
            "optim.grad_accum_steps": 2,
            "model.dtype": "bfloat16",
            "model.norm": "bn",
            "train.num_steps": 3,
            "train.eval_every": 3,
            "train.checkpoint_every": 1,
            "train.keep_checkpoints": 3,
            "optim.clip_grad_norm": 1.0,
            "optim.warmup_steps": 0,
        }
    )
    result = train_and_evaluate(c, tmp_path)
    assert result["step"] == 3 and 0.0 <= result["mIoU"] <= 1.0
    s1, s2, s3 = (_raw_state(tmp_path, k) for k in (1, 2, 3))
    flat = lambda tree: [np.asarray(v, np.float32) for v in jax.tree.leaves(tree)]  # noqa: E731
    # Accumulation over 2 micro-steps: step 1 only accumulates, step 2 applies the mean gradient.
    p1, p2, p3 = flat(s1["params"]), flat(s2["params"]), flat(s3["params"])
    k_params, k_drop = jax.random.split(
        jax.random.fold_in(jax.random.key(c.seed), 1)
    )  # the trainer's init keys
    # Jitted like the trainer's (eager initialisers round differently in the last bit).
    init = jax.jit(
        lambda: build_model(c).init(
            {"params": k_params, "dropout": k_drop}, jnp.zeros((1, 32, 32, 3)), train=False
        )
    )()["params"]
    assert all(np.array_equal(a, b) for a, b in zip(p1, flat(init)))
    assert any(not np.array_equal(a, b) for a, b in zip(p1, p2))
    assert all(np.array_equal(a, b) for a, b in zip(p2, p3))
    # EMA (decay 0.5) follows the params only at the update: ema_2 = (init + p2) / 2, ema_3 = ema_2.
    e2, e3 = flat(s2["ema_params"]), flat(s3["ema_params"])
    for a, b, ema in zip(flat(init), p2, e2):
        np.testing.assert_allclose(ema, 0.5 * a + 0.5 * b, rtol=1e-6, atol=1e-7)
    assert all(np.array_equal(a, b) for a, b in zip(e2, e3))
    # Parameters stay float32 under bfloat16 compute; per-device BN statistics are finite.
    assert {np.asarray(v).dtype for v in jax.tree.leaves(s3["params"])} == {np.dtype(np.float32)}
    assert all(np.isfinite(v).all() for v in flat(s3["batch_stats"]))
