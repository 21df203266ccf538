"""Constructor-field mixins shared by jaxenc's Flax modules (not re-exported by ``jaxenc.nn``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class DtypeFields(nn.Module):
    """Mixin for modules whose constructor ENDS with ``dtype`` (the compute dtype; None: what the
    inputs and parameters promote to) and ``param_dtype`` (float32), torch-style layers' fields.

    A plain base class would put its fields first; this one appends the two after the subclass's
    own fields, so ``FReLU(in_channels, kernel_size, dtype, param_dtype)`` reads as if the module
    declared them last itself. A subclass that declares or inherits ``dtype`` is left as it is.
    The annotations are the strings ``"Dtype | None"`` and ``"Dtype"``, resolved like the
    subclass's own ones in its module (which defines ``Dtype``).
    """

    if TYPE_CHECKING:
        dtype: Dtype | None
        param_dtype: Dtype

    def __init_subclass__(cls, **kwargs: Any) -> None:
        own = cls.__dict__.get("__annotations__", {})
        if "dtype" not in own and "dtype" not in getattr(cls, "__dataclass_fields__", {}):
            cls.__annotations__ = {**own, "dtype": "Dtype | None", "param_dtype": "Dtype"}
            cls.dtype = None
            cls.param_dtype = jnp.float32
        super().__init_subclass__(**kwargs)


def dtype_kwargs(module: nn.Module) -> dict[str, Any]:
    """``dict(dtype=..., param_dtype=...)`` of ``module``: the keywords its submodules inherit."""
    return dict(dtype=module.dtype, param_dtype=module.param_dtype)
