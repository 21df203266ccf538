"""jaxenc.models.init_variables: the same variables, bit for bit, as a plain jitted ``model.init``
(its CPU compile options change code generation, never values)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from jaxenc.models import get_model, init_variables


def test_same_values_as_plain_jitted_init():
    model = get_model("resnet18", num_classes=7, layers=(1, 1, 1, 1), stage_planes=(8, 16, 32, 64))
    x = np.zeros((1, 32, 32, 3), np.float32)
    key = jax.random.key(3)
    k_params, k_drop = jax.random.split(key)
    plain = jax.jit(lambda v: model.init({"params": k_params, "dropout": k_drop}, v, train=False))(
        jnp.asarray(x)
    )
    fast = flatten_dict(init_variables(model, key, x))
    plain = flatten_dict(plain)
    assert fast.keys() == plain.keys()
    for path, value in plain.items():
        np.testing.assert_array_equal(
            np.asarray(fast[path]), np.asarray(value), err_msg="/".join(path)
        )
