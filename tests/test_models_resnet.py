"""jaxenc.models.resnet: PyTorch-Encoding's ResNet / ResNeXt / ResNeSt backbones (encoding/models/backbone).

Oracle: the ``resnest`` package's torch ResNet (tests/torch_ref.py ``resnest_torch()``), the same
design as PyTorch-Encoding's backbone except for the radix convention: its ``radix=0`` is the plain
3x3 conv that PyTorch-Encoding (and jaxenc) build for ``radix=1``. ResNet-18/34 (basic blocks, absent
upstream) are checked against torchvision's published parameter counts and a small torch restatement
of torchvision's BasicBlock ResNet written here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from optional_torch import torch
from parity import assert_close, check_module_parity, nchw, nhwc, random_input, randomise_batchnorm
from torch_ref import resnest_torch

from jaxenc.models import get_model, list_models
from jaxenc.models import resnet as R
from jaxenc.nn import SyncBatchNorm
from jaxenc.port import torch_to_flax

# Parameter counts (torch: sum of numel of parameters). Bottleneck models are also recomputed from
# the oracle below; ResNet-18/34 are torchvision's published counts.
# fmt: off
PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnet50s": 25_680_808,
    "resnet101s": 44_672_936,
    "resnet152s": 60_316_584,
    "resnet50d": 25_576_264,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnest50": 27_483_240,
    "resnest101": 48_275_016,
    "resnest200": 70_201_544,
    "resnest269": 110_929_480,
    "resnest50_fast": 27_483_240,
    "resnest101_fast": 48_275_016,
}
# fmt: on

_ORACLE_FIELDS = (
    "groups",
    "bottleneck_width",
    "deep_stem",
    "stem_width",
    "avg_down",
    "avd",
    "avd_first",
    "dilated",
    "dilation",
    "num_classes",
    "last_gamma",
)


def _oracle(model: R.ResNet) -> torch.nn.Module:
    """The resnest package's torch ResNet with ``model``'s options (radix 1 -> its radix 0)."""
    ref = resnest_torch().resnet
    kw = {f: getattr(model, f) for f in _ORACLE_FIELDS}
    kw["radix"] = 0 if model.radix == 1 else model.radix
    return ref.ResNet(ref.Bottleneck, list(model.layers), **kw)


def _torch_features(tm: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = tm.maxpool(tm.relu(tm.bn1(tm.conv1(x))))
    feats = []
    for layer in (tm.layer1, tm.layer2, tm.layer3, tm.layer4):
        x = layer(x)
        feats.append(x)
    return feats


def _count(tree) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(tree))


def _shapes(model, x_shape=(1, 32, 32, 3), **kwargs):
    return jax.eval_shape(
        functools.partial(model.init, **kwargs), jax.random.key(0), jnp.zeros(x_shape, jnp.float32)
    )


# --------------------------------------------------------------------------------------------------
# A torch restatement of torchvision's ResNet-18/34 (BasicBlock), same attribute names.


class _TorchBasicBlock(torch.nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TorchBasicResNet(torch.nn.Module):
    def __init__(self, layers, num_classes=1000):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = [_TorchBasicBlock(inplanes, planes, stride)]
            blocks += [_TorchBasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = _torch_features(self, x)[-1]
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------------
# Parameter counts and the registry


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count(name):
    model = getattr(R, name)()
    n = _count(_shapes(model)["params"])
    assert n == PARAM_COUNTS[name], f"{name}: {n:,} parameters, expected {PARAM_COUNTS[name]:,}"
    if model.block == "bottleneck":
        with torch.device("meta"):  # shapes only: no memory, no init FLOPs
            tm = _oracle(model)
        assert n == sum(p.numel() for p in tm.parameters())
    else:
        assert n == sum(p.numel() for p in _TorchBasicResNet(model.layers).parameters())


def test_registry_and_exports():
    names = set(list_models())
    assert set(PARAM_COUNTS) <= names
    assert set(PARAM_COUNTS) <= set(R.__all__)
    m = get_model("ResNeSt50", num_classes=10, dilated=True)
    assert isinstance(m, R.ResNet)
    assert (m.radix, m.stem_width, m.avg_down, m.avd, m.avd_first, m.num_classes, m.dilated) == (
        2,
        32,
        True,
        True,
        False,
        10,
        True,
    )
    assert get_model("resnest50_fast").avd_first and get_model("resnest101").stem_width == 64
    assert get_model("resnet50s").deep_stem and get_model("resnet50s").stem_width == 64
    assert (get_model("resnet50d").stem_width, get_model("resnet50d").avg_down) == (32, True)
    assert (
        get_model("resnext101_32x8d").groups,
        get_model("resnext101_32x8d").bottleneck_width,
    ) == (32, 8)
    assert get_model("resnet34").block == "basic"


# --------------------------------------------------------------------------------------------------
# Parity with the torch oracle


@pytest.mark.parametrize("name", ["resnet50s", "resnest50"])
def test_eval_parity_logits(name):
    model = getattr(R, name)()
    tm = randomise_batchnorm(_oracle(model)).eval()
    x = random_input((2, 64, 64, 3), seed=1)
    variables = torch_to_flax(model, tm.state_dict(), x)
    y = model.apply(variables, x)
    with torch.no_grad():
        expected = tm(torch.tensor(nchw(x))).numpy()
    assert_close(y, expected, 1e-4, what=f"{name} logits")


def test_eval_parity_resnet18_basic_blocks():
    model = R.resnet18(num_classes=10)
    tm = randomise_batchnorm(_TorchBasicResNet(model.layers, 10)).eval()
    x = random_input((2, 64, 64, 3), seed=2)
    variables = torch_to_flax(model, tm.state_dict(), x)
    with torch.no_grad():
        expected = tm(torch.tensor(nchw(x))).numpy()
    assert_close(model.apply(variables, x), expected, 1e-4, what="resnet18 logits")


def test_dilated_resnest50_c4_parity():
    model = R.resnest50(dilated=True)
    tm = randomise_batchnorm(_oracle(model)).eval()
    x = random_input((2, 64, 64, 3), seed=3)
    variables = torch_to_flax(model, tm.state_dict(), x)
    feats = model.apply(variables, x, return_features=True)
    with torch.no_grad():
        expected = _torch_features(tm, torch.tensor(nchw(x)))
    assert [f.shape for f in feats] == [
        (2, 16, 16, 256),
        (2, 8, 8, 512),
        (2, 8, 8, 1024),
        (2, 8, 8, 2048),
    ]
    for i, (f, e) in enumerate(zip(feats, expected)):
        assert_close(f, nhwc(e.numpy()), 1e-4, what=f"c{i + 1}")


@pytest.mark.slow
def test_train_parity_small_resnest():
    """Train mode (batch statistics): outputs, input and parameter gradients, updated running stats."""
    model = R.resnest50(layers=(1, 1, 1, 1), num_classes=10)
    tm = randomise_batchnorm(_oracle(model))
    check_module_parity(tm, model, random_input((2, 64, 64, 3), seed=4), train=True, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Feature maps


@pytest.mark.parametrize(
    "kwargs, strides",
    [
        ({}, (4, 8, 16, 32)),
        ({"dilated": True}, (4, 8, 8, 8)),
        ({"dilation": 4}, (4, 8, 8, 8)),
        ({"dilation": 2}, (4, 8, 16, 16)),
    ],
)
@pytest.mark.parametrize(
    "name, channels", [("resnest50", (256, 512, 1024, 2048)), ("resnet18", (64, 128, 256, 512))]
)
def test_feature_shapes_and_no_fc(name, channels, kwargs, strides):
    model = getattr(R, name)(**kwargs)
    x = jnp.zeros((2, 64, 64, 3))
    shapes = jax.eval_shape(
        functools.partial(model.init, return_features=True), jax.random.key(0), x
    )
    assert "fc" not in shapes["params"]
    feats = jax.eval_shape(functools.partial(model.apply, return_features=True), shapes, x)
    assert [f.shape for f in feats] == [(2, 64 // s, 64 // s, c) for s, c in zip(strides, channels)]
    # the classifier is the only difference
    full = _shapes(model, (2, 64, 64, 3))
    assert _count(full["params"]) - _count(shapes["params"]) == channels[-1] * 1000 + 1000


# --------------------------------------------------------------------------------------------------
# bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50s", "resnest50"])
def test_bfloat16_forward(name):
    x = random_input((2, 64, 64, 3), seed=5)
    model = getattr(R, name)()
    variables = model.init(jax.random.key(0), x)
    y32 = model.apply(variables, x)
    y16 = getattr(R, name)(dtype=jnp.bfloat16).apply(variables, x)
    assert y16.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
    assert_close(y16.astype(jnp.float32), y32, 2e-2, what=f"{name} bfloat16 logits")


# --------------------------------------------------------------------------------------------------
# Initialisation, last_gamma, avd placement


def test_init_he_fan_out_and_bn():
    model = R.resnest50(layers=(1, 1, 1, 1))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params = flatten_dict(variables["params"], sep="/")
    paths = (
        "layer3/0/conv2/conv/kernel",
        "layer4/0/conv1/kernel",
        "conv1/6/kernel",
        "layer4/0/downsample/1/kernel",
    )
    for path in paths:
        k = np.asarray(params[path])
        kh, kw, _, out = k.shape
        assert abs(k.std() / np.sqrt(2.0 / (kh * kw * out)) - 1) < 0.05, path
        assert abs(k.mean()) < 0.05 * k.std(), path
    # SplAt's attention convs are re-initialised too (upstream's loop reaches every nn.Conv2d)
    fc2 = np.asarray(params["layer4/0/conv2/fc2/kernel"])
    assert abs(fc2.std() / np.sqrt(2.0 / fc2.shape[-1]) - 1) < 0.05
    fc = np.asarray(params["fc/kernel"])
    assert np.abs(fc).max() <= 1 / np.sqrt(2048) and fc.std() > 0.5 / np.sqrt(3 * 2048)
    scales = [p for p in params if p.endswith("/scale")]
    assert len(scales) > 20
    for path in scales:
        assert np.all(np.asarray(params[path]) == 1.0), path
        assert np.all(np.asarray(params[path[: -len("scale")] + "bias"]) == 0.0), path


@pytest.mark.parametrize("name, last_bn", [("resnet50", "bn3"), ("resnet18", "bn2")])
def test_last_gamma_zero_inits_last_bn(name, last_bn):
    x = jnp.zeros((1, 32, 32, 3))
    on = flatten_dict(
        getattr(R, name)(layers=(1, 2, 1, 1), last_gamma=True).init(jax.random.key(0), x)["params"]
    )
    off = flatten_dict(getattr(R, name)(layers=(1, 2, 1, 1)).init(jax.random.key(0), x)["params"])
    last = [k for k in on if k[-2] == last_bn and k[-1] == "scale"]
    assert len(last) == 5
    for k in last:
        assert np.all(np.asarray(on[k]) == 0.0) and np.all(np.asarray(off[k]) == 1.0), k
    others = [k for k in on if k[-1] == "scale" and k[-2] != last_bn]
    assert others and all(np.all(np.asarray(on[k]) == 1.0) for k in others)


@pytest.mark.parametrize("block", [R.Bottleneck, R.BasicBlock])
def test_last_gamma_block_is_identity_at_init(block):
    """With the last BN's scale at 0 (and bias 0) a block without projection returns relu(x) = x."""
    planes = 16 if block is R.Bottleneck else 64
    m = block(planes=planes, last_gamma=True)
    x = jnp.abs(jnp.asarray(random_input((2, 8, 8, 64), seed=6)))
    variables = m.init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(m.apply(variables, x)), np.asarray(x))
    y, _ = m.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_avd_first_changes_only_the_pool_placement():
    a, b = R.resnest50(layers=(1, 1, 1, 1)), R.resnest50_fast(layers=(1, 1, 1, 1))
    x = random_input((2, 64, 64, 3), seed=7)
    shapes_a, shapes_b = _shapes(a, x.shape), _shapes(b, x.shape)
    assert jax.tree_util.tree_map(lambda s: s.shape, shapes_a) == jax.tree_util.tree_map(
        lambda s: s.shape, shapes_b
    )
    variables = a.init(jax.random.key(0), x)
    ya, yb = a.apply(variables, x), b.apply(variables, x)
    assert not np.allclose(np.asarray(ya), np.asarray(yb), rtol=1e-3, atol=1e-3)
    # and avd_first matches the oracle too
    tm = randomise_batchnorm(_oracle(b)).eval()
    tv = torch_to_flax(b, tm.state_dict(), x)
    with torch.no_grad():
        expected = tm(torch.tensor(nchw(x))).numpy()
    assert_close(b.apply(tv, x), expected, 1e-4, what="resnest50_fast logits")


# --------------------------------------------------------------------------------------------------
# Other options: dropout / DropBlock, rectified convs, norm_layer, errors


def test_final_drop_and_dropblock_train():
    model = R.resnet50(layers=(1, 1, 2, 1), dropblock_prob=0.2, final_drop=0.5, num_classes=10)
    x = random_input((2, 64, 64, 3), seed=8)
    variables = model.init(jax.random.key(0), x)
    stats = flatten_dict(variables["batch_stats"], sep="/")
    drop_keys = sorted(k for k in stats if "dropblock" in k)
    assert drop_keys and all(k.startswith(("layer3/", "layer4/")) for k in drop_keys)
    assert {k.split("/")[-2] for k in drop_keys} == {"dropblock1", "dropblock2", "dropblock3"}
    y_eval = model.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(model.apply(variables, x)))

    def train(seed):
        return model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(seed)},
        )

    (y1, s1), (y2, _) = train(1), train(2)
    assert np.all(np.isfinite(np.asarray(y1))) and not np.allclose(np.asarray(y1), np.asarray(y2))
    assert int(s1["batch_stats"]["layer3"]["0"]["dropblock1"]["i"]) == 1


def test_rectified_conv_and_sync_norm_layer_build_and_run():
    x = random_input((2, 64, 64, 3), seed=9)
    plain = R.resnest50(layers=(1, 1, 1, 1), num_classes=10)
    rect = R.resnest50(layers=(1, 1, 1, 1), num_classes=10, rectified_conv=True, rectify_avg=True)
    assert _count(_shapes(plain, x.shape)["params"]) == _count(_shapes(rect, x.shape)["params"])
    variables = rect.init(jax.random.key(0), x)
    y_rect, y_plain = rect.apply(variables, x), plain.apply(variables, x)
    assert np.all(np.isfinite(np.asarray(y_rect))) and not np.allclose(
        np.asarray(y_rect), np.asarray(y_plain)
    )
    sync_bn = functools.partial(SyncBatchNorm, axis_name="data")
    sync = R.resnet50s(layers=(1, 1, 1, 1), num_classes=10, norm_layer=sync_bn)
    sync_vars = sync.init(jax.random.key(0), x)
    ref = R.resnet50s(layers=(1, 1, 1, 1), num_classes=10)
    assert_close(sync.apply(sync_vars, x), ref.apply(sync_vars, x), 1e-6, what="SyncBatchNorm eval")


@pytest.mark.parametrize(
    "option", [{"radix": 2}, {"groups": 2}, {"bottleneck_width": 32}, {"avd": True}]
)
def test_basic_block_rejects_bottleneck_options(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"resnet18: .*{name}=.*block='basic'"):
        R.resnet18(**option)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"foo": 1}, r"resnet50: unknown option\(s\) \['foo'\]"),
        ({"pretrained": True}, r"resnet50: .*jaxenc\.models\.load_pretrained"),
        ({"dilation": 3}, r"resnet50: .*dilation must be 1 .*got 3"),
        ({"layers": (3, 4, 6)}, r"layers must be 4 block counts"),
        ({"radix": 0}, r"radix must be a positive integer"),
        ({"final_drop": 1.5}, r"final_drop must be a probability"),
        ({"block": "wide"}, r"block must be one of"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.resnet50(**kwargs)


def test_bad_input():
    model = R.resnet50(layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"ResNet: expected an NHWC image batch"):
        _shapes(model, (1, 3, 32, 32))
