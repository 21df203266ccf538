"""``train_and_evaluate(config, workdir)``: the whole training job as one pure function.

Shape of flax's examples/imagenet and big_vision: the config says
everything, the workdir holds everything the run produces:

    workdir/config.json         the run's config (a restart with an incompatible one is refused)
    workdir/checkpoints/        periodic orbax checkpoints (state + input position), keep-N
    workdir/best/               the checkpoint with the best ``train.best_metric``
    workdir/metrics.jsonl       one JSON line per train log / evaluation
    workdir/tb/                 TensorBoard event files
    workdir/summary.json        end-of-run summary
    workdir/samples.png         segmentation: image | ground truth | prediction for held-out images

A run resumes from its latest checkpoint (model, optimizer, step, rng and the input iterator), so a
killed run continued with the same command ends with the same parameters as an uninterrupted one.
SIGTERM / SIGINT save a checkpoint and stop cleanly. A non-finite loss stops the run without saving
and names the step and the last good checkpoint. A file the input cannot read follows
``config.input.bad_examples`` (``train.data.bad_examples``): "error" stops with one line naming it,
"skip" replaces it and counts it: ``skipped_examples`` in the metrics rows (train: running total
over the run, resumes included, through the checkpoints; eval: that pass) and in summary.json.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxenc import metrics as jmetrics
from jaxenc import models
from jaxenc.models import segmentation as seg_models
from train import checkpoint, compile_cache, observe, optim, run_config, shutdown
from train.data import bad_examples, pipeline
from train.step import (
    StepConfig,
    TrainState,
    make_eval_step,
    make_mesh,
    make_train_step,
    shard_batch,
)

__all__ = [
    "build_model",
    "evaluate",
    "initialize_distributed",
    "load_backbone",
    "train_and_evaluate",
]

_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
_TASKS = ("segmentation", "recognition")
_NORMS = ("sync_bn", "bn")


def initialize_distributed(dist: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` when ``config.distributed.initialize`` is set (explicit
    coordinator / process count / id, or jax's own cluster auto-detection when they are None), or
    when the environment names a coordinator (``JAX_COORDINATOR_ADDRESS``). Must run before any
    other JAX computation."""
    env_coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (dist.initialize or env_coordinator):
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if dist.coordinator_address or env_coordinator:
        kwargs["coordinator_address"] = dist.coordinator_address or env_coordinator
    if dist.num_processes is not None:
        kwargs["num_processes"] = dist.num_processes
    elif "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if dist.process_id is not None:
        kwargs["process_id"] = dist.process_id
    elif "JAX_PROCESS_ID" in os.environ:
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


def _validate(config: ml_collections.ConfigDict, n_devices: int, n_processes: int) -> None:
    if config.task not in _TASKS:
        raise ValueError(f"config.task must be one of {_TASKS}, got {config.task!r}")
    if config.model.norm not in _NORMS:
        raise ValueError(f"config.model.norm must be one of {_NORMS}, got {config.model.norm!r}")
    if config.model.dtype not in _DTYPES:
        raise ValueError(
            f"config.model.dtype must be one of {tuple(_DTYPES)}, got {config.model.dtype!r}"
        )
    for key in ("global_batch_size", "eval_batch_size"):
        size = config.input[key]
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"config.input.{key} must be a positive int, got {size!r}")
        if size % n_devices:
            raise ValueError(
                f"config.input.{key}={size} is not divisible by the number of devices ({n_devices}"
                f"{f' over {n_processes} processes' if n_processes > 1 else ''}); use a multiple of {n_devices}"
            )
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = config.train[key]
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.train.{key} must be a positive int, got {value!r}")
    bad_examples.check_policy(_bad_examples(config))


def _bad_examples(config) -> str:
    # .get: a config.json of a run started before the key existed lacks it.
    return config.input.get("bad_examples", "error")


def _global_sum(value: int) -> int:
    """``value`` summed over processes (a collective: every process calls it at the same point)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int32))))


@contextlib.contextmanager
def _closed_at_exit(iterator):
    try:
        yield iterator
    finally:
        close = getattr(iterator, "close", None)  # grain's iterators have it; stand-ins may not
        if close is not None:
            close()


def build_model(config: ml_collections.ConfigDict):
    """The Flax model named by ``config.model`` for ``config.task`` (without weights)."""
    kwargs = (
        config.model.kwargs.to_dict()
        if isinstance(config.model.kwargs, ml_collections.ConfigDict)
        else dict(config.model.kwargs)
    )
    kwargs["dtype"] = _DTYPES[config.model.dtype]
    # Rematerialisation ("none" | "block"): recompute block internals in the backward pass to save memory.
    kwargs["remat"] = config.model.get("remat", "none")
    if config.task == "segmentation":
        # The dataset name matters only where upstream derives an option from it (EncNet's lateral
        # fusion for datasets whose name starts with 'p'); the class count always comes from the config.
        return models.get_segmentation_model(
            config.model.name,
            dataset=config.dataset.name,
            backbone=config.model.backbone,
            nclass=config.dataset.num_classes,
            **kwargs,
        )
    return models.get_model(config.model.name, num_classes=config.dataset.num_classes, **kwargs)


def _step_config(config, model) -> StepConfig:
    return StepConfig(
        task=config.task,
        num_classes=config.dataset.num_classes,
        aux=bool(getattr(model, "aux", False)),
        se_loss=bool(getattr(model, "se_loss", False)),
        aux_weight=config.loss.aux_weight,
        se_weight=config.loss.se_weight,
        label_smoothing=config.loss.label_smoothing,
        mixup_alpha=config.loss.mixup_alpha,
        sync_bn=config.model.norm == "sync_bn",
        ema_decay=config.optim.ema_decay,
        grad_accum_steps=config.optim.grad_accum_steps,
        disable_dropout=config.model.disable_dropout,
    )


def _transform(config, train: bool):
    return pipeline.transform_from_config(
        config.input, task=config.task, image_size=config.dataset.image_size, train=train
    )


def _replicated(mesh):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _init_variables(model, config, sample_image: np.ndarray, mesh) -> dict:
    """The model's initial variables, replicated over the mesh."""
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return jax.device_put(models.init_variables(model, key, sample_image), _replicated(mesh))


def _init_state(variables: dict, config, tx, mesh) -> TrainState:
    """Step 0: the variables, a fresh optimizer state, the EMA copy (if any) and the run's key."""

    @jax.jit
    def init():
        params = variables["params"]
        ema = jax.tree.map(jnp.copy, params) if config.optim.ema_decay is not None else {}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            ema_params=ema,
            rng=jax.random.key_data(jax.random.key(config.seed)),
        )

    return jax.device_put(init(), _replicated(mesh))


def _eval_variables(state: TrainState) -> dict:
    params = state.ema_params if state.ema_params else state.params
    return {"params": params, "batch_stats": state.batch_stats}


def evaluate(
    eval_step, state: TrainState, batches, mesh, config, *, samples: int = 0
) -> tuple[dict, list, int]:
    """One pass over the held-out split: dataset-accumulated metrics (sums over the split, as upstream),
    for segmentation up to ``samples`` (image, mask, prediction) triples from this process's rows,
    and the number of bad examples the pass skipped (all processes; 0 unless
    ``config.input.bad_examples="skip"``)."""
    variables = _eval_variables(state)
    seg = config.task == "segmentation"
    metric = jmetrics.SegmentationMetric(config.dataset.num_classes) if seg else None
    top = {}
    kept = []
    skipped = 0
    for local in batches:
        skipped += bad_examples.pop_skipped(local)
        counts, preds = eval_step(variables, shard_batch(mesh, local))
        counts = jax.tree.map(np.asarray, counts)
        if seg:
            metric.update(**counts)
            if len(kept) < samples:
                local_preds = np.concatenate([np.asarray(s.data) for s in preds.addressable_shards])
                for i in np.flatnonzero(local["valid"])[: samples - len(kept)]:
                    kept.append((local["image"][i], local["mask"][i], local_preds[i]))
        else:
            for k, v in counts.items():
                top[k] = top.get(k, 0) + int(v)
    skipped = _global_sum(skipped)
    if seg:
        result = metric.result()
        return (
            {
                "pixAcc": float(result["pixAcc"]),
                "mIoU": float(result["mIoU"]),
                "IoU": [float(v) for v in result["IoU"]],
            },
            kept,
            skipped,
        )
    n = max(top.pop("examples"), 1)
    return {k: v / n for k, v in top.items()}, kept, skipped


def load_backbone(
    config: ml_collections.ConfigDict, params: dict, batch_stats: dict
) -> tuple[dict, dict]:
    """ImageNet weights for a segmentation model's backbone (upstream BaseNet's ``pretrained=True``,
    done explicitly): ``config.model.backbone_pretrained`` is a model-store name (e.g. ``"resnest50"``,
    read from the local cache, never downloaded) or a file (upstream ``.pth`` / ``.zip`` or a native
    ``.msgpack`` of the classifier). A state_dict is converted for the backbone
    ``config.model.backbone`` (with ``config.model.kwargs.backbone_kwargs``); the classifier ``fc`` is
    dropped; the variables replace ``params["pretrained"]`` / ``batch_stats["pretrained"]``. Returns
    the new (params, batch_stats); the rest of the model keeps its initialisation.

    Raises ValueError when the file's backbone does not fit the model's (naming the differing leaves).
    """
    spec = config.model.backbone_pretrained
    if "pretrained" not in params:
        raise ValueError(
            f"config.model.backbone_pretrained={spec!r}: model {config.model.name!r} has no "
            "'pretrained' backbone submodule (it applies to segmentation models)"
        )
    kwargs = dict(config.model.kwargs.get("backbone_kwargs", None) or {})
    # A store name converts with its registered classifier; a torch file with the configured backbone.
    backbone = (
        None
        if spec in models.pretrained_model_list()
        else seg_models.get_backbone(config.model.backbone, **kwargs)
    )
    try:
        loaded = models.load_weights(
            spec,
            {"params": params, "batch_stats": batch_stats},
            subtree="pretrained",
            model=backbone,
            example_input=np.zeros((1, 64, 64, 3), np.float32),  # traced for shapes only
        )
    except ValueError as err:
        raise ValueError(
            f"config.model.backbone_pretrained={spec!r} does not fit the backbone of "
            f"{config.model.name}_{config.model.backbone} with {kwargs}: {err}"
        ) from None
    return loaded["params"], loaded["batch_stats"]


def _restore_or_start(ckpt, state, train_iter, config, model, example) -> tuple[TrainState, dict]:
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        restored, data_state, meta = ckpt.restore(latest, abstract_state=abstract)
        if data_state is not None:
            train_iter.set_state(data_state)
        return restored, dict(meta or {}, resumed_from=latest)
    if config.model.get("backbone_pretrained"):
        params, batch_stats = load_backbone(config, state.params, state.batch_stats)
        state = state.replace(params=params, batch_stats=batch_stats)
    for source, converted_for in (
        (config.model.pretrained, model),  # a whole-model file (upstream .pth or .msgpack)
        (config.train.finetune_from, None),  # a checkpoint of this trainer or a .msgpack
    ):
        if source:
            target = {"params": state.params, "batch_stats": state.batch_stats}
            variables = models.load_weights(
                source, target, model=converted_for, example_input=example
            )
            state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    return state, {}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming when it holds a checkpoint); returns the final
    metrics (held-out evaluation of the last step) plus the best metric and its step."""
    initialize_distributed(config.distributed)
    workdir = Path(workdir)
    compile_cache.enable_compile_cache(config.train.compile_cache, workdir)
    mesh = make_mesh()
    n_proc, p_idx = jax.process_count(), jax.process_index()
    _validate(config, mesh.size, n_proc)
    is_main = p_idx == 0
    config_note = run_config.check_config(
        workdir, config, allow_change=config.train.allow_config_change, write=is_main
    )

    model = build_model(config)
    cfg = _step_config(config, model)
    train_src = pipeline.get_source(config.dataset, "train")
    val_src = pipeline.get_source(config.dataset, "validation")
    train_iter = pipeline.train_iterator(
        train_src,
        global_batch_size=config.input.global_batch_size,
        seed=config.seed,
        process_index=p_idx,
        process_count=n_proc,
        transform=_transform(config, True),
        worker_count=config.input.worker_count,
        bad_examples=_bad_examples(config),
    )
    size = config.dataset.image_size
    example = np.zeros((1, size, size, 3), np.float32)
    num_steps = config.train.num_steps
    variables = _init_variables(model, config, example, mesh)
    tx, lr_schedule = optim.make_optimizer(
        config.optim,
        params=variables["params"],
        total_steps=max(num_steps // config.optim.grad_accum_steps, 1),
        global_batch_size=config.input.global_batch_size * config.optim.grad_accum_steps,
    )
    state = _init_state(variables, config, tx, mesh)

    ckpt = checkpoint.Checkpointer(
        workdir,
        keep=config.train.keep_checkpoints,
        best_metric=config.train.best_metric,
        best_mode="max",
    )
    state, meta = _restore_or_start(ckpt, state, train_iter, config, model, example)
    start = int(state.step)
    best = meta.get("best", {"value": None, "step": None})
    train_step = make_train_step(model, tx, cfg, mesh, lr_schedule)
    eval_step = make_eval_step(model, cfg, mesh)

    def eval_batches():
        return pipeline.eval_batches(
            val_src,
            batch_size=config.input.eval_batch_size,
            process_index=p_idx,
            process_count=n_proc,
            transform=_transform(config, False),
            bad_examples=_bad_examples(config),
        )

    last_eval: dict = {}
    samples: list = []
    t0 = time.time()
    with (
        _closed_at_exit(train_iter),  # grain workers and their shared memory, on errors too
        ckpt,
        shutdown.GracefulShutdown() as stop,
        observe.Observer(
            workdir,
            total_steps=num_steps,
            start_step=start,
            is_main=is_main,
            best_metric=config.train.best_metric,
        ) as obs,
    ):
        if config_note:
            obs.log_text(config_note)
        if start:
            obs.log_text(f"resumed from step {start} ({workdir / 'checkpoints'})")
        # The loop never waits for the device without need. Metrics stay on the device: ``pending``
        # holds the per-step metric dicts (device arrays) of the steps not yet fetched, and
        # ``flush()`` fetches them with one ``device_get`` only before a log, an eval, a checkpoint
        # (periodic, best or shutdown) and at the end; so a state after a non-finite loss is never
        # evaluated or saved, and the error still names the first bad step. The next batch is read
        # and put on the device while the current step runs; ``data_state`` is the input position
        # captured before that read (the batches the steps in ``state`` consumed), which is what a
        # checkpoint of ``state`` stores.
        sums: dict[str, float] = {}
        n_logged = 0
        step = start
        pending: list[dict] = []
        prev_out = None
        # Bad training examples skipped: all processes' before this start (checkpoint meta) plus
        # this process's since; ``batch_skipped`` is the count in the batch in hand.
        skipped_before, skipped_here = int(meta.get("skipped_examples", 0)), 0
        eval_skipped = 0

        def read_batch():
            local = next(train_iter)
            n_skipped = bad_examples.pop_skipped(local)
            return shard_batch(mesh, local), n_skipped

        def train_skipped() -> int:
            return skipped_before + _global_sum(skipped_here)

        def flush():
            nonlocal pending, n_logged
            if not pending:
                return
            first, fetched, pending = step - len(pending) + 1, jax.device_get(pending), []
            for i, fetched_out in enumerate(fetched):
                values = {k: float(v) for k, v in fetched_out.items()}
                if not math.isfinite(values["loss"]):
                    ckpt.wait()  # the last good checkpoint may still be being written
                    good = ckpt.latest_step()
                    where = (
                        f"step {good} in {workdir / 'checkpoints'}"
                        if good is not None
                        else "none (no checkpoint was written yet)"
                    )
                    raise FloatingPointError(
                        f"non-finite loss ({values['loss']}) at step {first + i}; training stopped without saving. "
                        f"The last good checkpoint is {where}. "
                        "Lower config.optim.lr, set config.optim.clip_grad_norm, or check the input data."
                    )
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_logged += 1

        batch, batch_skipped = read_batch() if step < num_steps else (None, 0)
        while step < num_steps:
            state, out = train_step(state, batch)  # dispatched asynchronously
            step += 1
            skipped_here += batch_skipped
            pending.append(out)
            data_state = train_iter.get_state()
            # overlaps this step
            batch, batch_skipped = read_batch() if step < num_steps else (None, 0)
            # Bound how far the host runs ahead (device memory for queued batches): wait for the previous
            # step only; this one is queued, so the device stays busy.
            if prev_out is not None:
                jax.block_until_ready(prev_out)
            prev_out = out
            if step % config.train.log_every == 0 or step == num_steps:
                flush()
                obs.log_train(
                    step,
                    {k: v / n_logged for k, v in sums.items()},
                    examples=n_logged * config.input.global_batch_size,
                    counts={"skipped_examples": train_skipped()},
                )
                sums, n_logged = {}, 0
            if step % config.train.eval_every == 0 or step == num_steps:
                flush()
                with obs.paused():
                    want = config.train.sample_predictions if step == num_steps else 0
                    try:
                        last_eval, kept, eval_skipped = evaluate(
                            eval_step, state, eval_batches(), mesh, config, samples=want
                        )
                    except bad_examples.BadExampleError as err:
                        raise err.during(f"in the evaluation at step {step}") from None
                    samples = kept or samples
                    obs.log_eval(step, last_eval, counts={"skipped_examples": eval_skipped})
                    value = last_eval.get(config.train.best_metric)
                    if value is not None and (best["value"] is None or value > best["value"]):
                        best = {"value": value, "step": step}
                        ckpt.save_best(
                            step,
                            state=state,
                            data_state=None,
                            meta={"best": best, "skipped_examples": train_skipped()},
                            metrics={config.train.best_metric: value},
                        )
            # A collective: every process sees the same answer, so all of them save (or none does).
            stopping = stop.should_stop()
            if step % config.train.checkpoint_every == 0 or step == num_steps or stopping:
                flush()
                meta_now = {"best": best, "skipped_examples": train_skipped()}
                with obs.paused():
                    ckpt.save(step, state=state, data_state=data_state, meta=meta_now, force=True)
            if stopping:
                ckpt.wait()
                obs.log_text(f"{stop.signal_name}: saved a checkpoint at step {step} and stopped")
                break
        ckpt.wait()
        skipped = {"train": train_skipped(), "eval": eval_skipped}
        result = {
            "step": step,
            **{k: v for k, v in last_eval.items() if not isinstance(v, list)},
            "best_metric": config.train.best_metric,
            "best_value": best["value"],
            "best_step": best["step"],
            "stopped_early": step < num_steps,
            "wall_time_s": time.time() - t0,
        }
        if is_main and samples and config.task == "segmentation":
            images, masks, preds = (np.stack(x) for x in zip(*samples))
            observe.save_segmentation_samples(
                workdir / "samples.png",
                images,
                masks,
                preds,
                palette=pipeline.palette(config.dataset),
                mean=tuple(config.input.mean),
                std=tuple(config.input.std),
            )
        if step == num_steps:
            obs.summary(result, config_name=config.name, skipped_examples=skipped)
    return {**result, "skipped_examples": skipped}
