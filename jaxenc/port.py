"""PyTorch ``state_dict`` -> Flax variables, for every jaxenc module that mirrors an upstream one.

This is the single place that knows how torch names and layouts map to Flax:

==========================  ===============================  ==========================================
Flax leaf                   torch key                        layout change
==========================  ===============================  ==========================================
``params/<p>/kernel`` 2-D    ``<p>.weight`` (out, in)         transpose -> (in, out)
``params/<p>/kernel`` n-D    ``<p>.weight`` (O, I/g, *k)      -> (*k, I/g, O)  (OIHW -> HWIO; groups kept)
``params/<p>/bias``          ``<p>.bias``                     none
``params/<p>/scale``         ``<p>.weight`` (BatchNorm, LN)   none
``params/<p>/embedding``     ``<p>.weight``                   none
``batch_stats/<p>/mean``     ``<p>.running_mean``             none
``batch_stats/<p>/var``      ``<p>.running_var``              none (both store the unbiased variance)
``params/<p>/<name>``        ``<p>.<name>``                   none (raw ``nn.Parameter`` kept in torch layout)
==========================  ===============================  ==========================================

Flax module names equal the torch attribute names (``nn.Sequential`` indices included: a Flax
submodule may be named ``"1"``), so the key is the Flax path joined by dots. ``num_batches_tracked``
buffers have no Flax counterpart and are dropped. Modules whose torch layout differs in more than the
table above register a rule in :data:`_MODULE_RULES`; Flax state that upstream never saves is
declared with :func:`register_absent_in_torch` and starts at zero; submodules that upstream
registers under two names are declared with :func:`register_torch_aliases`; a class whose leaf names clash with
the generic rules (a raw parameter called ``scale``) declares its names with
:func:`register_torch_leaf_names`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = [
    "torch_to_flax",
    "torch_key",
    "to_numpy",
    "register_absent_in_torch",
    "register_torch_leaf_names",
    "register_torch_aliases",
]

_IGNORED_SUFFIXES = ("num_batches_tracked",)

# (collection, leaf name) -> torch leaf name. Leaves not listed keep their own name.
# fmt: off
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "embedding"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# fmt: on

# Module class -> rule(relative flax path, torch array, flax shape) -> flax array or None (None: use
# the generic rule). Filled by later layer families whose torch layout needs a permutation.
_MODULE_RULES: dict[
    type, Callable[[tuple[str, ...], np.ndarray, tuple[int, ...]], np.ndarray | None]
] = {}


# Module class -> names of its Flax leaves that upstream never writes to a state_dict (e.g.
# PyTorch-Encoding's DropBlock2D disables saving its step counter). torch_to_flax fills them with
# zeros, their initial value. Registered by the layer modules themselves.
_ABSENT_IN_TORCH: dict[type, frozenset[str]] = {}


# Module class -> {Flax leaf name: torch leaf name} overriding _LEAF_NAMES for that class (e.g. the
# Encoding layer's smoothing factors are a raw parameter named ``scale``, not a norm weight).
_CLASS_LEAF_NAMES: dict[type, dict[str, str]] = {}


def register_torch_leaf_names(cls: type, names: dict[str, str]) -> type:
    """Declare torch names for some of ``cls``'s own leaves, overriding the generic rules."""
    _CLASS_LEAF_NAMES[cls] = dict(names)
    return cls


# Module class -> {alias attribute: canonical attribute}: upstream registers one submodule under two
# names (PyTorch-Encoding's ACFModule: ``self.conv_ks = self.conv_qs``), so its state_dict repeats
# every tensor. torch_to_flax drops the alias keys after checking they equal the canonical ones.
_ALIASES: dict[type, dict[str, str]] = {}


def register_torch_aliases(cls: type, aliases: dict[str, str]) -> type:
    """Declare submodule attributes that upstream registers twice (``{alias: canonical}``)."""
    _ALIASES[cls] = dict(aliases)
    return cls


def register_absent_in_torch(cls: type, *leaf_names: str) -> type:
    """Declare that ``cls``'s leaves ``leaf_names`` have no torch state_dict entry (zero-initialised)."""
    _ABSENT_IN_TORCH[cls] = frozenset(leaf_names)
    return cls


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device or dtype, bfloat16 included) or array-like -> a numpy COPY.

    A copy, because ``Tensor.numpy()`` shares memory and jax may alias numpy memory on CPU: an
    in-place torch update (BatchNorm running statistics) would otherwise change converted variables.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    return np.array(value, copy=True)


def torch_key(collection: str, path: tuple[str, ...], owner: type | None = None) -> str:
    """The torch state_dict key of the Flax leaf ``collection/path``; ``owner``: the leaf's module class."""
    *modules, leaf = path
    overrides = _CLASS_LEAF_NAMES.get(owner, {})
    name = overrides[leaf] if leaf in overrides else _LEAF_NAMES.get((collection, leaf), leaf)
    return ".".join([*modules, name])


def _torch_layout(collection: str, leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape torch stores for a Flax leaf of ``flax_shape``."""
    if collection == "params" and leaf == "kernel":
        if len(flax_shape) == 2:
            return (flax_shape[1], flax_shape[0])
        if len(flax_shape) >= 3:
            return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])
    return tuple(flax_shape)


def _to_flax_layout(collection: str, leaf: str, array: np.ndarray) -> np.ndarray:
    if collection == "params" and leaf == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim >= 3:
            return np.transpose(array, (*range(2, array.ndim), 1, 0))
    return array


def _module_types(
    module: nn.Module, init_fn: Callable[[], Any]
) -> tuple[dict[tuple[str, ...], type], Any]:
    """The class of every submodule (by path) and the variable shapes, from tracing ``init_fn``."""
    types: dict[tuple[str, ...], type] = {}

    def record(next_fun, args, kwargs, context):
        types.setdefault(tuple(context.module.path), type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(init_fn)
    return types, shapes


def torch_to_flax(
    module: nn.Module, state_dict: Mapping[str, Any], *example_args, **example_kwargs
) -> dict:
    """Convert a torch ``state_dict`` into the Flax variables of ``module``.

    Args:
      module: a jaxenc (or any Flax) module whose submodule names follow the torch attribute names.
      state_dict: torch tensors or numpy arrays keyed exactly as the upstream module names them.
      *example_args, **example_kwargs: inputs with which ``module.init`` can be traced (only shapes
        and dtypes are used; nothing is computed).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (the collections ``module.init`` creates), float arrays
      in each leaf's parameter dtype.

    Raises:
      ValueError: a key the module needs is missing, a key is not used by the module, or a tensor's
        shape differs from what the module expects. The message names every offending key.
    """
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    types, shapes = _module_types(
        module, lambda: module.init(rngs, *example_args, **example_kwargs)
    )
    flat_shapes = flatten_dict(dict(shapes))
    remaining = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    where = f"torch_to_flax({type(module).__name__})"

    missing, mismatched, out = [], [], {}
    for module_path, cls in types.items():
        for alias, canonical in _ALIASES.get(cls, {}).items():
            prefix = ".".join([*module_path, alias]) + "."
            for k in [k for k in remaining if k.startswith(prefix)]:
                canonical_key = ".".join([*module_path, canonical]) + "." + k[len(prefix) :]
                value = remaining.pop(k)
                if canonical_key not in state_dict or not np.array_equal(
                    to_numpy(value), to_numpy(state_dict[canonical_key])
                ):
                    mismatched.append(f"{k!r}: alias of {canonical_key!r} but not equal to it")
    for flat_key, spec in flat_shapes.items():
        collection, *path = flat_key
        path = tuple(path)
        owner = types.get(path[:-1])
        key = torch_key(collection, path, owner)
        if path[-1] in _ABSENT_IN_TORCH.get(owner, ()):
            out[flat_key] = jnp.zeros(spec.shape, spec.dtype)
            continue
        if key not in remaining:
            missing.append(f"{key!r} (for Flax {'/'.join(flat_key)}, shape {tuple(spec.shape)})")
            continue
        array = to_numpy(remaining.pop(key))
        flax_shape = tuple(spec.shape)
        converted = None
        for depth in range(len(path) - 1, -1, -1):
            rule = _MODULE_RULES.get(types.get(path[:depth]))
            if rule is not None:
                converted = rule(path[depth:], array, flax_shape)
                break
        if converted is None and path[-1] in _CLASS_LEAF_NAMES.get(owner, {}):
            converted = array  # a raw parameter kept in torch layout
        if converted is None:
            expected = _torch_layout(collection, path[-1], flax_shape)
            if tuple(array.shape) != expected:
                mismatched.append(f"{key!r}: torch shape {tuple(array.shape)}, expected {expected}")
                continue
            converted = _to_flax_layout(collection, path[-1], array)
        if tuple(converted.shape) != flax_shape:
            mismatched.append(
                f"{key!r}: converted shape {tuple(converted.shape)}, expected {flax_shape}"
            )
            continue
        out[flat_key] = jnp.asarray(converted, dtype=spec.dtype)

    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if remaining:
        problems.append("unexpected keys: " + ", ".join(repr(k) for k in sorted(remaining)))
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"{where}: " + " | ".join(problems))
    return unflatten_dict(out)
