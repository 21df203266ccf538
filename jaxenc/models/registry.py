"""Model registry: every named model (upstream's ``get_model`` names plus jaxenc's additions).

A constructor registers under one or more lower-case names with preset keyword arguments
(:func:`register_model`); :func:`get_model` applies the presets, then the caller's overrides.
Constructors registered with :func:`register_backbone` are also the segmentation backbones
(:func:`get_backbone`). Unknown names raise a ValueError that lists the closest registered names.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "backbone_names",
    "build_named",
    "close_match_hint",
    "get_backbone",
    "get_model",
    "list_models",
    "lookup_name",
    "register_backbone",
    "register_model",
]

_REGISTRY: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
_BACKBONES: dict[str, None] = {}  # registered names usable as segmentation backbones, in order


def register_model(name: str, **presets: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as ``name`` (lower-cased) with preset keyword arguments.

    Stack it to register one constructor under several names with different presets.
    """
    key = name.lower()

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if key in _REGISTRY and _REGISTRY[key][0] is not fn:
            raise ValueError(
                f"register_model: {key!r} is already registered to {_REGISTRY[key][0].__qualname__}"
            )
        _REGISTRY[key] = (fn, dict(presets))
        return fn

    return decorate


def register_backbone(
    name: str, **presets: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`register_model` for a backbone returning (c1, c2, c3, c4) with ``return_features=True``
    (a :class:`jaxenc.models.resnet.ResNet`): the name becomes a :func:`get_backbone` name too."""
    register = register_model(name, **presets)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        _BACKBONES[name.lower()] = None
        return register(fn)

    return decorate


def backbone_names() -> tuple[str, ...]:
    """The :func:`get_backbone` names, in registration order."""
    _import_model_modules()
    return tuple(_BACKBONES)


def get_backbone(name: str, **kwargs: Any):
    """The named segmentation backbone (upstream ``sseg.base.get_backbone``), built WITHOUT weights.

    ``kwargs`` override the constructor's presets (``dilated``, ``norm_layer``, ``dtype`` ...).
    """
    names = backbone_names()
    if not isinstance(name, str) or name.lower() not in names:
        raise ValueError(
            f"get_backbone: unknown backbone {name!r}; segmentation backbones: {', '.join(names)}"
        )
    return get_model(name, **kwargs)


def list_models() -> list[str]:
    """Sorted names accepted by :func:`get_model`."""
    _import_model_modules()
    return sorted(_REGISTRY)


def get_model(name: str, **overrides: Any):
    """Build the named model (a Flax module); ``overrides`` replace the name's presets.

    The name is lower-cased, as upstream's ``get_model`` does.
    """
    _import_model_modules()
    fn, presets = lookup_name(
        _REGISTRY,
        name,
        "get_model",
        "get_model: unknown model {name!r}{hint} ({count} models; see jaxenc.models.list_models())",
    )
    return fn(**{**presets, **overrides})


def lookup_name(table: Mapping[str, Any], name: Any, where: str, unknown: str) -> Any:
    """``table[name.lower()]``: a TypeError (prefixed ``where``) when ``name`` is not a string, a
    ValueError ``unknown.format(name=name, hint=close_match_hint(...), count=len(table))`` when the
    lower-cased name is not a key."""
    if not isinstance(name, str):
        raise TypeError(f"{where}: name must be a string, got {name!r}")
    key = name.lower()
    if key not in table:
        raise ValueError(
            unknown.format(name=name, hint=close_match_hint(key, table), count=len(table))
        )
    return table[key]


def close_match_hint(key: str, candidates) -> str:
    """'; did you mean 'a', 'b'?' for the registered names closest to ``key`` ('' when none is close)."""
    close = difflib.get_close_matches(key, list(candidates), n=5, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _import_model_modules() -> None:
    """Model modules register themselves on import; importing the package imports them all."""
    import jaxenc.models  # noqa: F401


def build_named(
    model: str,
    cls: type,
    pretrained: bool,
    presets: dict[str, Any],
    overrides: dict[str, Any],
    *,
    tuple_fields: tuple[str, ...] = (),
):
    """A named constructor's body: ``cls(**{**presets, **overrides})`` with the checks every
    constructor shares. ``pretrained=True`` raises (weights come from the model store, never from a
    constructor); unknown option names raise listing the valid ones; list values of ``tuple_fields``
    become tuples (module fields must be hashable); the model's ValueErrors are prefixed with ``model``.
    """
    if pretrained:
        raise ValueError(
            f"{model}: pretrained weights are not loaded by the constructor; build the model, then use "
            f"jaxenc.models.load_pretrained({model!r}, ...) to get its converted variables"
        )
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{model}: unknown option(s) {unknown}; valid options: {sorted(fields)}")
    kwargs = {**presets, **overrides}
    for key in tuple_fields:
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{model}: {e}") from None
