"""Random-input parity helpers: a torch module and its jaxenc twin, values and gradients.

Conventions: inputs are generated in jaxenc's layout (NHWC images) and transposed for torch
(NCHW); outputs of rank 4 are transposed back. Gradients are compared as vector-Jacobian products
with one shared random cotangent, for the input and (through ``torch_to_flax``) for every parameter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from optional_torch import torch

from jaxenc.port import torch_to_flax

RTOL = 1e-5


def nchw(x: np.ndarray) -> np.ndarray:
    """NHWC -> NCHW (identity for other ranks)."""
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))) if x.ndim == 4 else x


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC (identity for other ranks)."""
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def assert_close(
    actual,
    expected,
    rtol: float = RTOL,
    atol: float | None = None,
    what: str = "",
    scale: float = 0.0,
) -> None:
    """allclose with an absolute floor relative to the reference's scale (``rtol * max|expected|``).

    Pure elementwise rtol fails on values that cancel to ~0; scaling atol by the magnitude of the
    tensor (or by ``scale``, the magnitude of related tensors, for ones that are exactly 0 in exact
    arithmetic, such as a conv bias gradient under BatchNorm) keeps the check relative.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if atol is None:
        atol = rtol * max(float(np.max(np.abs(expected), initial=0.0)), scale, 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def random_input(shape, seed: int = 0, dtype=np.float32, low: float | None = None) -> np.ndarray:
    """Standard-normal (or U[low, low+1) when ``low`` is given) array."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) if low is None else rng.uniform(low, low + 1.0, shape)
    return x.astype(dtype)


def check_module_parity(
    torch_module: torch.nn.Module,
    flax_module,
    x: np.ndarray,
    *,
    train: bool = False,
    rtol: float = RTOL,
    grad_rtol: float | None = None,
    seed: int = 0,
    apply_kwargs: dict[str, Any] | None = None,
    torch_forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    param_grads: bool = True,
) -> dict:
    """Compare ``torch_module`` (NCHW) and ``flax_module`` (NHWC) on ``x`` (NHWC numpy).

    Converts the torch weights with ``torch_to_flax``, then checks outputs, input gradients,
    parameter gradients and, when ``train``, the updated BatchNorm statistics. Returns the Flax
    variables and outputs for further checks.
    """
    grad_rtol = rtol * 10 if grad_rtol is None else grad_rtol
    apply_kwargs = dict(apply_kwargs or {})
    torch_module.train(train)
    variables = torch_to_flax(flax_module, torch_module.state_dict(), x)

    xt = torch.tensor(nchw(x), requires_grad=True)
    yt = torch_forward(torch_module, xt) if torch_forward else torch_module(xt)
    cot = random_input(tuple(yt.shape), seed=seed + 1000)
    torch_module.zero_grad()
    yt.backward(torch.tensor(cot))

    params = variables["params"] if "params" in variables else {}
    rest = {k: v for k, v in variables.items() if k != "params"}

    if "train" in inspect.signature(type(flax_module).__call__).parameters:
        apply_kwargs["train"] = train
    elif train:
        raise TypeError(
            f"{type(flax_module).__name__}.__call__ takes no `train` argument; compare it with train=False"
        )

    def forward(p, xx):
        if train:
            return flax_module.apply(
                {"params": p, **rest}, xx, mutable=["batch_stats"], **apply_kwargs
            )
        return flax_module.apply({"params": p, **rest}, xx, **apply_kwargs), {}

    yj, vjp_fn, new_state = jax.vjp(forward, params, jnp.asarray(x), has_aux=True)
    g_params, g_x = vjp_fn(jnp.asarray(nhwc(cot)))

    assert_close(yj, nhwc(yt.detach().numpy()), rtol, what="output")
    assert_close(g_x, nhwc(xt.grad.numpy()), grad_rtol, what="input gradient")
    if param_grads and params:
        torch_grads = {
            k: (p.grad if p.grad is not None else torch.zeros_like(p))
            for k, p in torch_module.named_parameters()
        }
        buffers = {k: b for k, b in torch_module.named_buffers()}
        converted = torch_to_flax(flax_module, {**torch_grads, **buffers}, x)["params"]
        expected = flatten_dict(converted)
        scale = max(float(np.max(np.abs(np.asarray(v)))) for v in expected.values())
        for key, g in flatten_dict(g_params).items():
            assert_close(
                g, expected[key], grad_rtol, what=f"gradient of params/{'/'.join(key)}", scale=scale
            )
    if train and "batch_stats" in variables:
        updated = torch_to_flax(flax_module, torch_module.state_dict(), x)["batch_stats"]
        expected = flatten_dict(updated)
        for key, v in flatten_dict(new_state["batch_stats"]).items():
            assert_close(v, expected[key], rtol, what=f"batch_stats/{'/'.join(key)}")
    return {"variables": variables, "output": yj, "torch_output": yt.detach()}


def randomise_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Random affine parameters and running statistics for every torch BatchNorm inside ``module``.

    Fresh running statistics (mean 0, var 1) and affine (1, 0) would hide layout or conversion bugs
    in eval mode, and a zero running mean makes the updated mean compare at a meaningless scale.
    """
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                if bn.affine:
                    bn.weight.normal_()
                    bn.bias.normal_()
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
    return module
