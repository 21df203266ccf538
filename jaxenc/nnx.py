"""Any jaxenc (Flax linen) model as a Flax NNX module, and an NNX-trained model's variables back as
the linen tree.

:func:`to_nnx` wraps a linen model in a :class:`LinenModel`, an ``nnx.Module`` that owns the
model's variables: ``params`` as ``nnx.Param``, ``batch_stats`` (BatchNorm running statistics,
DropBlock schedule counters) as ``nnx.BatchStat``, under the same paths as in the linen tree.
``model(x, train=True)`` runs the linen ``apply`` in training mode, writes the new statistics back
into its ``nnx.BatchStat`` variables and draws the ``dropout`` key from the module's ``nnx.Rngs``;
``model(x)`` is inference. :func:`to_linen_variables` gives the ``{"params", "batch_stats"}`` tree
that ``model.apply``, :func:`jaxenc.models.save_checkpoint` and ``load_checkpoint`` use.

Written natively rather than on ``flax.nnx.bridge.ToNNX``, which merges the collections into one
attribute per top-level submodule of the wrapper (a submodule called ``eval`` or ``train`` would
shadow the ``nnx.Module`` method) and applies the model with nothing mutable unless every call
passes ``mutable=``; here the mode alone decides, and the NNX state paths are the linen ones
(``params/layer1/0/conv1/kernel``).

Example: a few SGD steps in NNX, then a native checkpoint::

    import optax
    from flax import nnx
    from jaxenc.models import save_checkpoint
    from jaxenc.nnx import to_nnx, to_linen_variables

    model = to_nnx("resnet18", input_shape=(1, 32, 32, 3), rngs=nnx.Rngs(params=0, dropout=1),
                   num_classes=10, final_drop=0.2)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        def loss_fn(model):
            logits = model(images, train=True)  # updates batch_stats, draws a dropout key
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for images, labels in batches:
        train_step(model, optimizer, images, labels)
    save_checkpoint("resnet18.msgpack", to_linen_variables(model))

The dropout key of the n-th training call is ``jax.random.fold_in(key, n)`` for the ``dropout``
stream's key (nnx's ``RngStream`` counter), so a linen loop that passes
``rngs={"dropout": jax.random.fold_in(key, step)}`` sees the same masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxenc.models.initialize import init_variables
from jaxenc.models.native import tree_differences
from jaxenc.models.registry import get_model

__all__ = ["COLLECTIONS", "LinenModel", "to_linen_variables", "to_nnx"]

#: linen collection -> the nnx Variable type that holds it in a :class:`LinenModel`.
COLLECTIONS: dict[str, type[nnx.Variable]] = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _plain_tree(tree: Mapping, what: str) -> dict:
    """``tree`` as nested plain dicts of jax arrays (FrozenDicts and numpy leaves accepted)."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(tree).__name__}")
    flat = flatten_dict(dict(tree))
    return unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def _check_collections(variables: Mapping, where: str) -> None:
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown:
        raise ValueError(
            f"{where}: variables hold collection(s) {unknown}; a LinenModel holds only "
            f"{sorted(COLLECTIONS)}"
        )
    if "params" not in variables:
        raise ValueError(
            f"{where}: variables have no 'params' collection (got collections {sorted(variables)})"
        )


class LinenModel(nnx.Module):
    """A linen ``module`` with its variables as NNX state; made by :func:`to_nnx`.

    Attributes: ``module`` (the linen module, static), ``params`` (nested dict of ``nnx.Param``),
    ``batch_stats`` (nested dict of ``nnx.BatchStat``; empty for a model without BatchNorm),
    ``rngs`` (the ``nnx.Rngs`` training calls draw from, or None) and ``rng_streams`` (the linen rng
    names drawn per training call, default ``("dropout",)``; a name missing from ``rngs`` falls back
    to its ``default`` stream, as ``nnx.Rngs`` does).

    The ``train`` argument of ``__call__`` chooses the mode, as for the linen model;
    ``nnx.Module.train()`` / ``.eval()`` do not change it.
    """

    def __init__(
        self,
        module: nn.Module,
        variables: Mapping,
        *,
        rngs: nnx.Rngs | None = None,
        rng_streams: Sequence[str] = ("dropout",),
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"LinenModel: module must be a flax.linen.Module, got {module!r}")
        if rngs is not None and not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"LinenModel: rngs must be an nnx.Rngs or None, got {rngs!r}")
        if isinstance(rng_streams, str) or not all(isinstance(n, str) for n in rng_streams):
            raise TypeError(
                f"LinenModel: rng_streams must be a sequence of stream names, got {rng_streams!r}"
            )
        if not isinstance(variables, Mapping):
            raise TypeError(
                f"LinenModel: variables must be a mapping, got {type(variables).__name__}"
            )
        _check_collections(variables, "LinenModel")
        self.module = module
        self.rngs = rngs
        self.rng_streams = tuple(rng_streams)
        for name, var_type in COLLECTIONS.items():
            tree = _plain_tree(variables.get(name, {}), f"LinenModel: variables[{name!r}]")
            setattr(self, name, nnx.data(jax.tree.map(var_type, tree)))

    def linen_variables(self) -> dict:
        """The current variables as the linen tree (see :func:`to_linen_variables`)."""
        out = {}
        for name in COLLECTIONS:
            tree = getattr(self, name)
            if name == "params" or tree:
                out[name] = jax.tree.map(
                    lambda v: v.get_value(), tree, is_leaf=lambda v: isinstance(v, nnx.Variable)
                )
        return out

    def _draw_rngs(self) -> dict[str, jax.Array]:
        if self.rngs is None:
            return {}
        return {
            name: self.rngs[name]()
            for name in self.rng_streams
            if name in self.rngs or "default" in self.rngs
        }

    def __call__(self, x, train: bool = False, **kwargs: Any):
        """``module.apply(variables, x, train=train, **kwargs)``. With ``train=True`` the
        ``batch_stats`` variables are updated in place and a key per ``rng_streams`` name is drawn
        from ``rngs``. Returns the linen model's output (a tuple for segmentation models in
        training)."""
        variables = self.linen_variables()
        if not train:
            return self.module.apply(variables, x, train=False, **kwargs)
        try:
            out, updates = self.module.apply(
                variables,
                x,
                train=True,
                rngs=self._draw_rngs(),
                mutable=["batch_stats"],
                **kwargs,
            )
        except flax.errors.InvalidRngError as exc:
            raise ValueError(
                f"LinenModel: the model needs an rng stream in training that was not given "
                f"(rng_streams={self.rng_streams}, rngs="
                f"{None if self.rngs is None else sorted(self.rngs)}): {exc}"
            ) from exc
        stats = flatten_dict(self.batch_stats) if self.batch_stats else {}
        for path, value in flatten_dict(updates.get("batch_stats", {})).items():
            if path not in stats:
                raise ValueError(
                    f"LinenModel: training created batch_stats/{'/'.join(path)}, which the "
                    "variables did not hold; build the variables with the model's init"
                )
            stats[path].set_value(value)
        return out


def _example(input_shape, example_input, where: str) -> jax.Array:
    if (input_shape is None) == (example_input is None):
        raise ValueError(
            f"{where}: give exactly one of input_shape (e.g. (1, 224, 224, 3)) or example_input "
            f"(got input_shape={input_shape!r} and example_input "
            f"{'None' if example_input is None else 'an array'})"
        )
    if example_input is not None:
        return jnp.asarray(example_input)
    shape = tuple(input_shape)
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"{where}: input_shape must be a tuple of positive ints, got {input_shape!r}"
        )
    return jnp.zeros(shape, jnp.float32)


def to_nnx(
    model: str | nn.Module,
    *,
    input_shape: Sequence[int] | None = None,
    example_input: Any = None,
    rngs: nnx.Rngs | None = None,
    variables: Mapping | None = None,
    rng_streams: Sequence[str] = ("dropout",),
    **model_kwargs: Any,
) -> LinenModel:
    """A jaxenc model as an NNX module (:class:`LinenModel`).

    Args:
      model: a :func:`jaxenc.models.get_model` name (built with ``model_kwargs``) or a linen module.
      input_shape / example_input: exactly one; an NHWC batch shape or array the model can be traced
        with (only its shape and dtype matter).
      rngs: the ``nnx.Rngs`` the module keeps for training calls (``dropout`` stream). When
        ``variables`` is None it also initialises the model:
        ``jaxenc.models.init_variables(model, rngs.params(), example)``, the trainer's init.
      variables: linen variables to start from (``{"params", "batch_stats"}``, e.g. a
        ``load_checkpoint`` or ``load_weights`` result); checked against the model's init tree
        (ValueError listing every missing, unexpected or mis-shaped leaf).
      rng_streams: linen rng names drawn from ``rngs`` per training call.
    """
    where = "to_nnx"
    if isinstance(model, str):
        module = get_model(model, **model_kwargs)
    elif isinstance(model, nn.Module):
        if model_kwargs:
            raise TypeError(
                f"{where}: model keyword arguments {sorted(model_kwargs)} are only for a model "
                f"name; got a built {type(model).__name__}"
            )
        module = model
    else:
        raise TypeError(
            f"{where}: model must be a registered model name or a flax.linen.Module, got {model!r}"
        )
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{where}: rngs must be an nnx.Rngs, got {rngs!r}")
    x = _example(input_shape, example_input, where)
    if variables is None:
        if rngs is None:
            raise ValueError(f"{where}: rngs is needed to initialise the model (variables=None)")
        variables = init_variables(module, rngs.params(), x)
    else:
        if not isinstance(variables, Mapping):
            raise TypeError(f"{where}: variables must be a mapping, got {type(variables).__name__}")
        key = jax.random.key(0)
        expected = jax.eval_shape(
            lambda: module.init({"params": key, "dropout": key}, x, train=False)
        )
        problems = tree_differences(expected, variables, target="the model")
        if problems:
            raise ValueError(
                f"{where}: variables do not fit {type(module).__name__}: "
                + "; ".join(p.replace("the checkpoint", "the variables") for p in problems)
            )
    return LinenModel(module, variables, rngs=rngs, rng_streams=rng_streams)


def to_linen_variables(model: LinenModel) -> dict:
    """``{"params": ..., "batch_stats": ...}`` of an NNX :class:`LinenModel` (``batch_stats`` only
    when the model has them): nested plain dicts of jax arrays, exactly the tree ``module.init``
    gives, for ``module.apply``, :func:`jaxenc.models.save_checkpoint` and ``load_checkpoint``."""
    if not isinstance(model, LinenModel):
        raise TypeError(
            f"to_linen_variables: expected a jaxenc.nnx.LinenModel (from to_nnx), got "
            f"{type(model).__name__}"
        )
    return model.linen_variables()
