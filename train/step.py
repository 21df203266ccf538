"""The data-parallel train and eval steps: ``jax.shard_map`` over the ``data`` axis of a 1-D mesh.

State is replicated (``P()``), the batch split along its first axis (``P("data")``). The loss is
(local sum) / (global count) (:mod:`train.tasks`), so the ``psum`` of local gradients is the
global-batch gradient. ``sync_bn`` synchronises every jaxenc BatchNorm over ``data`` (what one
device would compute on the whole batch); without it each device normalises with its own statistics
(upstream's DataParallel BatchNorm) and the running statistics are averaged after the step.
Dropout draws from ``fold_in(fold_in(seed_key, step), device)``, so masks depend on the device
layout; ``disable_dropout`` makes every ``flax.linen.Dropout`` deterministic.

Shapes: batch["image"] (B, H, W, 3) float; batch["mask"] (B, H, W) int or batch["label"] (B,) int;
B divisible by the mesh size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxenc import metrics
from jaxenc.compiler_options import compiler_options
from jaxenc.nn.norm import batchnorm_axis_override
from train import optim, tasks

AXIS = "data"

__all__ = [
    "AXIS",
    "StepConfig",
    "TrainState",
    "make_eval_step",
    "make_gradient_step",
    "make_mesh",
    "make_train_step",
    "shard_batch",
]


class TrainState(flax.struct.PyTreeNode):
    """Everything a resumed run needs besides the input position: a pytree of arrays.

    ``rng`` is the raw key data (uint32) of the run's base key, so orbax can store it.
    ``ema_params`` is an empty dict when no weight EMA is kept.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the steps need to know about the task (from the config)."""

    task: str  # "segmentation" | "recognition"
    num_classes: int
    aux: bool = False
    se_loss: bool = False
    aux_weight: float = 0.2
    se_weight: float = 0.2
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    sync_bn: bool = True
    ema_decay: float | None = None
    grad_accum_steps: int = 1
    disable_dropout: bool = False


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over all devices, in process-major order (Auto axis types: with
    jax.make_mesh's default Explicit axes shard_map rejects unsharded inputs), so process p's local
    rows land on its own devices."""
    devices = jax.devices() if devices is None else devices
    order = sorted(devices, key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.asarray(order), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays split over ``data``."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


@contextlib.contextmanager
def _deterministic_dropout(enabled: bool):
    if not enabled:
        yield
        return

    def force(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            kwargs = {**kwargs, "deterministic": True}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(force):
        yield


def _norm_context(sync: bool):
    return batchnorm_axis_override(AXIS) if sync else contextlib.nullcontext()


def _global_counts(cfg: StepConfig, batch) -> dict[str, jax.Array]:
    if cfg.task == "segmentation":
        local = tasks.segmentation_counts(batch["mask"], cfg.num_classes)
    else:
        local = tasks.recognition_counts(batch["label"])
    return jax.lax.psum(local, AXIS)


def _loss_terms(cfg: StepConfig, outputs, targets):
    if cfg.task == "segmentation":
        return tasks.segmentation_terms(
            outputs,
            targets,
            nclass=cfg.num_classes,
            aux=cfg.aux,
            se_loss=cfg.se_loss,
            aux_weight=cfg.aux_weight,
            se_weight=cfg.se_weight,
        )
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return tasks.recognition_terms(logits, targets, label_smoothing=cfg.label_smoothing)


def _local_gradients(model: nn.Module, cfg: StepConfig, state: TrainState, batch):
    """Inside the map: (global-batch loss parts, summed gradients, new BN statistics)."""
    key = jax.random.fold_in(
        jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
        jax.lax.axis_index(AXIS),
    )
    k_drop, k_mix = jax.random.split(key)
    images = batch["image"]
    targets = batch["mask"] if cfg.task == "segmentation" else batch["label"]
    counts = _global_counts(cfg, batch)
    if cfg.task == "recognition" and cfg.mixup_alpha > 0.0:
        images, targets = tasks.mixup(images, targets, cfg.num_classes, cfg.mixup_alpha, k_mix)

    def loss_fn(params):
        with _norm_context(cfg.sync_bn), _deterministic_dropout(cfg.disable_dropout):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": k_drop},
            )
        loss, parts = tasks.total_loss(_loss_terms(cfg, outputs, targets), counts)
        return loss, (parts, updates["batch_stats"])

    (_, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.psum(grads, AXIS)
    parts = jax.lax.psum(parts, AXIS)
    # Synchronised statistics are already identical; per-device ones are averaged (flax imagenet).
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    return parts, grads, batch_stats


def _compiler_options(model: nn.Module, mesh, *, differentiated: bool) -> dict:
    """jaxenc's XLA options for the mesh's backend; a differentiated program of a model built with
    remat also keeps its rematerialisation barriers (forward-only programs recompute nothing)."""
    remat = differentiated and getattr(model, "remat", "none") != "none"
    return compiler_options(mesh.devices.flat[0].platform, remat=remat)


def make_gradient_step(model: nn.Module, cfg: StepConfig, mesh):
    """jit(shard_map): (state, batch) -> (loss parts, gradients, new batch_stats), the first half of
    :func:`make_train_step` (no update); the same numbers on any device count, for checks."""

    def step(state: TrainState, batch):
        return _local_gradients(model, cfg, state, batch)

    return jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False),
        compiler_options=_compiler_options(model, mesh, differentiated=True),
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    mesh,
    lr_schedule: Callable | None = None,
):
    """jit(shard_map(step)): (state, batch) -> (state, metrics) with global-batch loss terms, grad
    norm and lr. ``state`` replicated, ``batch`` split over ``data``."""

    def step(state: TrainState, batch):
        parts, grads, batch_stats = _local_gradients(model, cfg, state, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if cfg.ema_decay is not None:
            # With gradient accumulation the weights move once per k micro-steps; so does the average.
            applied = optim.update_applied(opt_state)
            ema = jax.tree.map(
                lambda new, old: jnp.where(applied, new, old),
                optim.ema_update(ema, params, cfg.ema_decay),
                ema,
            )
        out = {
            "loss": sum(parts.values()),
            "grad_norm": optax.tree.norm(grads),
            **{f"loss_{k}": v for k, v in parts.items()},
        }
        if lr_schedule is not None:
            # The schedule counts optimizer updates, i.e. micro-steps // grad_accum_steps.
            out["lr"] = jnp.asarray(lr_schedule(state.step // cfg.grad_accum_steps), jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema,
        )
        return new_state, out

    mapped = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(
        mapped,
        donate_argnums=(0,),
        compiler_options=_compiler_options(model, mesh, differentiated=True),
    )


def make_eval_step(model: nn.Module, cfg: StepConfig, mesh):
    """jit(shard_map): (variables, batch) -> (global metric counts, predictions split over ``data``).

    batch carries a boolean "valid" (B,) marking real (not padding) examples. Segmentation counts:
    correct, labeled (pixel accuracy) and per-class intersection / prediction / label areas;
    recognition: top-1 / top-5 correct and the number of examples.
    """

    def step(variables, batch):
        outputs = model.apply(variables, batch["image"], train=False)
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        valid = batch["valid"]
        preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if cfg.task == "segmentation":
            counts = metrics.segmentation_counts(preds, batch["mask"], cfg.num_classes, valid=valid)
        else:
            topk = metrics.topk_correct(
                logits, batch["label"], ks=(1, min(5, cfg.num_classes)), valid=valid
            )
            counts = {f"top{k}": v for k, v in topk.items()}
            counts["examples"] = jnp.sum(valid).astype(jnp.int32)
        return jax.lax.psum(counts, AXIS), preds

    mapped = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P(AXIS)), check_vma=False
    )
    return jax.jit(mapped, compiler_options=_compiler_options(model, mesh, differentiated=False))
