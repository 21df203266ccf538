"""jaxenc.port.torch_to_flax: layout rules, strictness, error messages."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import torch
from parity import check_module_parity, random_input, randomise_batchnorm

from jaxenc.nn import BatchNorm, Conv2d
from jaxenc.port import torch_key, torch_to_flax


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.nn.BatchNorm2d(6), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class FlaxNet(nn.Module):
    """Mirrors TorchNet: a Sequential's children are named "0", "1", ..."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv2d(6, 3, padding=1, groups=2, name="0")(x)
        x = nn.relu(BatchNorm(name="1")(x, train=train))
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


class FlaxNetSeq(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv2d(6, 3, padding=1, groups=2, name="0")(x)
        return nn.relu(BatchNorm(name="1")(x, train=train))


class FlaxNetNested(nn.Module):
    """Nested module named like the torch Sequential attribute."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = FlaxNetSeq(name="features")(x, train)
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("train", [False, True])
def test_nested_sequential_grouped_conv_bn_linear(train):
    tm = TorchNet()
    randomise_batchnorm(tm)
    tm.train(train)
    x = random_input((2, 7, 9, 4))
    variables = torch_to_flax(FlaxNetNested(), tm.state_dict(), x)
    assert variables["params"]["features"]["0"]["kernel"].shape == (3, 3, 2, 6)
    assert variables["params"]["head"]["kernel"].shape == (6, 3)
    np.testing.assert_array_equal(
        variables["params"]["head"]["kernel"], tm.head.weight.detach().numpy().T
    )
    np.testing.assert_array_equal(
        variables["params"]["features"]["0"]["kernel"],
        tm.features[0].weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["features"]["1"]["var"], tm.features[1].running_var.numpy()
    )
    out = FlaxNetNested().apply(
        variables, x, train=train, mutable=["batch_stats"] if train else False
    )
    out = out[0] if train else out
    expected = tm(torch.tensor(x.transpose(0, 3, 1, 2))).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_conv1d_conv3d_kernel_layouts():
    c1 = torch.nn.Conv1d(3, 5, 4)
    v = torch_to_flax(
        nn.Conv(5, (4,), padding="VALID"), c1.state_dict(), np.zeros((1, 9, 3), np.float32)
    )
    x = random_input((2, 9, 3))
    y = nn.Conv(5, (4,), padding="VALID").apply(v, x)
    np.testing.assert_allclose(
        y,
        c1(torch.tensor(x.transpose(0, 2, 1))).detach().numpy().transpose(0, 2, 1),
        rtol=1e-5,
        atol=1e-6,
    )
    c3 = torch.nn.Conv3d(2, 3, (1, 3, 3))
    v = torch_to_flax(
        nn.Conv(3, (1, 3, 3), padding="VALID"),
        c3.state_dict(),
        np.zeros((1, 2, 5, 5, 2), np.float32),
    )
    assert v["params"]["kernel"].shape == (1, 3, 3, 2, 3)
    np.testing.assert_array_equal(
        v["params"]["kernel"], c3.weight.detach().numpy().transpose(2, 3, 4, 1, 0)
    )


def test_num_batches_tracked_is_dropped_and_numpy_and_bf16_accepted():
    tm = TorchNet()
    sd = {k: (v.numpy() if k.startswith("head") else v) for k, v in tm.state_dict().items()}
    sd["features.0.weight"] = tm.features[0].weight.detach().to(torch.bfloat16)
    assert "features.1.num_batches_tracked" in sd
    v = torch_to_flax(FlaxNetNested(), sd, np.zeros((1, 5, 5, 4), np.float32))
    assert v["params"]["features"]["0"]["kernel"].dtype == jnp.float32


def test_converted_arrays_do_not_alias_torch_memory():
    bn = torch.nn.BatchNorm2d(3)
    v = torch_to_flax(BatchNorm(), bn.state_dict(), np.zeros((2, 4, 4, 3), np.float32))
    bn.running_mean.add_(5.0)  # in-place, as a torch training step does
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3, np.float32))


def test_missing_key_names_the_key_and_flax_path():
    sd = TorchNet().state_dict()
    del sd["features.1.running_var"]
    with pytest.raises(
        ValueError,
        match=r"missing keys: 'features\.1\.running_var' \(for Flax batch_stats/features/1/var, shape \(6,\)\)",
    ):
        torch_to_flax(FlaxNetNested(), sd, np.zeros((1, 5, 5, 4), np.float32))


def test_unexpected_key_is_named():
    sd = dict(TorchNet().state_dict())
    sd["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected keys: 'extra\.weight'"):
        torch_to_flax(FlaxNetNested(), sd, np.zeros((1, 5, 5, 4), np.float32))


def test_shape_mismatch_names_key_and_both_shapes():
    sd = dict(TorchNet().state_dict())
    sd["features.0.weight"] = torch.zeros(6, 4, 3, 3)  # ungrouped weight for a groups=2 conv
    with pytest.raises(
        ValueError,
        match=r"shape mismatch: 'features\.0\.weight': torch shape \(6, 4, 3, 3\), expected \(6, 2, 3, 3\)",
    ):
        torch_to_flax(FlaxNetNested(), sd, np.zeros((1, 5, 5, 4), np.float32))


def test_all_problems_reported_at_once():
    sd = dict(TorchNet().state_dict())
    del sd["head.bias"]
    sd["bogus"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        torch_to_flax(FlaxNetNested(), sd, np.zeros((1, 5, 5, 4), np.float32))
    assert "'head.bias'" in str(info.value) and "'bogus'" in str(info.value)
    assert str(info.value).startswith("torch_to_flax(FlaxNetNested)")


def test_torch_key_mapping():
    assert torch_key("params", ("a", "1", "kernel")) == "a.1.weight"
    assert torch_key("params", ("bn", "scale")) == "bn.weight"
    assert torch_key("batch_stats", ("bn", "mean")) == "bn.running_mean"
    assert torch_key("batch_stats", ("bn", "var")) == "bn.running_var"
    assert torch_key("params", ("R",)) == "R"


def test_conv2d_parity_with_stride_dilation_groups_and_padding_modes():
    for kwargs in (
        dict(stride=2, padding=1),
        dict(dilation=2, padding=2, groups=4),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=(1, 2), padding_mode="circular", bias=False),
        dict(padding=1, padding_mode="replicate", stride=(2, 1)),
    ):
        tconv = torch.nn.Conv2d(4, 8, 3, **kwargs)
        check_module_parity(tconv, Conv2d(8, 3, **kwargs), random_input((2, 9, 7, 4)))


def test_conv2d_bad_input():
    with pytest.raises(
        ValueError, match=r"Conv2d: expected x of rank 4 \(N, H, W, C\), got shape \(4, 4\)"
    ):
        Conv2d(8, 3).init(torch_rng(), jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"Conv2d: in_channels=3 but the input has 4 channels"):
        Conv2d(8, 3, in_channels=3).init(torch_rng(), jnp.zeros((1, 5, 5, 4)))
    with pytest.raises(ValueError, match=r"Conv2d: in_channels=6 is not divisible by groups=4"):
        Conv2d(8, 3, groups=4).init(torch_rng(), jnp.zeros((1, 5, 5, 6)))
    with pytest.raises(ValueError, match=r"Conv2d: padding_mode must be one of"):
        Conv2d(8, 3, padding=1, padding_mode="mirror").init(torch_rng(), jnp.zeros((1, 5, 5, 4)))


def torch_rng():
    import jax

    return jax.random.key(0)


def test_state_absent_from_torch_is_zero_filled():
    from jaxenc.port import register_absent_in_torch

    class Counter(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.variable("batch_stats", "i", lambda: jnp.zeros((), jnp.int32))
            return Conv2d(2, 1, name="conv")(x)

    register_absent_in_torch(Counter, "i")
    conv = torch.nn.Conv2d(3, 2, 1)
    sd = {f"conv.{k}": v for k, v in conv.state_dict().items()}
    v = torch_to_flax(Counter(), sd, np.zeros((1, 2, 2, 3), np.float32))
    assert v["batch_stats"]["i"] == 0 and v["batch_stats"]["i"].dtype == jnp.int32
