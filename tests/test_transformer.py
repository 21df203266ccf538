"""jaxenc.nn.transformer (CaiT Attention, XCAttention, MBConv family) against vit-pytorch 1.26.11.

Upstream: vit-pytorch 1.26.11's cait.py, xcit.py and max_vit.py. vit-pytorch has no tests for these
layers; the parity checks below are the acceptance tests: converted weights, eval and train mode,
outputs, input gradients and parameter gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from optional_torch import torch
from parity import assert_close, check_module_parity, random_input, randomise_batchnorm
from torch_ref import vit_module

from jaxenc.nn.drop import Dropsample
from jaxenc.nn.mbconv import MBConv, MBConvResidual
from jaxenc.nn.squeeze_excite import SqueezeExcitation
from jaxenc.nn.transformer import CaiTAttention, XCAttention
from jaxenc.port import torch_key, torch_to_flax


@pytest.fixture(scope="module")
def cait():
    return vit_module("cait")


@pytest.fixture(scope="module")
def xcit():
    return vit_module("xcit")


@pytest.fixture(scope="module")
def max_vit():
    return vit_module("max_vit")


def flax_keys(variables) -> set[str]:
    """The torch state_dict keys that the Flax variables map to."""
    return {torch_key(k[0], k[1:]) for k in flatten_dict(variables)}


def torch_keys(module: torch.nn.Module) -> set[str]:
    return {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}


def init(module, x, **kwargs):
    """``module.init`` compiled as one program (eager init compiles op by op, which is slow)."""
    return jax.jit(lambda key, xx: module.init(key, xx, **kwargs))(
        jax.random.key(0), jnp.asarray(x)
    )


def random_variables(module, x, seed: int = 0) -> dict:
    """Random variables of ``module``'s shapes without running its initialisers (compiling threefry for
    every initialiser costs seconds): parameters ~ N(0, 1 / fan_in), BN running variances in [0.5, 2]."""
    rng = np.random.default_rng(seed)

    def fill(path, spec):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, spec.shape), spec.dtype)
        fan_in = int(np.prod(spec.shape[:-1])) if len(spec.shape) >= 2 else 1
        return jnp.asarray(rng.standard_normal(spec.shape) / np.sqrt(fan_in), spec.dtype)

    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
    return jax.tree_util.tree_map_with_path(fill, shapes)


_COMPILED: dict = {}


def jit_apply(module, variables, x, *, train: bool = False, key=None, mutable=False):
    """``module.apply`` as one program, compiled once per (module, train, mutable, with key or not);
    ``key`` feeds the ``dropout`` rng stream."""
    cache_key = (id(module), train, tuple(mutable) if mutable else mutable, key is None)
    entry = _COMPILED.get(cache_key)
    if entry is None or entry[0] is not module:

        def run(v, xx, k):
            rngs = None if k is None else {"dropout": k}
            flag = {"train": True} if train else {}
            return module.apply(v, xx, rngs=rngs, mutable=mutable, **flag)

        entry = _COMPILED[cache_key] = (module, jax.jit(run))
    return entry[1](variables, jnp.asarray(x), key)


def tokens_last(xt: torch.Tensor) -> torch.Tensor:
    """parity.py hands rank-4 inputs to torch as NCHW; token tensors (B, H, W, D) must go back."""
    return xt.permute(0, 2, 3, 1)


# --- CaiT talking-heads attention -----------------------------------------------------------------


def test_cait_attention_parity(cait):
    shape, heads, dim_head = (2, 5, 32), 4, 8
    dim = shape[-1]
    torch_module = cait.Attention(dim, heads=heads, dim_head=dim_head)
    out = check_module_parity(
        torch_module,
        CaiTAttention(dim, heads=heads, dim_head=dim_head),
        random_input(shape, seed=1),
    )
    assert out["output"].shape == shape


def test_cait_attention_context_parity(cait):
    """Query (2, 1, 32) attending to itself and a (2, 7, 32) context; context gradient checked too."""
    torch_module = cait.Attention(32, heads=4, dim_head=8)
    module = CaiTAttention(32, heads=4, dim_head=8)
    x = random_input((2, 1, 32), seed=2)
    # large offset and scale: LN(context) instead of context would fail
    ctx = random_input((2, 7, 32), seed=3) * 3.0 + 1.0
    ctx_t = torch.tensor(ctx, requires_grad=True)
    out = check_module_parity(
        torch_module,
        module,
        x,
        apply_kwargs={"context": jnp.asarray(ctx)},
        torch_forward=lambda m, xt: m(xt, context=ctx_t),
    )
    assert out["output"].shape == (2, 1, 32)
    # check_module_parity back-propagated the cotangent random_input(shape, seed=1000) through torch
    cot = random_input((2, 1, 32), seed=1000)
    _, vjp = jax.vjp(
        lambda c: module.apply(out["variables"], jnp.asarray(x), context=c), jnp.asarray(ctx)
    )
    assert_close(vjp(jnp.asarray(cot))[0], ctx_t.grad.numpy(), 1e-4, what="context gradient")


def test_cait_attention_keys_and_init(cait):
    torch_module = cait.Attention(32, heads=4, dim_head=8)
    variables = init(CaiTAttention(32, heads=4, dim_head=8), jnp.ones((1, 3, 32)))
    assert flax_keys(variables) == torch_keys(torch_module)
    p = variables["params"]
    assert p["mix_heads_pre_attn"].shape == (4, 4) and p["to_kv"]["kernel"].shape == (32, 64)
    # torch Linear init U(+-1/sqrt(fan_in)) for weight and bias
    assert float(jnp.max(jnp.abs(p["to_q"]["kernel"]))) <= 32**-0.5
    assert float(jnp.max(jnp.abs(p["to_out"]["0"]["bias"]))) <= 32**-0.5
    assert float(jnp.max(jnp.abs(p["to_out"]["0"]["kernel"]))) > 0.8 * 32**-0.5
    # talking-heads matrices are standard normal, not identity
    big = init(CaiTAttention(8, heads=64, dim_head=1), jnp.ones((1, 1, 8)))["params"]
    assert 0.9 < float(jnp.std(big["mix_heads_post_attn"])) < 1.1


# --- XCiT cross-covariance attention --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5, 32), (2, 3, 4, 32)])
def test_xc_attention_parity(xcit, shape):
    torch_module = xcit.XCAttention(32, heads=4, dim_head=8)
    with torch.no_grad():
        torch_module.temperature.normal_(0.0, 0.5)  # per-head temperatures, not all e
    forward = (lambda m, xt: m(tokens_last(xt)).permute(0, 3, 1, 2)) if len(shape) == 4 else None
    out = check_module_parity(
        torch_module,
        XCAttention(32, heads=4, dim_head=8),
        random_input(shape, seed=4),
        torch_forward=forward,
    )
    assert out["output"].shape == shape


def test_xc_attention_keys_and_init(xcit):
    torch_module = xcit.XCAttention(32, heads=4, dim_head=8)
    variables = init(XCAttention(32, heads=4, dim_head=8), jnp.ones((1, 3, 32)))
    assert flax_keys(variables) == torch_keys(torch_module)
    np.testing.assert_array_equal(
        variables["params"]["temperature"], np.ones((4, 1, 1), np.float32)
    )


def test_xc_attention_token_packing():
    """Middle axes are packed into tokens: (B, H, W, D) equals (B, H*W, D); (B, D) is one token."""
    module = XCAttention(32, heads=4, dim_head=8)
    x = random_input((2, 3, 4, 32), seed=4)
    variables = random_variables(module, x)
    y4 = jit_apply(module, variables, x)
    y3 = jit_apply(module, variables, x.reshape(2, 12, 32))
    np.testing.assert_allclose(y4, np.asarray(y3).reshape(2, 3, 4, 32), rtol=1e-6, atol=1e-6)
    y2 = jit_apply(module, variables, x[:, 0, 0])
    y1 = jit_apply(module, variables, x[:, :1, 0])
    assert y2.shape == (2, 32)
    np.testing.assert_allclose(y2, np.asarray(y1)[:, 0], rtol=1e-6, atol=1e-6)


# --- SqueezeExcitation, MBConvResidual ------------------------------------------------------------


@pytest.mark.parametrize("shape, rate", [((2, 7, 9, 16), 0.25), ((3, 5, 4, 15), 0.5)])
def test_squeeze_excitation_parity(max_vit, shape, rate):
    c = shape[-1]
    torch_module = max_vit.SqueezeExcitation(c, shrinkage_rate=rate)
    module = SqueezeExcitation(c, shrinkage_rate=rate)
    out = check_module_parity(torch_module, module, random_input(shape, seed=5))
    hidden = int(c * rate)
    assert out["variables"]["params"]["gate"]["1"]["kernel"].shape == (c, hidden)
    assert (
        flax_keys(out["variables"])
        == torch_keys(torch_module)
        == {"gate.1.weight", "gate.3.weight"}
    )


def test_mbconv_residual_parity(max_vit):
    torch_module = max_vit.MBConvResidual(max_vit.SqueezeExcitation(8), dropout=0.0)
    module = MBConvResidual(SqueezeExcitation(8))
    out = check_module_parity(torch_module, module, random_input((2, 5, 7, 8), seed=6))
    assert flax_keys(out["variables"]) == {"fn.gate.1.weight", "fn.gate.3.weight"}


# --- MBConv ---------------------------------------------------------------------------------------

MBCONV_CASES = [
    # (dim_in, dim_out, kwargs, input shape, output shape, train)
    *[
        (6, 6, dict(downsample=False, expansion_rate=2.5), (2, 9, 9, 6), (2, 9, 9, 6), t)
        for t in (False, True)
    ],
    *[(8, 16, dict(downsample=True), (2, 9, 9, 8), (2, 5, 5, 16), t) for t in (False, True)],
    # equal dims but downsampling: no residual; odd, non-square input
    (6, 6, dict(downsample=True, expansion_rate=2.5), (2, 7, 10, 6), (2, 4, 5, 6), False),
]


@pytest.mark.parametrize("dim_in, dim_out, kwargs, shape, out_shape, train", MBCONV_CASES)
def test_mbconv_parity(max_vit, dim_in, dim_out, kwargs, shape, out_shape, train):
    """Residual (6 -> 6, expansion 2.5: hid 15, SE hidden 3) and downsampling (8 -> 16, 9x9 -> 5x5)."""
    torch_module = randomise_batchnorm(max_vit.MBConv(dim_in, dim_out, **kwargs))
    module = MBConv(dim_in, dim_out, **kwargs)
    out = check_module_parity(torch_module, module, random_input(shape, seed=7), train=train)
    assert out["output"].shape == out_shape


def test_mbconv_keys(max_vit):
    expected_plain = {"0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"}
    expected_plain |= {"6.gate.1.weight", "6.gate.3.weight"}
    for i in ("1", "4", "8"):
        expected_plain |= {f"{i}.weight", f"{i}.bias", f"{i}.running_mean", f"{i}.running_var"}
    x = jnp.ones((1, 9, 9, 6))
    wrapped = MBConv(6, 6, downsample=False, expansion_rate=2.5)
    plain = MBConv(6, 6, downsample=True, expansion_rate=2.5)
    vw, vp = (
        jax.eval_shape(wrapped.init, jax.random.key(0), x),
        jax.eval_shape(plain.init, jax.random.key(0), x),
    )
    assert (
        flax_keys(vp)
        == expected_plain
        == torch_keys(max_vit.MBConv(6, 6, downsample=True, expansion_rate=2.5))
    )
    assert flax_keys(vw) == {f"fn.{k}" for k in expected_plain}
    assert flax_keys(vw) == torch_keys(max_vit.MBConv(6, 6, downsample=False, expansion_rate=2.5))
    assert vw["params"]["fn"]["6"]["gate"]["1"]["kernel"].shape == (15, 3)  # hid 15, SE hidden 3


def test_mbconv_keyword_only():
    with pytest.raises(TypeError):
        MBConv(8, 16, True)  # upstream: downsample, expansion_rate, ... are keyword-only
    with pytest.raises(TypeError, match="downsample"):
        MBConv(8, 16)


# --- Dropsample and dropout -----------------------------------------------------------------------


def test_dropsample_drops_whole_samples():
    p = 0.3
    x = random_input((4000, 3, 4, 2), seed=8)
    y = np.asarray(jit_apply(Dropsample(p), {}, x, train=True, key=jax.random.key(3)))
    dropped = np.all(y == 0, axis=(1, 2, 3))
    kept = ~dropped
    assert abs(dropped.mean() - p) < 0.03
    # kept samples are scaled exactly by 1 / (1 - p); no partially dropped sample
    np.testing.assert_array_equal(y[kept], x[kept] * np.float32(1 / (1 - p)))
    # another key, another mask
    y2 = np.asarray(jit_apply(Dropsample(p), {}, x, train=True, key=jax.random.key(4)))
    assert not np.array_equal(y, y2)


def test_dropsample_identity_and_extremes():
    x = jnp.asarray(random_input((5, 4, 4, 3), seed=9))
    rngs = {"dropout": jax.random.key(0)}
    np.testing.assert_array_equal(Dropsample(0.5).apply({}, x), x)  # eval
    np.testing.assert_array_equal(Dropsample(0.0).apply({}, x, train=True), x)  # p = 0 needs no rng
    np.testing.assert_array_equal(
        Dropsample(1.0).apply({}, x, train=True, rngs=rngs), np.zeros_like(x)
    )
    # a width of 4 is what upstream's broken mask needs; here every sample still drops or not as a whole
    y = np.asarray(Dropsample(0.5).apply({}, jnp.ones((64, 3, 5, 4)), train=True, rngs=rngs))
    per_sample = y.reshape(64, -1)
    assert np.all((per_sample == 0).all(1) | (per_sample == 2).all(1))
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_mbconv_dropsample_in_training():
    """Residual MBConv with dropout: each sample is either x (branch dropped) or branch / (1 - p) + x."""
    p = 0.5
    module, no_drop = MBConv(4, 4, downsample=False, dropout=p), MBConv(4, 4, downsample=False)
    x = random_input((16, 5, 5, 4), seed=10)
    variables = random_variables(module, x)
    y, _ = jit_apply(
        module, variables, x, train=True, key=jax.random.key(1), mutable=["batch_stats"]
    )
    z, _ = jit_apply(no_drop, variables, x, train=True, mutable=["batch_stats"])
    y, z = np.asarray(y), np.asarray(z)
    dropped = np.all(np.isclose(y, x, rtol=0, atol=1e-6), axis=(1, 2, 3))
    kept = np.all(np.isclose(y, (z - x) / (1 - p) + x, rtol=1e-5, atol=1e-5), axis=(1, 2, 3))
    assert np.all(dropped ^ kept) and 0 < dropped.sum() < 16
    # eval: the dropout is off
    np.testing.assert_array_equal(jit_apply(module, variables, x), jit_apply(no_drop, variables, x))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda rate: CaiTAttention(16, heads=2, dim_head=4, dropout=rate), (2, 6, 16)),
        (lambda rate: XCAttention(16, heads=2, dim_head=4, dropout=rate), (2, 3, 4, 16)),
    ],
    ids=["cait", "xca"],
)
def test_attention_dropout_only_in_train(make, shape):
    x = random_input(shape, seed=11)
    module, plain = make(0.5), make(0.0)
    variables = random_variables(plain, x)
    eval_out = jit_apply(module, variables, x)
    np.testing.assert_array_equal(eval_out, jit_apply(plain, variables, x))
    t1 = jit_apply(module, variables, x, train=True, key=jax.random.key(1))
    t1b = jit_apply(module, variables, x, train=True, key=jax.random.key(1))
    t2 = jit_apply(module, variables, x, train=True, key=jax.random.key(2))
    np.testing.assert_array_equal(t1, t1b)
    assert not np.allclose(t1, eval_out) and not np.allclose(t1, t2)


# --- bfloat16, jit, vmap --------------------------------------------------------------------------

# input shapes as in the parity tests, so the eager run below reuses their compiled ops
MODULES = [
    ("cait", lambda **kw: CaiTAttention(32, heads=4, dim_head=8, **kw), (2, 5, 32)),
    ("xca", lambda **kw: XCAttention(32, heads=4, dim_head=8, **kw), (2, 3, 4, 32)),
    ("se", lambda **kw: SqueezeExcitation(16, **kw), (2, 7, 9, 16)),
    (
        "mbconv_residual",
        lambda **kw: MBConv(6, 6, downsample=False, expansion_rate=2.5, **kw),
        (2, 9, 9, 6),
    ),
    ("mbconv_down", lambda **kw: MBConv(8, 16, downsample=True, **kw), (2, 9, 9, 8)),
]


@pytest.mark.parametrize("name, make, shape", MODULES, ids=[m[0] for m in MODULES])
def test_bfloat16_jit_vmap(name, make, shape):
    """bf16 close to f32 (f32 statistics), jit equals eager, vmap over a leading axis equals a loop."""
    module, bf_module = make(), make(dtype=jnp.bfloat16)
    xs = jnp.asarray(random_input((3, *shape), seed=13))
    variables = random_variables(module, xs[0])
    jitted = jax.jit(module.apply)
    ref = np.asarray(jitted(variables, xs[0]))
    np.testing.assert_allclose(ref, module.apply(variables, xs[0]), rtol=1e-5, atol=1e-6)  # eager
    batched = jax.jit(jax.vmap(lambda xx: module.apply(variables, xx)))(xs)
    looped = np.stack([jitted(variables, xx) for xx in xs])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-6)

    out = jax.jit(bf_module.apply)(variables, xs[0].astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    shapes = jax.eval_shape(bf_module.init, jax.random.key(0), xs[0])
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {
        jnp.dtype(jnp.float32)
    }  # params, stats f32
    err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
    assert err <= 2e-2 * float(np.max(np.abs(ref))), f"{name}: bf16 max error {err}"


# --- bad input ------------------------------------------------------------------------------------


def test_bad_inputs():
    def shape_of(module, x, **kwargs):  # traces init only: the checks run at trace time
        return jax.eval_shape(lambda: module.init(jax.random.key(0), x, **kwargs))

    cait_module = CaiTAttention(32, heads=4, dim_head=8)
    with pytest.raises(
        ValueError, match=r"CaiTAttention: x must have dim=32 .* got shape \(2, 5, 16\)"
    ):
        shape_of(cait_module, jnp.ones((2, 5, 16)))
    with pytest.raises(
        ValueError, match=r"CaiTAttention: expected x of rank 3 \(B, N, dim\), got shape \(2, 2, 5"
    ):
        shape_of(cait_module, jnp.ones((2, 2, 5, 32)))
    with pytest.raises(
        ValueError, match=r"CaiTAttention: context must have dim=32 .* got shape \(2, 7, 16\)"
    ):
        shape_of(cait_module, jnp.ones((2, 1, 32)), context=jnp.ones((2, 7, 16)))
    with pytest.raises(ValueError, match=r"CaiTAttention: expected context of rank 3"):
        shape_of(cait_module, jnp.ones((2, 1, 32)), context=jnp.ones((7, 32)))
    with pytest.raises(
        ValueError, match=r"CaiTAttention: context must have the batch size of x \(2\)"
    ):
        shape_of(cait_module, jnp.ones((2, 1, 32)), context=jnp.ones((3, 7, 32)))

    xca = XCAttention(32, heads=4, dim_head=8)
    with pytest.raises(
        ValueError, match=r"XCAttention: x must have dim=32 .* got shape \(2, 3, 4, 30\)"
    ):
        shape_of(xca, jnp.ones((2, 3, 4, 30)))
    with pytest.raises(ValueError, match=r"XCAttention: expected x of rank >= 2"):
        shape_of(xca, jnp.ones((32,)))

    with pytest.raises(ValueError, match=r"SqueezeExcitation: expected x of rank 4 \(N, H, W, C\)"):
        shape_of(SqueezeExcitation(8), jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match=r"SqueezeExcitation: x must have dim=8"):
        shape_of(SqueezeExcitation(8), jnp.ones((2, 5, 5, 3)))
    with pytest.raises(
        ValueError, match=r"MBConv: x \(NHWC\) must have dim=8 features .* got shape \(2, 8, 9, 9\)"
    ):
        shape_of(MBConv(8, 16, downsample=True), jnp.ones((2, 8, 9, 9)))  # an NCHW input
    with pytest.raises(ValueError, match=r"MBConv: expected x of rank 4"):
        shape_of(MBConv(8, 16, downsample=True), jnp.ones((9, 9, 8)))
    with pytest.raises(
        ValueError, match=r"MBConvResidual: fn must keep the input shape .* \(2, 5, 5, 16\)"
    ):
        shape_of(MBConvResidual(MBConv(8, 16, downsample=False)), jnp.ones((2, 5, 5, 8)))

    with pytest.raises(ValueError, match=r"CaiTAttention: heads must be a positive integer, got 0"):
        CaiTAttention(32, heads=0)
    with pytest.raises(
        ValueError, match=r"XCAttention: dropout must be a probability in \[0, 1\], got 1.5"
    ):
        XCAttention(32, dropout=1.5)
    with pytest.raises(
        ValueError, match=r"Dropsample: prob must be a probability in \[0, 1\], got -0.1"
    ):
        Dropsample(-0.1)
    with pytest.raises(
        ValueError, match=r"MBConv: the hidden width int\(expansion_rate \* dim_out\) must be >= 1"
    ):
        MBConv(4, 4, downsample=False, expansion_rate=0.1)
    with pytest.raises(ValueError, match=r"torch_to_flax\(MBConv\): missing keys: .*'fn.0.weight'"):
        torch_to_flax(MBConv(6, 6, downsample=False), {}, jnp.ones((1, 5, 5, 6)))
