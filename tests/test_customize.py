"""jaxenc.nn.customize (PyTorch-Encoding's encoding/nn/customize.py): Normalize, ConcurrentModule,
PyramidPooling. PyTorch-Encoding is not installable, so the torch references below restate the
upstream modules with their attribute names (encoding/nn/customize.py)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import F, torch
from parity import assert_close, check_module_parity, nchw, random_input, randomise_batchnorm

from jaxenc.nn.containers import ConcurrentModule
from jaxenc.nn.lp_norm import Normalize, lp_normalize
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.pyramid_pool import PyramidPooling
from jaxenc.nn.torch_compat import Conv2d
from jaxenc.port import torch_to_flax

# --- torch references (upstream maths, upstream names) ----------------------------------------------


class TorchPyramidPooling(torch.nn.Module):
    """PSP pyramid pooling as upstream: AdaptiveAvgPool 1/2/3/6, conv{i} = Sequential(1x1 conv, norm, ReLU)."""

    def __init__(self, in_channels, norm_layer=torch.nn.BatchNorm2d, up_kwargs=None):
        super().__init__()
        out_channels = int(in_channels / 4)
        for i in range(1, 5):
            block = torch.nn.Sequential(
                torch.nn.Conv2d(in_channels, out_channels, 1, bias=False),
                norm_layer(out_channels),
                torch.nn.ReLU(True),
            )
            setattr(self, f"conv{i}", block)
        self._up_kwargs = up_kwargs or {"mode": "bilinear", "align_corners": True}

    def forward(self, x):
        h, w = x.shape[2:]
        feats = [x]
        for i, bins in enumerate((1, 2, 3, 6), start=1):
            y = getattr(self, f"conv{i}")(F.adaptive_avg_pool2d(x, bins))
            feats.append(F.interpolate(y, (h, w), **self._up_kwargs))
        return torch.cat(feats, 1)


class TorchConcurrentModule(torch.nn.ModuleList):
    """Upstream: a ModuleList whose forward concatenates every child's output on channels."""

    def forward(self, x):
        return torch.cat([layer(x) for layer in self], 1)


# --- Normalize --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 1, 3, 0.5, math.inf])
@pytest.mark.parametrize(
    "shape, dim, torch_dim",
    [((4, 10), -1, 1), ((2, 5, 7, 6), -1, 1), ((3, 4, 5), 1, 1), ((2, 5, 7, 6), 1, 2)],
)
def test_normalize_parity(p, shape, dim, torch_dim):
    x = random_input(shape, seed=len(shape))
    to_torch = nchw if len(shape) == 4 else (lambda a: a)
    xt = torch.tensor(to_torch(x), requires_grad=True)
    yt = F.normalize(xt, p, torch_dim, eps=1e-8)
    cot = random_input(tuple(yt.shape), seed=7)
    yt.backward(torch.tensor(cot))
    back = (lambda a: np.transpose(a, (0, 2, 3, 1))) if len(shape) == 4 else (lambda a: a)
    y, vjp = jax.vjp(lambda v: Normalize(p, dim).apply({}, v), jnp.asarray(x))
    assert_close(y, back(yt.detach().numpy()), 1e-5, what="output")
    assert_close(vjp(jnp.asarray(back(cot)))[0], back(xt.grad.numpy()), 1e-4, what="input gradient")


def test_normalize_zero_vector_gradient_matches_torch():
    # The norm is clamped at eps = 1e-8: y = x / eps, dy/dx = 1 / eps, and no NaN from the norm's own
    # derivative at 0 (torch's clamp blocks it; here a guarded branch).
    x = np.zeros((3, 4), np.float32)
    x[1] = [1.0, -2.0, 0.5, 0.0]
    for p in (2, 3):
        xt = torch.tensor(x, requires_grad=True)
        F.normalize(xt, p, 1, eps=1e-8).sum().backward()
        g = jax.grad(lambda v: lp_normalize(v, p, -1).sum())(jnp.asarray(x))
        assert np.isfinite(np.asarray(g)).all()
        assert_close(g, xt.grad.numpy(), 1e-5, what=f"p={p}")
    np.testing.assert_array_equal(np.asarray(lp_normalize(jnp.zeros((2, 3)))), 0.0)


def test_normalize_unit_norm_and_bfloat16():
    x = random_input((2, 5, 7, 16), seed=3)
    y = Normalize().apply({}, x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), 1.0, rtol=1e-6)
    yb = Normalize(dtype=jnp.bfloat16).apply({}, x)
    assert yb.dtype == jnp.bfloat16
    assert_close(yb.astype(jnp.float32), y, rtol=2e-2)


def test_normalize_bad_input():
    with pytest.raises(
        ValueError,
        match=r"Normalize: dim=3 is out of range for an input of rank 2 \(shape \(2, 3\)\)",
    ):
        Normalize(dim=3).apply({}, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"lp_normalize: p must be a number >= 0 or inf, got -1"):
        lp_normalize(jnp.ones((2, 3)), p=-1)


# --- PyramidPooling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, train",
    [((2, 13, 11, 8), False), ((2, 13, 11, 8), True), ((2, 1, 1, 4), False)],
)
def test_pyramid_pooling_parity(shape, train):
    c = shape[-1]
    torch_module = randomise_batchnorm(TorchPyramidPooling(c))
    out = check_module_parity(
        torch_module, PyramidPooling(c), random_input(shape, seed=c), train=train
    )
    assert out["output"].shape == (*shape[:3], c + 4 * (c // 4))


def test_pyramid_pooling_align_corners_false():
    up = {"mode": "bilinear", "align_corners": False}
    torch_module = randomise_batchnorm(TorchPyramidPooling(8, up_kwargs=up))
    check_module_parity(
        torch_module,
        PyramidPooling(8, up_kwargs=up),
        random_input((2, 13, 11, 8), seed=1),
        train=True,
    )


def test_pyramid_pooling_keys_and_norm_layer():
    x = jnp.ones((2, 7, 5, 8))
    variables = jax.eval_shape(lambda: PyramidPooling(8).init(jax.random.key(0), x))
    keys = {"/".join(k) for k in _flatten(variables["params"])}
    assert "conv1/0/kernel" in keys and "conv4/1/scale" in keys and len(keys) == 12
    # A norm_layer factory (here a synchronised-BN style partial) is used for every level.
    module = PyramidPooling(8, norm_layer=functools.partial(BatchNorm, momentum=0.5))
    v = module.init(jax.random.key(0), x)
    _, state = module.apply(
        v, x + jnp.arange(5.0)[None, None, :, None], train=True, mutable=["batch_stats"]
    )
    assert float(state["batch_stats"]["conv1"]["1"]["var"][0]) != 1.0


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,)


def test_pyramid_pooling_bf16_jit_vmap():
    x = random_input((2, 13, 11, 8), seed=4)
    module = PyramidPooling(8)
    v = module.init(jax.random.key(0), x)
    ref = module.apply(v, x)
    assert_close(jax.jit(module.apply)(v, x), ref, rtol=1e-6, what="jit")
    out = jax.jit(PyramidPooling(8, dtype=jnp.bfloat16).apply)(v, x)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, rtol=2e-2)
    xs = jnp.asarray(random_input((3, 2, 6, 5, 8), seed=5))
    apply = jax.jit(module.apply)
    batched = jax.jit(jax.vmap(lambda t: module.apply(v, t)))(xs)
    assert_close(batched, jnp.stack([apply(v, t) for t in xs]), rtol=1e-6, what="vmap")


def test_pyramid_pooling_bad_input():
    x = jnp.ones((2, 7, 5, 8))
    with pytest.raises(
        ValueError, match="PyramidPooling: in_channels=16 but the input has 8 channels"
    ):
        PyramidPooling(16).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"PyramidPooling: in_channels must be >= 4 .* got 3"):
        PyramidPooling(3).init(jax.random.key(0), jnp.ones((2, 7, 5, 3)))
    with pytest.raises(ValueError, match=r"PyramidPooling: expected x of rank 4 \(N, H, W, C\)"):
        PyramidPooling(8).init(jax.random.key(0), x[0])
    with pytest.raises(
        ValueError, match=r"PyramidPooling: up_kwargs\['mode'\] must be 'bilinear'.* got 'nearest'"
    ):
        PyramidPooling(8, up_kwargs={"mode": "nearest"}).init(jax.random.key(0), x)
    with pytest.raises(
        ValueError,
        match=r"PyramidPooling: up_kwargs accepts 'mode' and 'align_corners', got unknown keys \['size'\]",
    ):
        PyramidPooling(8, up_kwargs={"mode": "bilinear", "size": 3}).init(jax.random.key(0), x)


# --- ConcurrentModule -------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_concurrent_module_parity(train):
    bn = randomise_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(8)))[0]
    torch_module = TorchConcurrentModule(
        [torch.nn.Conv2d(8, 5, 3, padding=1), bn, torch.nn.Conv2d(8, 2, 1, bias=False)]
    )
    # BatchNorm takes `train`, the convs do not: ConcurrentModule forwards it only where accepted.
    flax_module = ConcurrentModule(
        [Conv2d(5, 3, padding=1), BatchNorm(8), Conv2d(2, 1, bias=False)]
    )
    out = check_module_parity(
        torch_module, flax_module, random_input((2, 9, 7, 8), seed=2), train=train
    )
    assert out["output"].shape == (2, 9, 7, 5 + 8 + 2)
    assert set(out["variables"]["params"]) == {"0", "1", "2"}  # the ModuleList indices


def test_concurrent_module_with_pyramid_pooling_keys():
    # Nested upstream names: torch "1.conv3.1.running_mean" <-> Flax batch_stats/1/conv3/1/mean.
    torch_module = TorchConcurrentModule(
        [torch.nn.Conv2d(8, 5, 1), randomise_batchnorm(TorchPyramidPooling(8))]
    )
    flax_module = ConcurrentModule([Conv2d(5, 1), PyramidPooling(8)])
    x = random_input((2, 6, 5, 8), seed=6)
    variables = torch_to_flax(flax_module, torch_module.eval().state_dict(), x)
    np.testing.assert_array_equal(
        np.asarray(variables["batch_stats"]["1"]["conv3"]["1"]["mean"]),
        torch_module[1].conv3[1].running_mean.numpy(),
    )
    expected = np.transpose(torch_module(torch.tensor(nchw(x))).detach().numpy(), (0, 2, 3, 1))
    assert_close(jax.jit(flax_module.apply)(variables, x), expected, 1e-5)


def test_concurrent_module_jit_vmap_bf16():
    module = ConcurrentModule([Conv2d(3, 1), Conv2d(4, 3, padding=1)])
    x = random_input((2, 6, 5, 4), seed=3)
    v = module.init(jax.random.key(0), x)
    ref = module.apply(v, x)
    assert_close(jax.jit(module.apply)(v, x), ref, rtol=1e-6, what="jit")
    xs = jnp.asarray(random_input((3, 2, 6, 5, 4), seed=4))
    assert_close(
        jax.vmap(lambda t: module.apply(v, t))(xs),
        jnp.stack([module.apply(v, t) for t in xs]),
        1e-6,
    )
    out = ConcurrentModule(
        [Conv2d(3, 1, dtype=jnp.bfloat16), Conv2d(4, 3, padding=1, dtype=jnp.bfloat16)]
    ).apply(v, x)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, rtol=2e-2)


def test_concurrent_module_bad_input():
    x = jnp.ones((2, 6, 5, 4))
    with pytest.raises(ValueError, match="ConcurrentModule: modules is empty"):
        ConcurrentModule([]).init(jax.random.key(0), x)
    with pytest.raises(
        ValueError,
        match=r"ConcurrentModule: outputs must agree on every axis but the last .* modules\[1\] gave \(2, 3, 3, 2\)",
    ):
        ConcurrentModule([Conv2d(3, 1), Conv2d(2, 1, stride=2)]).init(jax.random.key(0), x)
    with pytest.raises(
        TypeError, match=r"ConcurrentModule: modules\[0\] must be a flax.linen Module, got function"
    ):
        ConcurrentModule([lambda v: v]).init(jax.random.key(0), x)
