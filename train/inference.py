"""What ``train.evaluate`` and ``train.predict`` share: a model with its weights, the input
normalisation, class names, the segmentation predictor for one image, and label PNGs.

``--checkpoint`` is one of: a trainer workdir (its latest periodic checkpoint, or ``best`` with
``use_best``), a ``checkpoints/`` or ``best/`` directory, a step directory; or published weights: a
model-store name (read from the local cache) or a weights file (an upstream ``.pth``/``.zip``
converted through :mod:`jaxenc.port`, or a native ``.msgpack``) for the config's model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxenc import models
from jaxenc.models import multi_eval
from train import compile_cache
from train.data.palette import voc_palette

__all__ = [
    "MODES",
    "LoadedModel",
    "class_names",
    "config_get",
    "define_common_flags",
    "enable_compile_cache",
    "flag_overrides",
    "input_stats",
    "is_weights",
    "label_image",
    "label_palette",
    "load_model",
    "load_variables",
    "resolve_checkpoint",
    "segmentation_evaluator",
]

MODES = ("multi_scale", "single_scale")


def config_get(node: Any, key: str, default: Any = None) -> Any:
    """``node[key]`` if ``node`` is a mapping that has ``key``, else ``default`` (also for ``node=None``)."""
    if node is None:
        return default
    try:
        return node[key] if key in node else default
    except TypeError:
        return default


# ---------------------------------------------------------------------------------------------------
# checkpoints and weights


def resolve_checkpoint(
    path: str | os.PathLike, *, use_best: bool = False
) -> tuple[Path, int | None, Path]:
    """``(step directory, step, workdir)``: :func:`jaxenc.models.resolve_checkpoint` (a workdir gives
    its latest periodic checkpoint, or its best one with ``use_best``), with ``--checkpoint`` messages;
    a path that does not exist is reported with the model-store names."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"--checkpoint: {Path(path).resolve()} does not exist (and {str(path)!r} is not a model-store name; "
            f"those are {models.pretrained_model_list()})"
        )
    try:
        return models.resolve_checkpoint(path, use_best=use_best)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            str(err).replace("resolve_checkpoint:", "--checkpoint:", 1)
        ) from None


def is_weights(checkpoint: str | os.PathLike) -> bool:
    """True for published weights (a model-store name or a weights file), False for a trainer
    checkpoint (a directory, or a step directory's ``state``)."""
    spec = str(checkpoint)
    if spec in models.pretrained_model_list():
        return True
    p = Path(spec)
    return p.is_file() and p.name != "state"


def load_variables(config, model, source: str | os.PathLike, *, weights: bool) -> dict:
    """``params``/``batch_stats`` of ``model`` from a trainer step directory (``ema_params`` when
    ``config.optim.ema_decay`` is set, as the trainer evaluates) or, with ``weights``, a model-store
    name or a weights file (an upstream ``.pth``/``.zip`` converted through jaxenc.port, or a ``.msgpack``)."""
    size = config.dataset.image_size
    example = np.zeros((1, size, size, 3), np.float32)
    key = jax.random.key(0)
    abstract = jax.eval_shape(
        lambda: model.init({"params": key, "dropout": key}, example, train=False)
    )
    target = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    if weights:
        return models.load_weights(source, target, model=model, example_input=example)
    use_ema = config_get(config_get(config, "optim"), "ema_decay") is not None
    return models.load_weights(source, target, use_ema=use_ema)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A built model with its variables. ``checkpoint``: the step directory read (a trainer
    checkpoint) or the ``--checkpoint`` string (published weights); ``step``: the checkpoint's step
    (None for published weights); ``workdir``: the trainer workdir (None for published weights)."""

    model: Any
    variables: dict
    checkpoint: str | Path
    step: int | None
    workdir: Path | None


def load_model(
    config: ml_collections.ConfigDict, checkpoint: str | os.PathLike, *, use_best: bool = False
) -> LoadedModel:
    """``train.trainer.build_model(config)`` with the weights of ``checkpoint`` (module docstring)."""
    from train import trainer

    model = trainer.build_model(config)
    if is_weights(checkpoint):
        variables = load_variables(config, model, str(checkpoint), weights=True)
        return LoadedModel(model, variables, str(checkpoint), None, None)
    step_dir, step, workdir = resolve_checkpoint(checkpoint, use_best=use_best)
    variables = load_variables(config, model, step_dir, weights=False)
    return LoadedModel(model, variables, step_dir, step, workdir)


def enable_compile_cache(
    config: ml_collections.ConfigDict, checkpoint: str | os.PathLike, *, use_best: bool = False
) -> None:
    """JAX's persistent compilation cache as ``config.train.compile_cache`` says; ``"workdir"`` means
    the trainer workdir's ``xla_cache`` (published weights have none: the user cache then)."""
    cache = config_get(config_get(config, "train"), "compile_cache", "user")
    if cache == "workdir":
        cache = (
            "user"
            if is_weights(checkpoint)
            else str(resolve_checkpoint(checkpoint, use_best=use_best)[2] / "xla_cache")
        )
    compile_cache.enable_compile_cache(cache)


# ---------------------------------------------------------------------------------------------------
# inputs and outputs


def input_stats(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of ``config.input`` (ImageNet's when absent): images are normalised as
    ``(x * (1/255) - mean) / std`` (:func:`train.data.arrays.normalise_uint8`)."""
    section = config_get(config, "input")
    mean = tuple(float(v) for v in config_get(section, "mean", multi_eval.IMAGENET_MEAN))
    std = tuple(float(v) for v in config_get(section, "std", multi_eval.IMAGENET_STD))
    return mean, std


def class_names(source, num_classes: int) -> list[str]:
    """``source.class_names`` as strings when it has ``num_classes`` of them, else ``"0", "1", ...``."""
    names = getattr(source, "class_names", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def segmentation_evaluator(
    predict, settings, *, num_classes: int, mean, std
) -> multi_eval.MultiScaleEvaluator:
    """Upstream's multi-scale / flip / sliding-window evaluator for ``settings``
    (:class:`train.evaluate.EvalSettings`); ``settings.batch_size`` windows per pass, rounded up to a
    multiple of ``predict.num_devices`` (:func:`jaxenc.models.multi_eval.make_sharded_predict`).
    ``evaluator.predict(image)`` is the int32 ``(H, W)`` prediction for one normalised image."""
    n_dev = predict.num_devices
    return multi_eval.MultiScaleEvaluator(
        predict,
        num_classes=num_classes,
        base_size=settings.base_size,
        crop_size=settings.crop_size,
        scales=settings.scales,
        flip=settings.flip,
        mean=mean,
        std=std,
        batch_size=-(-settings.batch_size // n_dev) * n_dev,
    )


def label_palette(palette: np.ndarray, max_label: int) -> np.ndarray:
    """``palette`` ((K, 3) uint8), or the VOC colour map when it has no colour for ``max_label``."""
    if len(palette) <= int(max_label):
        return voc_palette(int(max_label) + 1)
    return np.asarray(palette, np.uint8)


def label_image(pred: np.ndarray, palette: np.ndarray):
    """An ``(H, W)`` class map in [0, 256) as a PIL palette image (mode "P"), coloured with
    ``palette`` ((K <= 256, 3) uint8; entries past K are black)."""
    from PIL import Image

    png = Image.fromarray(np.ascontiguousarray(pred, np.uint8))  # mode "L"; putpalette makes it "P"
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(palette)] = palette
    png.putpalette(flat.reshape(-1).tolist())
    return png


# ---------------------------------------------------------------------------------------------------
# command-line flags


def define_common_flags(int_overrides: Sequence[str]):
    """Defines the flags of both commands: ``--config --checkpoint --use_best --mode --scales --flip`` and an integer ``--KEY`` overriding
    ``config.eval.KEY`` for each of ``int_overrides``. Returns ``absl.flags.FLAGS``. The caller
    should ``flags.adopt_module_key_flags(train.inference)`` so that its ``--help`` lists them."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Path to an ml_collections config file (configs/*.py).", lock_config=True
    )
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Trainer workdir, checkpoints/ or best/ directory, or a step directory; "
        "or published weights: a model-store name (e.g. deeplab_resnest50_ade, from the local "
        "cache) or a .pth/.zip/.msgpack file.",
    )
    flags.DEFINE_bool("use_best", False, "Read workdir/best instead of the latest checkpoint.")
    flags.DEFINE_enum("mode", None, list(MODES), "Overrides config.eval.mode.")
    flags.DEFINE_list("scales", None, "Overrides config.eval.scales (comma-separated).")
    flags.DEFINE_bool("flip", None, "Overrides config.eval.flip.")
    for key in int_overrides:
        flags.DEFINE_integer(key, None, f"Overrides config.eval.{key}.")
    return flags.FLAGS


def flag_overrides(flag_values, keys: Sequence[str]) -> dict:
    """``{key: --key value}`` for the ``config.eval`` override flags ``keys`` (None = not given);
    ``--scales`` parsed to floats (``absl.app.UsageError`` for a non-number)."""
    from absl import app

    overrides = {k: flag_values[k].value for k in keys if k != "scales"}
    scales = flag_values["scales"].value
    if "scales" in keys and scales is not None:
        try:
            overrides["scales"] = tuple(float(s) for s in scales)
        except ValueError:
            raise app.UsageError(
                f"--scales must be comma-separated numbers, got {scales!r}"
            ) from None
    return overrides
