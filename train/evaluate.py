"""Upstream's segmentation test protocol on a trainer checkpoint: ``python -m train.evaluate``.

    python -m train.evaluate --config configs/<recipe>.py --checkpoint runs/<name> [--outdir DIR]
        [--use_best] [--config.eval.scales='(0.75,1.0,1.25)'] [--mode single_scale] ...

PyTorch-Encoding reports its segmentation numbers from ``experiments/segmentation/test.py --eval``
(upstream ``experiments/segmentation/test.py``): every validation image at full size ("testval"), multi-scale +
flip + sliding window (:mod:`jaxenc.models.multi_eval`), pixAcc / mIoU accumulated over the whole
dataset (not averaged per image, :class:`jaxenc.metrics.SegmentationMetric`). The trainer's own held-out evaluation
is a quick single-pass check at ``config.dataset.image_size``; this script gives the reportable numbers.

Settings come from ``config.eval`` (every key optional; the defaults in brackets):

* ``mode`` ["multi_scale"]: ``"multi_scale"`` = ``scales`` with ``flip``; ``"single_scale"`` =
  scale 1.0 only, no flip (``scales``/``flip`` ignored; for single scale + flip use multi_scale with
  ``scales=(1.0,)``).
* ``scales`` [(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)], ``flip`` [True].
* ``base_size`` [``config.input.base_size``, else 520]: the long side at scale 1.0.
* ``crop_size`` [``config.dataset.image_size``]: the window (the training crop).
* ``split`` ["validation"], ``num_images`` [0 = all].
* ``save_predictions`` [8]: the first N images get ``predictions/NNNNN.png`` (image | ground truth |
  prediction, dataset palette) and ``predictions/NNNNN_pred.png`` (the prediction alone, a palette PNG).
* ``batch_size`` [8]: windows per forward pass, rounded up to a multiple of the local device count.

The command-line flags ``--mode --scales --flip --base_size --crop_size --split --num_images
--save_predictions --batch_size`` override those keys (and work for configs without an ``eval``
section, where ``--config.eval.*`` cannot). Weights: ``params`` / ``batch_stats`` (``ema_params``
when ``config.optim.ema_decay`` is set, as the trainer evaluates) of the latest checkpoint in
``workdir/checkpoints``, or of ``workdir/best`` with ``--use_best`` or when ``--checkpoint`` names a
``best`` directory or a step directory. Output (``--outdir``, default ``<workdir>/eval``):
``eval_metrics.json`` (pixAcc, mIoU, per-class IoU and names, mode, scales, flip, sizes, number of
images, checkpoint path and step) and the PNGs; a per-class IoU table is printed.

Recognition configs: single-crop top-1 / top-5 over the split with the config's validation transform
(upstream's ``verify.py``); ``eval_metrics.json`` holds them.

Published weights: ``--checkpoint`` may also be a model-store name (``deeplab_resnest50_ade``, read
from the local cache, see ``jaxenc.models.load_pretrained``) or a weights file (an upstream
``.pth``/``.zip`` or a native ``.msgpack``) for the config's model; the output then defaults to
``eval/<name>``. This is how the published PyTorch-Encoding numbers are checked (README, Recipes).

Images are normalised here from the source's uint8 pixels as the input pipeline does,
``(x * (1/255) - mean) / std`` in float32 with ``config.input.mean/std``, at full size.

Multi-process (``config.distributed`` / ``JAX_COORDINATOR_ADDRESS``, as the trainer): process ``p``
of ``P`` evaluates images ``i ≡ p (mod P)`` on its own local devices; the integer counts are
all-gathered and summed exactly (int64), so the metrics do not depend on the process count.
Process 0 prints and writes the JSON; each process writes the PNGs of its own images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxenc import metrics as jmetrics
from jaxenc.models import multi_eval
from jaxenc.validation import is_int
from train.data import arrays, augment, bad_examples
from train.inference import (
    MODES,
    class_names,
    config_get,
    enable_compile_cache,
    flag_overrides,
    input_stats,
    label_image,
    label_palette,
    load_model,
    resolve_checkpoint,
    segmentation_evaluator,
)

__all__ = ["EvalSettings", "eval_settings", "evaluate_checkpoint", "resolve_checkpoint"]

METRICS_FILE = "eval_metrics.json"
PREDICTIONS_DIR = "predictions"
_DEFAULT_BASE_SIZE = 520
_DEFAULT_BATCH = 8
_DEFAULT_SAVE = 8
_SETTING_KEYS = (
    "mode",
    "scales",
    "flip",
    "base_size",
    "crop_size",
    "split",
    "num_images",
    "save_predictions",
    "batch_size",
)


# ---------------------------------------------------------------------------------------------------
# settings


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The resolved ``config.eval`` (see the module docstring)."""

    mode: str
    scales: tuple[float, ...]
    flip: bool
    base_size: int
    crop_size: int
    split: str
    num_images: int
    save_predictions: int
    batch_size: int


def _int_setting(value, key: str, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"config.eval.{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def eval_settings(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None = None
) -> EvalSettings:
    """``config.eval`` with its defaults filled in; ``overrides`` (keys as in ``config.eval``, None =
    not given) take precedence. Raises ValueError naming the key for a bad value."""
    section = config_get(config, "eval")
    given = {k: config_get(section, k) for k in _SETTING_KEYS}
    unknown = sorted(set(overrides or {}) - set(_SETTING_KEYS))
    if unknown:
        raise KeyError(
            f"eval_settings: unknown override(s) {unknown}; known keys: {list(_SETTING_KEYS)}"
        )
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if section is not None:
        extra = sorted(set(section.keys()) - set(_SETTING_KEYS))
        if extra:
            logging.warning(
                "config.eval: ignoring key(s) %s; train.evaluate reads %s",
                extra,
                list(_SETTING_KEYS),
            )

    mode = given["mode"] if given["mode"] is not None else "multi_scale"
    if mode not in MODES:
        raise ValueError(f"config.eval.mode must be one of {MODES}, got {mode!r}")
    if mode == "single_scale":
        scales, flip = (1.0,), False
    else:
        raw = given["scales"] if given["scales"] is not None else multi_eval.DEFAULT_SCALES
        try:
            scales = multi_eval.check_scales(raw, "config.eval")
        except ValueError:
            raise ValueError(
                f"config.eval.scales must be a non-empty sequence of positive numbers, got {raw!r}"
            ) from None
        flip = True if given["flip"] is None else given["flip"]
        if not isinstance(flip, (bool, np.bool_)):
            raise ValueError(f"config.eval.flip must be a bool, got {flip!r}")
    base = given["base_size"]
    if base is None:
        base = config_get(config_get(config, "input"), "base_size", _DEFAULT_BASE_SIZE)
    crop = given["crop_size"] if given["crop_size"] is not None else config.dataset.image_size
    split = given["split"] if given["split"] is not None else "validation"
    if not isinstance(split, str) or not split:
        raise ValueError(f"config.eval.split must be a split name, got {split!r}")
    return EvalSettings(
        mode=mode,
        scales=tuple(scales),
        flip=bool(flip),
        base_size=_int_setting(base, "base_size", 1),
        crop_size=_int_setting(crop, "crop_size", 2),
        split=split,
        num_images=_int_setting(
            given["num_images"] if given["num_images"] is not None else 0, "num_images", 0
        ),
        save_predictions=_int_setting(
            given["save_predictions"] if given["save_predictions"] is not None else _DEFAULT_SAVE,
            "save_predictions",
            0,
        ),
        batch_size=_int_setting(
            given["batch_size"] if given["batch_size"] is not None else _DEFAULT_BATCH,
            "batch_size",
            1,
        ),
    )


# ---------------------------------------------------------------------------------------------------
# per-image work


def _mask(example: Mapping, size: tuple[int, int], index: int) -> np.ndarray | None:
    """The example's mask at the image's size (train.data.augment.align_mask), or None without one."""
    if "mask" not in example:
        return None
    try:
        return augment.align_mask(example["mask"], size)
    except ValueError as err:
        raise ValueError(f"example {index}: {err}") from None


def _pred_and_counts_fn(num_classes: int) -> Callable:
    @jax.jit
    def fn(scores, mask):
        pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        return pred, jmetrics.segmentation_counts(pred[None], mask[None], num_classes)

    return fn


def _save_pngs(
    outdir: Path,
    index: int,
    image: np.ndarray,
    mask,
    pred: np.ndarray,
    palette: np.ndarray,
    mean,
    std,
) -> None:
    from train import observe

    folder = outdir / PREDICTIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    palette = label_palette(palette, int(pred.max()))
    if mask is not None:
        shown = np.where((mask >= 0) & (mask < len(palette)), mask, -1)
        observe.save_segmentation_samples(
            folder / f"{index:05d}.png",
            image[None],
            shown[None],
            pred[None],
            palette=palette,
            mean=tuple(mean),
            std=tuple(std),
            max_rows=1,
        )
    if len(palette) <= 256:
        label_image(pred, palette).save(folder / f"{index:05d}_pred.png")


def _allgather_sum(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exact int64 sums over processes (as bytes: without jax_enable_x64 int64 would be cut to int32)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    keys = sorted(values)
    flat = np.concatenate([np.asarray(values[k], np.int64).reshape(-1) for k in keys])
    raw = np.frombuffer(flat.astype("<i8").tobytes(), np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(raw)).reshape(jax.process_count(), -1)
    total = np.stack([np.frombuffer(r.tobytes(), "<i8") for r in rows]).sum(axis=0)
    out, i = {}, 0
    for k in keys:
        shape = np.shape(values[k])
        n = int(np.prod(shape))
        out[k] = total[i : i + n].reshape(shape).astype(np.int64)
        i += n
    return out


def _iou_table(names: list[str], iou, pix_acc: float, miou: float) -> str:
    width = max([len(n) for n in names] + [5])
    lines = [f"{'class':<{width}}  IoU"]
    lines += [f"{n:<{width}}  {v:.4f}" for n, v in zip(names, iou)]
    lines.append(f"{'pixAcc':<{width}}  {pix_acc:.4f}")
    lines.append(f"{'mIoU':<{width}}  {miou:.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# entry point


def _provenance(config, step_dir, step, n_proc: int, t0: float) -> dict:
    """The fields every metrics record ends with: dataset, checkpoint, step, processes, wall time."""
    return {
        "dataset": str(config.dataset.name),
        "checkpoint": str(step_dir),
        "step": step,
        "process_count": n_proc,
        "wall_time_s": time.time() - t0,
    }


def _write_metrics(outdir: Path, out: dict, say: Callable[[str], None], summary: str) -> None:
    """``outdir/eval_metrics.json``, written atomically (a reader never sees half a file); says
    ``summary`` and where it wrote."""
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / f".{METRICS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    tmp.replace(outdir / METRICS_FILE)
    say(summary)
    say(f"wrote {outdir / METRICS_FILE}")


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    checkpoint: str | os.PathLike,
    outdir: str | os.PathLike | None = None,
    *,
    use_best: bool = False,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate a trainer checkpoint with upstream's protocol; returns the metrics dict written to
    ``outdir/eval_metrics.json`` (see the module docstring for the settings and files)."""
    from train import trainer
    from train.data import pipeline

    if config_get(config, "distributed") is not None:
        trainer.initialize_distributed(config.distributed)
    if config.task not in ("segmentation", "recognition"):
        raise ValueError(
            f"train.evaluate: config.task must be 'segmentation' or 'recognition', got {config.task!r}"
        )
    enable_compile_cache(config, checkpoint, use_best=use_best)
    is_main = jax.process_index() == 0
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = say if is_main else (lambda msg: None)

    settings = eval_settings(config, overrides)
    loaded = load_model(config, checkpoint, use_best=use_best)
    step_dir, step = loaded.checkpoint, loaded.step
    if outdir is not None:
        outdir = Path(outdir)
    elif loaded.workdir is None:  # published weights: a model-store name or a .pth/.zip/.msgpack
        outdir = Path("eval") / Path(str(checkpoint)).stem
    else:
        outdir = loaded.workdir / "eval"
    num_classes = int(config.dataset.num_classes)
    mean, std = input_stats(config)

    predict = multi_eval.make_sharded_predict(loaded.model, loaded.variables)
    if config.task == "recognition":
        return _evaluate_recognition(
            config, predict, settings, outdir, step_dir, step, say, is_main
        )
    n_dev = predict.num_devices
    evaluator = segmentation_evaluator(
        predict, settings, num_classes=num_classes, mean=mean, std=std
    )
    batch = evaluator.batch_size
    pred_and_counts = _pred_and_counts_fn(num_classes)

    source = pipeline.get_source(config.dataset, settings.split)
    total = len(source) if settings.num_images == 0 else min(settings.num_images, len(source))
    names = class_names(source, num_classes)
    palette = pipeline.palette(config.dataset)
    p_idx, n_proc = jax.process_index(), jax.process_count()
    mine = range(p_idx, total, n_proc)
    say(
        f"train.evaluate: {settings.mode} (scales {list(settings.scales)}, flip {settings.flip}, base {settings.base_size}, "
        f"crop {settings.crop_size}, {batch} windows per pass on {n_dev} device(s) x {n_proc} process(es)) on "
        f"{total} {settings.split} images of {config.dataset.name}, checkpoint {step_dir}"
    )

    policy = config.input.get("bad_examples", "error")
    metric = jmetrics.SegmentationMetric(num_classes)
    done = skipped = 0
    t0 = time.time()
    every = max(1, total // 10)
    for i in mine:
        example = bad_examples.read_example(source, i, policy=policy, split=settings.split)
        if example is None:  # "skip": logged once by read_example, left out of the metrics
            skipped += 1
            continue
        image = arrays.normalise_uint8(augment.as_rgb_image(example["image"]), mean, std)
        h, w = image.shape[:2]
        mask = _mask(example, (h, w), i)
        scores, _ = evaluator.padded_scores(image)
        hb, wb = scores.shape[:2]
        padded_mask = np.full((hb, wb), -1, np.int32)
        if mask is not None:
            padded_mask[:h, :w] = mask
        pred, counts = pred_and_counts(scores, padded_mask)
        if mask is not None:
            metric.update(**jax.device_get(counts))
        if i < settings.save_predictions:
            _save_pngs(outdir, i, image, mask, np.asarray(pred)[:h, :w], palette, mean, std)
        done += 1
        if is_main and (done % every == 0 or i + n_proc >= total):
            r = metric.result()
            say(
                f"  {min(i + n_proc, total)}/{total} images  pixAcc {r['pixAcc']:.4f}  mIoU {r['mIoU']:.4f}  "
                f"({(time.time() - t0) / done:.2f} s/image)"
            )

    sums = _allgather_sum(
        {
            **metric.state(),
            "images": np.asarray(done, np.int64),
            "skipped": np.asarray(skipped, np.int64),
        }
    )
    n_images = int(sums.pop("images"))
    n_skipped = int(sums.pop("skipped"))
    result = jmetrics.SegmentationMetric.from_state(sums).result()
    out = {
        "pixAcc": float(result["pixAcc"]),
        "mIoU": float(result["mIoU"]),
        "IoU": [float(v) for v in result["IoU"]],
        "class_names": names,
        "mode": settings.mode,
        "scales": list(settings.scales),
        "flip": settings.flip,
        "base_size": settings.base_size,
        "crop_size": settings.crop_size,
        "split": settings.split,
        "num_images": n_images,
        "skipped_examples": n_skipped,
        **_provenance(config, step_dir, step, n_proc, t0),
    }
    if is_main:
        _write_metrics(outdir, out, say, _iou_table(names, out["IoU"], out["pixAcc"], out["mIoU"]))
    return out


def _evaluate_recognition(
    config, predict, settings: EvalSettings, outdir: Path, step_dir, step, say, is_main: bool
) -> dict:
    """Single-crop top-1 / top-5 (upstream ``verify.py``): the config's validation transform (e.g.
    ImageNet's centre crop crop/(crop+32)), every image of the split counted once."""
    from train.data import pipeline

    source = pipeline.get_source(config.dataset, settings.split)
    if settings.num_images:
        raise ValueError(
            "train.evaluate: eval.num_images is for segmentation; recognition evaluates the whole split"
        )
    p_idx, n_proc = jax.process_index(), jax.process_count()
    batch = settings.batch_size * predict.num_devices * n_proc
    transform = pipeline.transform_from_config(
        config.input, task="recognition", image_size=config.dataset.image_size, train=False
    )
    say(
        f"train.evaluate: single crop {config.dataset.image_size} on {len(source)} {settings.split} images of "
        f"{config.dataset.name}, {batch} per global batch, checkpoint {step_dir}"
    )
    num_classes = int(config.dataset.num_classes)
    ks = tuple(k for k in (1, 5) if k <= num_classes)
    counts = {**{f"top{k}": 0 for k in ks}, "examples": 0}
    skipped = 0
    t0 = time.time()
    for local in pipeline.eval_batches(
        source,
        batch_size=batch,
        process_index=p_idx,
        process_count=n_proc,
        transform=transform,
        bad_examples=config.input.get("bad_examples", "error"),
    ):
        # "skip": replaced examples are valid=False (left out of the counts); the column counts them
        skipped += bad_examples.pop_skipped(local)
        logits = np.asarray(jax.device_get(predict(local["image"])), np.float32)
        got = jmetrics.topk_correct(logits, local["label"], ks, valid=local["valid"])
        for k in ks:
            counts[f"top{k}"] += int(got[k])
        counts["examples"] += int(local["valid"].sum())
    sums = _allgather_sum(
        {**{k: np.asarray(v, np.int64) for k, v in counts.items()}, "skipped": np.int64(skipped)}
    )
    n = int(sums.pop("examples"))
    n_skipped = int(sums.pop("skipped"))
    out = {
        **{k: float(v) / max(n, 1) for k, v in sums.items()},
        "num_images": n,
        "skipped_examples": n_skipped,
        "split": settings.split,
        "crop_size": int(config.dataset.image_size),
        **_provenance(config, step_dir, step, n_proc, t0),
    }
    if is_main:
        summary = "  ".join(f"top-{k} {out[f'top{k}']:.4f}" for k in ks) + f"  ({n} images)"
        _write_metrics(outdir, out, say, summary)
    return out


# ---------------------------------------------------------------------------------------------------
# command line


def _define_flags():
    from absl import flags

    from train import inference

    inference.define_common_flags(
        ("base_size", "crop_size", "num_images", "save_predictions", "batch_size")
    )
    flags.adopt_module_key_flags(inference)
    flags.DEFINE_string(
        "outdir", None, "Where eval_metrics.json and the PNGs go (default <workdir>/eval)."
    )
    flags.DEFINE_string("split", None, "Overrides config.eval.split.")
    flags.mark_flags_as_required(["config", "checkpoint"])
    return flags.FLAGS


def main(argv):
    from absl import app
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    f = FLAGS
    overrides = flag_overrides(f, _SETTING_KEYS)
    try:
        result = evaluate_checkpoint(
            f.config,
            f.checkpoint,
            f.outdir,
            use_best=f.use_best,
            overrides=overrides,
            log=lambda msg: print(msg, flush=True),
        )
    except bad_examples.BadExampleError as err:  # one line, as train.main prints it
        hint = "Fix or remove the file, or run again with --config.input.bad_examples=skip"
        print(f"train.evaluate: {err.with_hint(hint)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    headline = "mIoU" if "mIoU" in result else "top1"  # segmentation or recognition
    if not math.isfinite(result[headline]):
        raise SystemExit(f"non-finite {headline}")


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
