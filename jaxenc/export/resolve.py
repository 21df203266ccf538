"""What the export CLI exports: a model from a registry name or a ``configs/*.py`` recipe, and its
variables from weights (every source :func:`jaxenc.models.load_weights` reads) or, when asked,
from a random initialisation.

A recipe is read the way ``train.trainer.build_model`` reads it (``config.task``,
``config.model.{name, backbone, kwargs, dtype}``, ``config.dataset.{name, num_classes,
image_size}``), without importing ``train``: ``jaxenc`` does not depend on the trainer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxenc.export.forward import DTYPES
from jaxenc.export.signature import image_size_pair

__all__ = ["ExportTarget", "build_target", "load_config_file", "target_variables"]


@dataclasses.dataclass(frozen=True)
class ExportTarget:
    """A model to export: the Flax ``model``, its ``name`` (registry name or config path), its
    ``task`` ("segmentation" | "recognition") and the default ``image_size`` (H, W)."""

    model: Any
    name: str
    task: str
    image_size: tuple[int, int]


def load_config_file(path: str | Path):
    """``get_config()`` of a recipe file. The directory above the file's package (the repository
    root for ``configs/<x>.py``) goes on ``sys.path`` so that the recipe's own imports resolve."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"jaxenc.export: config file {path} does not exist")
    root = path.parent
    while (root / "__init__.py").is_file():
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(f"_jaxenc_export_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"jaxenc.export: {path} has no get_config() (not a recipe file)")
    return module.get_config()


def _is_config(name_or_config: str) -> bool:
    return name_or_config.endswith(".py")


def _dtype_kwarg(dtype: str) -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"jaxenc.export: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return {} if DTYPES[dtype] is None else {"dtype": DTYPES[dtype]}


def _from_config(path: str, nclass: int | None, dtype: str | None) -> ExportTarget:
    from jaxenc import models

    config = load_config_file(path)
    kwargs = config.model.kwargs
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
    kwargs.update(_dtype_kwarg(dtype or config.model.get("dtype", "float32")))
    classes = nclass or config.dataset.num_classes
    if config.task == "segmentation":
        model = models.get_segmentation_model(
            config.model.name,
            dataset=config.dataset.name,
            backbone=config.model.backbone,
            nclass=classes,
            **kwargs,
        )
    else:
        model = models.get_model(config.model.name, num_classes=classes, **kwargs)
    size = image_size_pair(config.dataset.get("image_size", 224))
    return ExportTarget(model, path, config.task, size)


def build_target(
    name_or_config: str,
    *,
    nclass: int | None = None,
    dtype: str | None = None,
    model_kwargs: dict | None = None,
) -> ExportTarget:
    """The model named by a registry name (:func:`jaxenc.models.list_models`) or a recipe file.

    ``nclass`` replaces the class count (a segmentation name's dataset default, a recognition
    model's ``num_classes``, a recipe's ``dataset.num_classes``); ``dtype`` ("float32" |
    "bfloat16") sets the model's compute dtype (default float32, or the recipe's
    ``model.dtype``); ``model_kwargs`` are further constructor options (names only). An unknown
    name raises ValueError listing the closest registered names.
    """
    if not isinstance(name_or_config, str):
        raise TypeError(
            f"jaxenc.export: the model must be a name or a config path, got {name_or_config!r}"
        )
    if nclass is not None and (
        isinstance(nclass, bool) or not isinstance(nclass, int) or nclass < 1
    ):
        raise ValueError(f"jaxenc.export: nclass must be a positive int, got {nclass!r}")
    if _is_config(name_or_config):
        if model_kwargs:
            raise ValueError("jaxenc.export: model_kwargs apply to registry names, not to recipes")
        return _from_config(name_or_config, nclass, dtype)
    from jaxenc import models
    from jaxenc.models.segmentation import SEGMENTATION_MODEL_NAMES

    kwargs = {**(model_kwargs or {}), **_dtype_kwarg(dtype or "float32")}
    segmentation = name_or_config.lower() in SEGMENTATION_MODEL_NAMES
    if nclass is not None:
        kwargs["nclass" if segmentation else "num_classes"] = nclass
    model = models.get_model(name_or_config, **kwargs)
    if segmentation:
        return ExportTarget(model, name_or_config, "segmentation", (model.crop_size,) * 2)
    return ExportTarget(model, name_or_config, "recognition", (224, 224))


def target_variables(
    target: ExportTarget,
    *,
    weights: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    use_ema: bool = False,
    image_size: tuple[int, int] | None = None,
) -> dict:
    """The variables to export: ``weights`` read by :func:`jaxenc.models.load_weights` (a store
    name, an upstream ``.pth``/``.zip``, a native ``.msgpack`` or a trainer workdir; strict: a
    ValueError lists the missing, unexpected and mis-shaped keys), or, only with
    ``random_weights=True``, the model's initialisation from ``seed``.
    """
    from jaxenc import models

    size = image_size or target.image_size
    example = jnp.zeros((1, *size, 3), jnp.float32)
    if weights is None:
        if not random_weights:
            raise ValueError(
                f"jaxenc.export: no weights given for {target.name}; pass weights (a .msgpack, an "
                "upstream .pth/.zip, a trainer workdir or a model-store name), or random_weights=True "
                "(--random-weights) to export an untrained model on purpose"
            )
        return models.init_variables(target.model, jax.random.key(seed), example)
    if random_weights:
        raise ValueError("jaxenc.export: give either weights or random_weights, not both")
    shapes = jax.eval_shape(lambda x: target.model.init(jax.random.key(0), x, train=False), example)
    try:
        return models.load_weights(
            weights, shapes, model=target.model, example_input=example, use_ema=use_ema
        )
    except ValueError as err:
        raise ValueError(
            f"jaxenc.export: weights {weights} do not fit {target.name}: {err}"
        ) from None
