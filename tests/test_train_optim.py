"""train.optim: torch.optim parity (SGD, AdamW, param groups), schedules vs upstream LR_Scheduler formulas,
head lr multiplier, weight-decay mask, clipping, gradient accumulation, EMA and config validation."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from optional_torch import torch

from jaxenc.nn import BatchNorm
from train.optim import (
    ema_update,
    make_lr_schedule,
    make_optimizer,
    param_labels,
    weight_decay_mask,
)


def _params(seed=0, with_backbone=True):
    """A segmentation-like params tree: backbone ``pretrained`` + ``head`` + ``auxlayer``."""
    rs = np.random.RandomState(seed)

    def a(*shape):
        return jnp.asarray(rs.randn(*shape), jnp.float32)

    tree = {
        "pretrained": {"conv1": {"kernel": a(3, 3, 2, 4)}, "bn1": {"scale": a(4), "bias": a(4)}},
        "head": {"conv5": {"kernel": a(1, 1, 4, 3), "bias": a(3)}},
        "auxlayer": {"conv": {"kernel": a(4, 3)}},
    }
    if not with_backbone:
        tree["backbone"] = tree.pop("pretrained")
    return tree


def _grads(params, seed):
    rs = np.random.RandomState(1000 + seed)
    return jax.tree.map(lambda p: jnp.asarray(rs.randn(*p.shape), jnp.float32), params)


def _run_jax(cfg, params, grads_seq, total_steps=10, batch=16):
    tx, schedule = make_optimizer(
        cfg, params=params, total_steps=total_steps, global_batch_size=batch
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, schedule


def _run_torch(cfg, params, grads_seq, schedule):
    """Upstream-style training: param groups (backbone lr, heads 10x lr; no_bn_wd groups with wd 0),
    lr set on every group before each step as LR_Scheduler_Head does."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    tensors = [torch.tensor(np.asarray(x), requires_grad=True) for _, x in leaves]
    groups = {}
    for (path, x), t in zip(leaves, tensors):
        head = path[0].key != "pretrained"
        no_wd = cfg.get("no_bn_wd", False) and x.ndim <= 1
        groups.setdefault((head, no_wd), []).append(t)
    wd = cfg.get("weight_decay", 1e-4)
    param_groups = [
        dict(params=ts, weight_decay=0.0 if no_wd else wd, head=head)
        for (head, no_wd), ts in groups.items()
    ]
    if cfg["name"] == "sgd":
        opt = torch.optim.SGD(
            param_groups,
            lr=0.0,
            momentum=cfg.get("momentum", 0.9),
            nesterov=cfg.get("nesterov", False),
        )
    else:
        opt = torch.optim.AdamW(
            param_groups,
            lr=0.0,
            betas=(cfg.get("b1", 0.9), cfg.get("b2", 0.999)),
            eps=cfg.get("eps", 1e-8),
        )
    for step, grads in enumerate(grads_seq):
        lr = float(schedule(step))
        for group in opt.param_groups:
            group["lr"] = lr * (cfg.get("head_lr_mult", 10.0) if group["head"] else 1.0)
        for t, g in zip(tensors, jax.tree.leaves(grads)):
            t.grad = torch.tensor(np.asarray(g))
        opt.step()
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(t.detach().numpy()) for t in tensors])


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# ---------------------------------------------------------------------------------------------------
# parity with torch.optim


@pytest.mark.parametrize(
    "extra",
    [
        dict(momentum=0.9, nesterov=False, weight_decay=1e-2),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2, no_bn_wd=True),
        dict(momentum=0.0, weight_decay=0.0),
    ],
    ids=["momentum_wd", "nesterov_nobnwd", "plain"],
)
def test_sgd_matches_torch_sgd_with_head_groups_and_poly_schedule(extra):
    cfg = dict(name="sgd", lr=0.05, schedule="poly", warmup_steps=2, **extra)
    params = _params()
    grads_seq = [_grads(params, s) for s in range(6)]
    ours, schedule = _run_jax(cfg, params, grads_seq)
    theirs = _run_torch(cfg, params, grads_seq, schedule)
    _assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours["head"]["conv5"]["kernel"], params["head"]["conv5"]["kernel"])


@pytest.mark.parametrize("no_bn_wd", [False, True])
def test_adamw_matches_torch_adamw(no_bn_wd):
    cfg = dict(
        name="adamw",
        lr=1e-2,
        weight_decay=0.05,
        schedule="cosine",
        warmup_steps=1,
        b1=0.85,
        b2=0.99,
        eps=1e-7,
        head_lr_mult=2.0,
        no_bn_wd=no_bn_wd,
    )
    params = _params(1)
    grads_seq = [_grads(params, s) for s in range(5)]
    ours, schedule = _run_jax(cfg, params, grads_seq)
    theirs = _run_torch(cfg, params, grads_seq, schedule)
    _assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# schedules vs upstream LR_Scheduler (encoding/utils/lr_scheduler.py)


def upstream_lr(
    mode,
    base_lr,
    num_epochs,
    iters_per_epoch,
    lr_step,
    warmup_epochs,
    i,
    epoch,
    power=0.9,
    gamma=0.1,
):
    """LR_Scheduler.__call__ restated (power and gamma are 0.9 / 0.1 upstream, generalised here)."""
    T = epoch * iters_per_epoch + i
    warmup_iters = warmup_epochs * iters_per_epoch
    total_iters = (num_epochs - warmup_epochs) * iters_per_epoch
    if warmup_iters > 0 and T < warmup_iters:
        return base_lr * 1.0 * T / warmup_iters
    if mode == "cos":
        T = T - warmup_iters
        return 0.5 * base_lr * (1 + math.cos(1.0 * T / total_iters * math.pi))
    if mode == "poly":
        T = T - warmup_iters
        return base_lr * pow((1 - 1.0 * T / total_iters), power)
    if mode == "step":
        return base_lr * (gamma ** (epoch // lr_step))
    if mode == "constant":  # not upstream; the trivial case
        return base_lr
    raise NotImplementedError(mode)


@pytest.mark.parametrize(
    "schedule,mode,warmup_epochs,extra",
    [
        ("poly", "poly", 0, {}),
        ("poly", "poly", 2, dict(poly_power=2.0)),
        ("cosine", "cos", 0, {}),
        ("cosine", "cos", 1, {}),
        ("step", "step", 0, dict(step_gamma=0.5)),
        ("step", "step", 1, {}),
        ("constant", "constant", 2, {}),
    ],
)
def test_schedule_matches_upstream_formulas(schedule, mode, warmup_epochs, extra):
    num_epochs, iters, lr_step = 8, 5, 3
    total = num_epochs * iters
    warmup = warmup_epochs * iters
    boundaries = tuple(
        k * lr_step * iters
        for k in range(1, num_epochs // lr_step + 1)
        if k * lr_step * iters < total
    )
    cfg = ml_collections.ConfigDict(
        dict(
            name="sgd",
            lr=0.01,
            lr_batch_reference=16,
            schedule=schedule,
            warmup_steps=warmup,
            step_boundaries=boundaries,
            **extra,
        )
    )
    fn, batch = make_lr_schedule(cfg, total_steps=total, global_batch_size=32), 32
    base = 0.01 * batch / 16
    ours = np.asarray(jax.jit(jax.vmap(fn))(jnp.arange(total)))
    power, gamma = extra.get("poly_power", 0.9), extra.get("step_gamma", 0.1)
    ref = np.array(
        [
            upstream_lr(
                mode,
                base,
                num_epochs,
                iters,
                lr_step,
                warmup_epochs,
                t % iters,
                t // iters,
                power,
                gamma,
            )
            for t in range(total)
        ]
    )
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-9)
    # the named points: T = 0, warmup end, last update
    for t in sorted({0, warmup, total - 1}):
        assert float(fn(t)) == pytest.approx(ref[t], rel=2e-6, abs=1e-9)
    if warmup:
        assert float(fn(0)) == 0.0 and float(fn(warmup)) == pytest.approx(
            base if mode != "step" else ref[warmup]
        )


def test_step_boundary_is_passed_at_the_boundary_step():
    fn = make_lr_schedule(
        dict(lr=1.0, schedule="step", step_boundaries=(3, 6), step_gamma=0.1),
        total_steps=10,
        global_batch_size=1,
    )
    np.testing.assert_allclose(
        [float(fn(t)) for t in (2, 3, 5, 6, 9)], [1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------------
# groups, masks, clipping, accumulation, EMA


def _one_update(cfg, params, grads, total_steps=10):
    tx, _ = make_optimizer(cfg, params=params, total_steps=total_steps, global_batch_size=16)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


@pytest.mark.parametrize("mult", [2.0, 10.0])
def test_head_lr_multiplier_scales_head_updates(mult):
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    cfg = dict(
        name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", head_lr_mult=mult
    )
    updates = _one_update(cfg, params, grads)
    np.testing.assert_allclose(updates["pretrained"]["conv1"]["kernel"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["conv5"]["kernel"], -0.1 * mult, rtol=1e-6)
    np.testing.assert_allclose(updates["auxlayer"]["conv"]["kernel"], -0.1 * mult, rtol=1e-6)
    # no top-level "pretrained" (a classification model): everything is backbone, no multiplier
    flat = _params(with_backbone=False)
    updates = _one_update(cfg, flat, jax.tree.map(jnp.ones_like, flat))
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_allclose(leaf, -0.1, rtol=1e-6)
    assert set(jax.tree.leaves(param_labels(flat))) == {"backbone"}


class _Small(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4)(x)
        x = BatchNorm()(x, train=train)
        return nn.Dense(2, name="head")(x)


def test_no_bn_wd_mask_on_batchnorm_and_dense():
    variables = _Small().init(jax.random.key(0), jnp.ones((2, 3)))
    params = variables["params"]
    mask = weight_decay_mask(params)
    assert mask == {
        "Dense_0": {"kernel": True, "bias": False},
        "BatchNorm_0": {"scale": False, "bias": False},
        "head": {"kernel": True, "bias": False},
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    cfg = dict(
        name="sgd", lr=1.0, momentum=0.0, weight_decay=0.1, schedule="constant", no_bn_wd=True
    )
    updates = _one_update(cfg, params, zeros)
    for path, upd in jax.tree_util.tree_leaves_with_path(updates):
        p = params[path[0].key][path[1].key]
        expected = -0.1 * p if p.ndim > 1 else jnp.zeros_like(p)
        np.testing.assert_allclose(
            upd, expected, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path)
        )
    # without no_bn_wd every parameter decays (BatchNorm scale is ones, so its update is -0.1)
    updates = _one_update({**cfg, "no_bn_wd": False}, params, zeros)
    np.testing.assert_allclose(updates["BatchNorm_0"]["scale"], -0.1, rtol=1e-6)
    with pytest.raises(ValueError, match="variables\\['params'\\]"):
        make_optimizer(cfg, params=variables, total_steps=10, global_batch_size=1)


def test_clip_by_global_norm_before_head_multiplier():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    norm = math.sqrt(sum(x.size for x in jax.tree.leaves(grads)))
    cfg = dict(
        name="sgd",
        lr=1.0,
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        head_lr_mult=10.0,
        clip_grad_norm=1.0,
    )
    updates = _one_update(cfg, params, grads)
    np.testing.assert_allclose(updates["pretrained"]["conv1"]["kernel"], -1.0 / norm, rtol=1e-5)
    np.testing.assert_allclose(updates["head"]["conv5"]["kernel"], -10.0 / norm, rtol=1e-5)
    small = jax.tree.map(lambda g: g * 0.5 / norm, grads)  # global norm 0.5: untouched
    updates = _one_update(cfg, params, small)
    np.testing.assert_allclose(updates["pretrained"]["conv1"]["kernel"], -0.5 / norm, rtol=1e-5)


def test_grad_accumulation_equals_one_big_batch_step():
    params = _params()
    micro = [_grads(params, s) for s in range(3)]
    mean = jax.tree.map(lambda *g: sum(g) / 3, *micro)
    base = dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=1e-2, schedule="constant")
    big, _ = _run_jax(base, params, [mean])
    tx, _ = make_optimizer(
        {**base, "grad_accum_steps": 3}, params=params, total_steps=10, global_batch_size=16
    )
    state, p = tx.init(params), params
    for i, g in enumerate(micro):
        updates, state = tx.update(g, state, p)
        if i < 2:
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
        p = optax.apply_updates(p, updates)
    _assert_trees_close(p, big, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_schedule_counts_optimizer_updates():
    params = {"w": jnp.zeros((2, 2))}
    g = {"w": jnp.ones((2, 2))}
    cfg = dict(
        name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, schedule="cosine", grad_accum_steps=2
    )
    tx, schedule = make_optimizer(cfg, params=params, total_steps=4, global_batch_size=1)
    state = tx.init(params)
    applied = []
    for _ in range(6):  # 3 real updates
        updates, state = tx.update(g, state, params)
        if float(jnp.abs(updates["w"]).max()) > 0:
            applied.append(-float(updates["w"][0, 0]))
    np.testing.assert_allclose(applied, [float(schedule(n)) for n in range(3)], rtol=1e-6)
    np.testing.assert_allclose(applied[1], 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6)


def test_ema_update():
    ema = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2))}}
    new = {"a": jnp.zeros(3), "b": {"c": jnp.ones((2, 2))}}
    out = jax.jit(ema_update)(ema, new, 0.9)
    np.testing.assert_allclose(out["a"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(out["b"]["c"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(ema_update(ema, new, 1.0)["a"], 1.0)
    with pytest.raises(ValueError, match="decay"):
        ema_update(ema, new, 1.5)


# ---------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "cfg,kwargs,error,match",
    [
        (dict(name="rmsprop"), {}, ValueError, r"name must be one of \('sgd', 'adamw'\)"),
        (
            dict(schedule="exp"),
            {},
            ValueError,
            r"schedule must be one of \('poly', 'cosine', 'step', 'constant'\)",
        ),
        (dict(lr=-0.1), {}, ValueError, "optim.lr"),
        (dict(weight_decay=-1e-4), {}, ValueError, "weight_decay"),
        (
            dict(warmup_steps=10),
            {},
            ValueError,
            "warmup_steps=10 must be smaller than total_steps=10",
        ),
        (dict(schedule="step", step_boundaries=(5, 10)), {}, ValueError, "step_boundaries"),
        (dict(schedule="step", step_boundaries=(6, 4)), {}, ValueError, "strictly increasing"),
        (dict(schedule="step"), {}, ValueError, "non-empty"),
        (dict(momentum=0.0, nesterov=True), {}, ValueError, "nesterov"),
        (dict(clip_grad_norm=0.0), {}, ValueError, "clip_grad_norm"),
        (dict(grad_accum_steps=0), {}, ValueError, "grad_accum_steps"),
        (dict(ema_decay=1.5), {}, ValueError, "ema_decay"),
        (dict(lr_batch_reference=0), {}, ValueError, "lr_batch_reference"),
        (dict(learning_rate=0.1), {}, KeyError, "learning_rate"),
        (dict(lr=None), {}, KeyError, "lr"),
        ({}, dict(total_steps=0), ValueError, "total_steps"),
        ({}, dict(global_batch_size=0), ValueError, "global_batch_size"),
    ],
)
def test_invalid_config_raises(cfg, kwargs, error, match):
    full = {"lr": 0.1, **cfg}
    args = {"params": _params(), "total_steps": 10, "global_batch_size": 16, **kwargs}
    with pytest.raises(error, match=match):
        make_optimizer(full, **args)
