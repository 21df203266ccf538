"""bfloat16 forward of every named model in jaxenc.models (issue: "bf16 for every model").

Every name from ``list_models()`` is covered: each distinct architecture runs in float32 and in
bfloat16 (``dtype=jnp.bfloat16``, float32 parameters) on the same random input and random weights,
and every output (logits; segmentation main / se / aux) must agree to 2e-2 relative (norm-wise).
Names that build the same network up to the class count or the evaluation sizes (``base_size`` /
``crop_size``, which the forward pass does not read) share one run; a separate test checks that
claim field by field, so a new preset that changes the network gets its own run.

Weights: the model's own initialisation with each residual block's last norm scale (``bn3``) times
0.25. At the plain initialisation the deepest ResNeSt stacks (200 / 269 blocks' worth of split
attention) are chaotic in eval mode: their residual stream grows to ~2e3 and the split-attention
softmax saturates, so even float32 moves c4 by 6% under a 2^-9 relative input perturbation (bf16
then differs by ~19%). Down-weighting the residual branches, as trained networks have them, keeps
every layer in play with a well-conditioned residual stream (resnest269 bf16 vs f32: 0.4%).

Runs eagerly (no jit): XLA compiles of the deepest models cost more than op-by-op execution, and
op caches are shared between the architectures.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxenc.models import get_model, list_models

# name -> the name whose run covers it (same network; only nclass / base_size / crop_size differ).
# fmt: off
SHARED_RUN = {
    "deeplab_resnest50_ade": "deeplab_resnest50",
    "deeplab_resnest50_pcontext": "deeplab_resnest50",
    "deeplab_resnest101_pcontext": "deeplab_resnest101_ade",
    "deeplab_resnest200_pcontext": "deeplab_resnest200_ade",
    "deeplab_resnest269_pcontext": "deeplab_resnest269_ade",
    "fcn_resnest50_ade": "fcn_resnest50",
    "fcn_resnest50_pcontext": "fcn_resnest50",
    "encnet_resnet50s_pcontext": "encnet_resnet50s",
    "encnet_resnet101s_pcontext": "encnet_resnet101s_coco",
    "psp_resnet50s_ade": "psp_resnet50s",
}
# fmt: on
_PRESET_ONLY = ("nclass", "num_classes", "base_size", "crop_size", "parent", "name")


def _runs() -> list[str]:
    return sorted(n for n in list_models() if n not in SHARED_RUN)


def _network_fields(model) -> dict:
    return {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(model)
        if f.name not in _PRESET_ONLY
    }


def _outputs(y) -> tuple:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _downweight_residual_branches(variables, factor: float = 0.25):
    flat = flatten_dict(variables)
    return unflatten_dict(
        {
            k: (v * factor if k[0] == "params" and k[-2:] == ("bn3", "scale") else v)
            for k, v in flat.items()
        }
    )


def test_every_name_has_a_run():
    names = set(list_models())
    assert set(SHARED_RUN) <= names and set(SHARED_RUN.values()) <= names
    assert set(_runs()) | set(SHARED_RUN) == names


@pytest.mark.parametrize("name", sorted(SHARED_RUN))
def test_shared_runs_build_the_same_network(name):
    a, b = get_model(name), get_model(SHARED_RUN[name])
    assert type(a) is type(b)
    assert _network_fields(a) == _network_fields(b), (
        f"{name} differs from {SHARED_RUN[name]} beyond presets"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", _runs())
def test_bfloat16_forward_close_to_float32(name):
    x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3), jnp.float32)
    model32 = get_model(name)
    variables = _downweight_residual_branches(model32.init(jax.random.key(0), x))
    y32 = _outputs(model32.apply(variables, x))
    y16 = _outputs(get_model(name, dtype=jnp.bfloat16).apply(variables, x))
    assert len(y16) == len(y32)
    for i, (a, e) in enumerate(zip(y16, y32)):
        assert a.dtype == jnp.bfloat16, f"{name} output {i}: dtype {a.dtype}"
        assert a.shape == e.shape
        a = np.asarray(a.astype(jnp.float32))
        e = np.asarray(e)
        assert np.all(np.isfinite(a)), f"{name} output {i}: non-finite values in bfloat16"
        err = np.linalg.norm(a - e) / np.linalg.norm(e)
        assert err <= 2e-2, f"{name} output {i}: bf16 vs f32 relative error {err:.4f} > 2e-2"
