"""Optimizer and learning-rate schedule from ``config.optim`` (PyTorch-Encoding recipes, built with optax).

:func:`make_optimizer` returns ``(tx, lr_schedule)``; ``T`` counts optimizer updates, ``W = warmup_steps``.

* Schedule (upstream ``LR_Scheduler``): ``base·T/W`` for ``T < W``, then ``"poly"``
  ``base·(1 − (T−W)/(total−W))^poly_power``, ``"cosine"`` ``0.5·base·(1 + cos(π·(T−W)/(total−W)))``,
  ``"step"`` ``base·step_gamma^(#step_boundaries <= T)`` (absolute updates) or ``"constant"``.
  ``base = lr``, or ``lr·global_batch_size/lr_batch_reference`` when that is set.
* Groups (upstream ``LR_Scheduler_Head``): the top-level ``backbone_prefix`` subtree gets the
  scheduled lr, every other top-level subtree ``head_lr_mult`` × it; without that key (classifiers)
  everything is backbone. Pass ``variables["params"]``, not the whole variables dict.
* ``"sgd"`` is ``torch.optim.SGD`` (L2 decay added to the gradient before momentum); ``"adamw"`` is
  ``optax.adamw``. Deviation: ``no_bn_wd`` exempts every parameter with ``ndim <= 1`` (downsample BNs
  and Encoding's smoothing factors included, which upstream's name rule still decays).
* ``clip_grad_norm`` comes first; ``grad_accum_steps = k > 1`` wraps the chain in
  ``optax.MultiSteps`` (one update per k calls, zeros otherwise): ``total_steps`` and the schedule
  count updates, so a run makes ``k·total_steps`` ``tx.update`` calls.

``tx.update(grads, opt_state, params)`` always needs ``params``. ``ema_decay`` is validated here but
applied by the trainer with :func:`ema_update`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxenc.validation import check_positive_int, is_int

__all__ = [
    "make_optimizer",
    "make_lr_schedule",
    "weight_decay_mask",
    "param_labels",
    "ema_update",
    "update_applied",
    "DEFAULTS",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "step", "constant")

# Every key of config.optim with its default; "lr" has none and must be given.
DEFAULTS: dict[str, Any] = dict(
    name="sgd",
    lr=None,
    lr_batch_reference=None,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    no_bn_wd=False,
    head_lr_mult=10.0,
    backbone_prefix="pretrained",
    schedule="poly",
    poly_power=0.9,
    warmup_steps=0,
    step_boundaries=(),
    step_gamma=0.1,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    clip_grad_norm=None,
    grad_accum_steps=1,
    ema_decay=None,
)


# ---------------------------------------------------------------------------------------------------
# config reading and validation


def _is_real(value) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(float(value))
    )


def _real(
    cfg,
    key: str,
    *,
    low: float,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = True,
):
    value = cfg[key]
    ok = _is_real(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ValueError(f"config.optim.{key} must be a real number in {lo}, {hi}, got {value!r}")
    return float(value)


def _read_config(optim_config) -> dict[str, Any]:
    """config.optim (ConfigDict or mapping) -> a validated plain dict with every key of DEFAULTS."""
    raw = optim_config.to_dict() if hasattr(optim_config, "to_dict") else dict(optim_config)
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise KeyError(f"config.optim: unknown key(s) {unknown}; known keys are {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **raw}
    if cfg["lr"] is None:
        raise KeyError("config.optim.lr (the base learning rate) is required")
    if cfg["name"] not in OPTIMIZERS:
        raise ValueError(f"config.optim.name must be one of {OPTIMIZERS}, got {cfg['name']!r}")
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(
            f"config.optim.schedule must be one of {SCHEDULES}, got {cfg['schedule']!r}"
        )
    cfg["lr"] = _real(cfg, "lr", low=0.0)
    cfg["weight_decay"] = _real(cfg, "weight_decay", low=0.0)
    cfg["momentum"] = _real(cfg, "momentum", low=0.0, high=1.0)
    cfg["head_lr_mult"] = _real(cfg, "head_lr_mult", low=0.0)
    cfg["poly_power"] = _real(cfg, "poly_power", low=0.0, low_open=True)
    cfg["step_gamma"] = _real(cfg, "step_gamma", low=0.0)
    cfg["b1"] = _real(cfg, "b1", low=0.0, high=1.0)
    cfg["b2"] = _real(cfg, "b2", low=0.0, high=1.0)
    cfg["eps"] = _real(cfg, "eps", low=0.0, low_open=True)
    if not isinstance(cfg["nesterov"], bool):
        raise ValueError(f"config.optim.nesterov must be a bool, got {cfg['nesterov']!r}")
    if cfg["nesterov"] and cfg["name"] == "sgd" and cfg["momentum"] == 0.0:
        raise ValueError(
            "config.optim.nesterov=True needs config.optim.momentum > 0 (as torch.optim.SGD)"
        )
    if not isinstance(cfg["no_bn_wd"], bool):
        raise ValueError(f"config.optim.no_bn_wd must be a bool, got {cfg['no_bn_wd']!r}")
    if not isinstance(cfg["backbone_prefix"], str) or not cfg["backbone_prefix"]:
        raise ValueError(
            f"config.optim.backbone_prefix must be a non-empty string, got {cfg['backbone_prefix']!r}"
        )
    if cfg["lr_batch_reference"] is not None:
        cfg["lr_batch_reference"] = _real(cfg, "lr_batch_reference", low=0.0, low_open=True)
    if cfg["clip_grad_norm"] is not None:
        cfg["clip_grad_norm"] = _real(cfg, "clip_grad_norm", low=0.0, low_open=True)
    if cfg["ema_decay"] is not None:
        cfg["ema_decay"] = _real(cfg, "ema_decay", low=0.0, high=1.0, high_open=False)
    if not is_int(cfg["warmup_steps"]) or cfg["warmup_steps"] < 0:
        raise ValueError(
            f"config.optim.warmup_steps must be an integer >= 0, got {cfg['warmup_steps']!r}"
        )
    if not is_int(cfg["grad_accum_steps"]) or cfg["grad_accum_steps"] < 1:
        raise ValueError(
            f"config.optim.grad_accum_steps must be an integer >= 1, got {cfg['grad_accum_steps']!r}"
        )
    boundaries = cfg["step_boundaries"]
    if boundaries is None:
        boundaries = ()
    if isinstance(boundaries, (str, bytes)) or not hasattr(boundaries, "__iter__"):
        raise ValueError(
            f"config.optim.step_boundaries must be a sequence of step numbers, got {boundaries!r}"
        )
    boundaries = tuple(boundaries)
    if not all(is_int(b) for b in boundaries):
        raise ValueError(f"config.optim.step_boundaries must hold integers, got {boundaries!r}")
    cfg["step_boundaries"] = tuple(int(b) for b in boundaries)
    return cfg


# ---------------------------------------------------------------------------------------------------
# schedule


def make_lr_schedule(optim_config, *, total_steps: int, global_batch_size: int) -> Callable:
    """``step -> lr`` (backbone lr) for ``step`` counted in optimizer updates; see the module docstring.

    Raises ValueError for ``warmup_steps >= total_steps`` and for step boundaries that are not strictly
    increasing inside ``(0, total_steps)`` (or missing for ``schedule="step"``).
    """
    return _schedule(_read_config(optim_config), total_steps, global_batch_size)


def _schedule(cfg: dict, total_steps, global_batch_size) -> Callable:
    total = check_positive_int(total_steps, "total_steps", "make_optimizer")
    batch = check_positive_int(global_batch_size, "global_batch_size", "make_optimizer")
    warmup = cfg["warmup_steps"]
    if warmup >= total:
        raise ValueError(
            f"config.optim.warmup_steps={warmup} must be smaller than total_steps={total} (the decay would be empty)"
        )
    base = (
        cfg["lr"]
        if cfg["lr_batch_reference"] is None
        else cfg["lr"] * batch / cfg["lr_batch_reference"]
    )
    decay_steps = total - warmup  # upstream: total = (epochs - warmup_epochs) * iters
    name = cfg["schedule"]
    if name == "poly":
        main = optax.polynomial_schedule(base, 0.0, cfg["poly_power"], decay_steps)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(base, decay_steps, alpha=0.0)
    elif name == "step":
        boundaries = cfg["step_boundaries"]
        if not boundaries:
            raise ValueError("config.optim.step_boundaries must be non-empty for schedule='step'")
        if any(b <= 0 or b >= total for b in boundaries) or any(
            a >= b for a, b in zip(boundaries, boundaries[1:])
        ):
            raise ValueError(
                f"config.optim.step_boundaries={boundaries} must be strictly increasing steps inside (0, "
                f"total_steps={total})"
            )
        # The joined schedule sees step - warmup, so shift the absolute boundaries. A boundary inside the
        # warmup (shifted <= 0) is already passed when the warmup ends, as upstream's epoch // lr_step.
        # piecewise_constant_schedule scales once count >= boundary.
        main = optax.piecewise_constant_schedule(
            base, {b - warmup: cfg["step_gamma"] for b in boundaries}
        )
    else:  # constant
        main = optax.constant_schedule(base)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


# ---------------------------------------------------------------------------------------------------
# parameter groups


def _ndim(x) -> int:
    return len(x.shape) if hasattr(x, "shape") else int(np.ndim(x))


def weight_decay_mask(params):
    """``True`` where weight decay applies under ``no_bn_wd``: every leaf with ``ndim > 1``.

    Excludes norm ``scale``/``bias``, conv/dense biases and any other vector or scalar parameter.
    Works on arrays and ``jax.ShapeDtypeStruct`` leaves and on the masked trees optax passes around.
    """
    return jax.tree.map(lambda x: _ndim(x) > 1, params)


def _top_key(path) -> Any:
    return getattr(path[0], "key", None) if path else None


def param_labels(params, backbone_prefix: str = "pretrained"):
    """Same tree as ``params`` with ``"backbone"`` or ``"head"`` per leaf (the lr groups).

    ``"backbone"`` for leaves under the top-level key ``backbone_prefix``; ``"head"`` for every other
    top-level key. Without a top-level ``backbone_prefix`` key, every leaf is ``"backbone"``.
    """
    has_backbone = isinstance(params, Mapping) and backbone_prefix in params
    if not has_backbone:
        return jax.tree.map(lambda _: "backbone", params)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "backbone" if _top_key(path) == backbone_prefix else "head", params
    )


# ---------------------------------------------------------------------------------------------------
# optimizer


def _update_rule(cfg, learning_rate) -> optax.GradientTransformation:
    mask = weight_decay_mask if cfg["no_bn_wd"] else None
    wd = cfg["weight_decay"]
    if cfg["name"] == "adamw":
        return optax.adamw(
            learning_rate, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=wd, mask=mask
        )
    # torch.optim.SGD: d_p = g + wd*p; buf = m*buf + d_p; d_p = d_p + m*buf (nesterov) or buf; p -= lr*d_p
    momentum = cfg["momentum"] if cfg["momentum"] > 0 else None
    parts = [optax.add_decayed_weights(wd, mask=mask)] if wd > 0 else []
    parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=cfg["nesterov"]))
    return optax.chain(*parts)


def make_optimizer(optim_config, *, params, total_steps: int, global_batch_size: int):
    """Build the optax optimizer for ``config.optim`` (see the module docstring).

    Args:
      optim_config: ``config.optim`` (ConfigDict or mapping); missing keys take :data:`DEFAULTS`,
        unknown keys raise KeyError, invalid values ValueError naming the key.
      params: the ``params`` collection (arrays or ``jax.ShapeDtypeStruct``); its top-level keys
        decide the lr groups.
      total_steps: optimizer updates of the run (micro-steps / grad_accum_steps).
      global_batch_size: examples per update across all processes, for lr scaling.
    Returns:
      ``(tx, lr_schedule)``: an ``optax.GradientTransformation`` and ``step -> backbone lr``.
    """
    cfg = _read_config(optim_config)
    if isinstance(params, Mapping) and ("batch_stats" in params or set(params) == {"params"}):
        raise ValueError(
            f"make_optimizer: params must be the 'params' collection (variables['params']), got a variables "
            f"dict with top-level keys {sorted(params)}"
        )
    schedule = _schedule(cfg, total_steps, global_batch_size)
    mult = cfg["head_lr_mult"]
    head_schedule = (lambda step: mult * schedule(step)) if mult != 1.0 else schedule
    prefix = cfg["backbone_prefix"]
    tx = optax.multi_transform(
        {"backbone": _update_rule(cfg, schedule), "head": _update_rule(cfg, head_schedule)},
        lambda tree: param_labels(tree, prefix),
    )
    if cfg["clip_grad_norm"] is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg["clip_grad_norm"]), tx)
    if cfg["grad_accum_steps"] > 1:
        tx = optax.MultiSteps(
            tx, every_k_schedule=cfg["grad_accum_steps"]
        ).gradient_transformation()
    return tx, schedule


def update_applied(opt_state) -> jax.Array | bool:
    """Whether the update just computed moved the weights: always, except on the accumulation
    micro-steps of ``optax.MultiSteps`` (its ``mini_step`` is back at 0 right after an update)."""
    if isinstance(opt_state, optax.MultiStepsState):
        return opt_state.mini_step == 0
    return True


def ema_update(ema_params, params, decay):
    """Exponential moving average of weights: ``ema·decay + params·(1 − decay)`` leaf by leaf.

    A pure jax function (jit-able; ``decay`` may be a traced scalar). ``decay=1`` keeps ``ema_params``,
    ``decay=0`` copies ``params``.
    """
    if _is_real(decay) and not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"ema_update: decay must be in [0, 1], got {decay!r}")
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
