"""jaxenc.export: StableHLO and ONNX artifacts of every model family match model.apply; the CLI.

One representative per family at small sizes (reduced depths and widths where the registry allows):
the ResNet family (ResNeXt here; ResNeSt and ResNet-S run as the heads' backbones), WideResNet,
Xception, DeepTEN and the 8 segmentation models. Variables are random but torch-scaled (drawn on
the host from the shapes, so no init program is compiled), BatchNorm statistics included, so the
eval-mode normalisation is exercised. References are ``model.apply`` under ``jax.jit``, computed once
per module and shared by both formats. The two CLI runs start in the background at the beginning of
the module (subprocesses) and are collected by their tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxenc import export, models
from jaxenc.models.segmentation import SEGMENTATION_MODEL_NAMES, BaseNet

REPO = Path(__file__).resolve().parents[1]
SMALL = {"layers": (1, 1, 1, 1), "stage_planes": (8, 16, 32, 64)}
SIZE = 32
BATCH = 2

# name -> constructor options (reduced sizes of the same family code)
SEGMENTATION = {
    "fcn_resnest50": {},
    "psp_resnet50s": {},
    "encnet_resnet50s": {},
    "deeplab_resnest50": {},
    "upernet_resnet50s": {},
    "fcfpn_resnet50s": {},
    "atten_resnest50": {},
    "danet_resnet50s": {},
}
RECOGNITION = {
    "resnext50_32x4d": {"layers": (1, 1, 1, 1), "stage_planes": (16, 32, 64, 128)},
    "wideresnet38": {"layers": (1, 1, 1, 1, 1, 1)},
    "xception65": {"num_middle_blocks": 1},
    "deepten_resnet50_minc": {},
}
CASES = [*SEGMENTATION, *RECOGNITION]


def random_variables(model, x, seed: int = 0) -> dict:
    """Variables of ``model`` for input ``x``, drawn from numpy with torch-like scales: kernels
    N(0, 2 / fan_in), biases N(0, 0.1), norm scales U(0.8, 1.2), running means N(0, 0.1), running
    variances U(0.8, 1.2), Encoding smoothing factors U(-1, 0), other leaves N(0, 0.5)."""
    shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, train=False), x)
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in flatten_dict(shapes).items():
        leaf, shape = path[-1], s.shape
        if leaf == "kernel":
            v = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif leaf == "bias":
            v = rng.normal(0, 0.1, shape)
        elif leaf == "scale":
            v = rng.uniform(-1, 0, shape) if "encoding" in path else rng.uniform(0.8, 1.2, shape)
        elif leaf == "mean":
            v = rng.normal(0, 0.1, shape)
        elif leaf == "var":
            v = rng.uniform(0.8, 1.2, shape)
        else:
            v = rng.normal(0, 0.5, shape)
        out[path] = jnp.asarray(v, s.dtype)
    return unflatten_dict(out)


def build(name: str, **options):
    key = "nclass" if name in SEGMENTATION_MODEL_NAMES else "num_classes"
    if name in SEGMENTATION:
        options = {"backbone_kwargs": SMALL, **options}
    return models.get_model(name, **{key: 5}, **options)


def images(batch: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)


def max_rel_error(got, ref) -> float:
    """max |got - ref| / max |ref| over all outputs (the error relative to each output's scale)."""
    got, ref = jax.tree.leaves(got), jax.tree.leaves(ref)
    assert len(got) == len(ref)
    errs = []
    for g, r in zip(got, ref):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert g.shape == r.shape
        errs.append(float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-30)))
    return max(errs)


def max_abs_error(got, ref) -> float:
    got, ref = jax.tree.leaves(got), jax.tree.leaves(ref)
    assert len(got) == len(ref)
    return max(
        float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(r, np.float32))))
        for g, r in zip(got, ref)
    )


class Case:
    def __init__(self, name: str):
        options = {**SEGMENTATION, **RECOGNITION}[name]
        self.name = name
        self.model = build(name, **options)
        self.x = images(BATCH, SIZE, SIZE)
        self.variables = random_variables(self.model, self.x)
        self.ref = jax.jit(lambda v, x: self.model.apply(v, x, train=False))(self.variables, self.x)
        scale = max(float(np.max(np.abs(np.asarray(r)))) for r in jax.tree.leaves(self.ref))
        # A comparison is only as good as the outputs are informative: no vanished activations.
        assert 1e-2 < scale < 1e4, (name, scale)


@pytest.fixture(scope="module")
def cases():
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = Case(name)
        return built[name]

    return get


# --- the CLI runs, started first so that they overlap the in-process tests -------------------------


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jaxenc.export", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """The two end-to-end CLI exports, running in the background: a recognition recipe to StableHLO
    with random weights (bfloat16, symbolic batch and size) and a segmentation recipe to ONNX with
    weights from a .msgpack written here."""
    pytest.importorskip("jax2onnx", reason="ONNX converter not installed (see .ci/setup)")
    d = tmp_path_factory.mktemp("cli")
    target = export.build_target(str(REPO / "configs/tiny.py"))
    variables = random_variables(target.model, images(1, 32, 32), seed=3)
    models.save_checkpoint(d / "tiny.msgpack", variables)
    runs = {
        "stablehlo": _cli(
            "configs/tiny_cls.py",
            "--format=stablehlo",
            f"--output={d / 'cls.jax_exported'}",
            "--random-weights",
            "--dtype=bfloat16",
            "--dynamic=batch,size",
        ),
        "onnx": _cli(
            "configs/tiny.py",
            "--format=onnx",
            f"--output={d / 'seg.onnx'}",
            f"--weights={d / 'tiny.msgpack'}",
            "--dynamic=batch",
        ),
    }
    yield {"dir": d, "runs": runs, "target": target, "variables": variables}
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "wrote " in out
    return out


# --- coverage of the registry -----------------------------------------------------------------------


def _family(model) -> str:
    """A segmentation model's class, else the module that defines the network (Xception65/71 are
    one family, ResNet/ResNeSt/ResNeXt another)."""
    return type(model).__name__ if isinstance(model, BaseNet) else type(model).__module__


def test_every_registered_family_has_a_representative():
    covered = {
        _family(build(name, **opts)) for name, opts in {**SEGMENTATION, **RECOGNITION}.items()
    }
    for name in models.list_models():
        assert _family(models.get_model(name)) in covered, name
    assert len({_family(build(n)) for n in SEGMENTATION}) == 8  # the 8 heads


# --- StableHLO --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_stablehlo_matches_model_apply(name, cases):
    case = cases(name)
    blob = export.export_stablehlo(
        case.model, case.variables, image_size=SIZE, dynamic="batch", outputs="all"
    )
    f = export.load_stablehlo(blob)
    assert f.input_shape == f"(b, {SIZE}, {SIZE}, 3)"
    got = f(case.x)
    assert jax.tree.structure(got) == jax.tree.structure(case.ref)
    assert max_rel_error(got, case.ref) <= 1e-4


@pytest.mark.parametrize("name", ["psp_resnet50s", "encnet_resnet50s"])
def test_stablehlo_symbolic_height_and_width(name, cases, tmp_path):
    case = cases(name)
    path = tmp_path / "model.jax_exported"
    export.write_artifact(
        path,
        export.export_stablehlo(
            case.model, case.variables, image_size=SIZE, dynamic="batch,size", outputs="main"
        ),
    )
    f = export.load(path)
    assert f.input_shape == "(b, 32*h, 32*w, 3)"
    # The module's reference at (2, 32, 32), and a second batch and size against model.evaluate.
    assert max_rel_error(f(case.x), case.ref[0]) <= 1e-4
    x = images(1, 64, 96, seed=7)
    ref = jax.jit(lambda x: case.model.apply(case.variables, x, method=type(case.model).evaluate))(
        x
    )
    got = f(x)
    assert got.shape == (1, 64, 96, 5)
    assert max_rel_error(got, ref) <= 1e-4
    with pytest.raises(
        ValueError, match=r"takes input \(b, 32\*h, 32\*w, 3\).*got shape \(1, 40, 32, 3\)"
    ):
        f(images(1, 40, 32))
    with pytest.raises(ValueError, match=r"takes input .*got shape \(1, 32, 32\)"):
        f(np.zeros((1, 32, 32), np.float32))


def test_symbolic_resize_equals_static_resize():
    """The jnp-built interpolation and pooling matrices (symbolic sizes) equal the numpy ones."""
    from jaxenc.nn.resample import adaptive_avg_pool2d, avg_pool2d, interpolate_bilinear

    def ops(x):
        return (
            interpolate_bilinear(x, (x.shape[1] * 2 - 3, x.shape[2] + 5), align_corners=True),
            interpolate_bilinear(x, (x.shape[1] + 7, x.shape[2] * 3), align_corners=False),
            interpolate_bilinear(x, scale_factor=2, align_corners=False),
            adaptive_avg_pool2d(x, (3, 6)),
            adaptive_avg_pool2d(x, (None, 1)),
            avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False),
            avg_pool2d(x, 3, 2, padding=1),
        )

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 8*h, 8*w") + (2,), jnp.float32)
    f = jax.export.export(jax.jit(ops))(spec)
    for shape in [(1, 8, 16, 2), (2, 24, 8, 2)]:
        x = np.random.default_rng(shape[1]).normal(size=shape).astype(np.float32)
        for got, ref in zip(f.call(x), jax.jit(ops)(x)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-6, atol=2e-6)


def test_symbolic_sizes_that_are_not_decidable_raise():
    from jaxenc.nn.resample import avg_pool2d, interpolate_bilinear

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, h, w") + (2,), jnp.float32)
    with pytest.raises(
        ValueError, match=r"avg_pool2d: the output height for the symbolic input height h"
    ):
        jax.export.export(jax.jit(lambda x: avg_pool2d(x, 2, 2, ceil_mode=True)))(spec)
    with pytest.raises(ValueError, match=r"scale_factor=1.5 with a symbolic input size h"):
        jax.export.export(jax.jit(lambda x: interpolate_bilinear(x, scale_factor=1.5)))(spec)
    with pytest.raises(ValueError, match="size must be an int or a pair of positive ints, got"):
        interpolate_bilinear(jnp.zeros((1, 4, 4, 1)), (0, 3))


# --- ONNX -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_onnx_matches_model_apply(name, cases, tmp_path):
    pytest.importorskip("jax2onnx", reason="ONNX converter not installed (see .ci/setup)")
    case = cases(name)
    path = tmp_path / "model.onnx"
    export.write_artifact(
        path, export.export_onnx(case.model, case.variables, image_size=SIZE, dynamic="batch")
    )
    f = export.load(path)
    assert f.input_shape == ("B", SIZE, SIZE, 3)
    got = f(case.x)
    assert jax.tree.structure(got) == jax.tree.structure(case.ref)
    scale = max(1.0, max(float(np.max(np.abs(np.asarray(r)))) for r in jax.tree.leaves(case.ref)))
    # float32 ONNX vs XLA: 1e-4 absolute for outputs of unit scale (relative beyond it).
    assert max_abs_error(got, case.ref) <= 1e-4 * scale


def test_onnx_symbolic_height_and_width(cases):
    """Free symbolic H, W (any size) where the network's shape logic traces with them (ResNet-S
    backbones); ResNeSt's average pools do not, and say so."""
    pytest.importorskip("jax2onnx", reason="ONNX converter not installed (see .ci/setup)")
    case = cases("psp_resnet50s")
    blob = export.export_onnx(
        case.model, case.variables, image_size=SIZE, dynamic="batch,size", outputs="main"
    )
    f = export.load_onnx(blob)
    assert f.input_shape == ("B", "H", "W", 3)
    assert max_abs_error(f(case.x), case.ref[0]) <= 1e-4 * max(
        1.0, float(jnp.max(jnp.abs(case.ref[0])))
    )
    x = images(1, 40, 56, seed=9)
    ref = jax.jit(lambda x: case.model.apply(case.variables, x, method=type(case.model).evaluate))(
        x
    )
    assert max_abs_error(f(x), ref) <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(ref))))
    resnest = cases("fcn_resnest50")
    with pytest.raises(
        ValueError, match="FCN does not convert to ONNX with free symbolic height and width"
    ):
        export.export_onnx(resnest.model, resnest.variables, image_size=SIZE, dynamic="size")


# --- the CLI ----------------------------------------------------------------------------------------


def test_cli_stablehlo_random_weights_bfloat16(cli_runs):
    out = _finished(cli_runs["runs"]["stablehlo"])
    f = export.load(cli_runs["dir"] / "cls.jax_exported")
    assert f.input_shape == "(b, 32*h, 32*w, 3)"
    for shape in [(1, 32, 32), (2, 64, 32)]:
        logits = f(images(*shape))
        assert logits.shape == (shape[0], 5) and logits.dtype == jnp.bfloat16, out
        assert bool(jnp.all(jnp.isfinite(logits.astype(jnp.float32))))


def test_cli_onnx_with_msgpack_weights_matches_model_apply(cli_runs):
    _finished(cli_runs["runs"]["onnx"])
    f = export.load(cli_runs["dir"] / "seg.onnx")
    x = images(3, 32, 32, seed=5)
    model, variables = cli_runs["target"].model, cli_runs["variables"]
    ref = jax.jit(lambda x: model.apply(variables, x, train=False))(x)
    got = f(x)
    assert isinstance(got, tuple) and len(got) == len(ref) == 3  # main, se, aux
    assert max_abs_error(got, ref) <= 1e-4 * max(1.0, max(float(jnp.max(jnp.abs(r))) for r in ref))
    with pytest.raises(
        ValueError,
        match=r"takes input \(B, 32, 32, 3\) float32 \(NHWC\), got shape \(1, 64, 32, 3\)",
    ):
        f(images(1, 64, 32))


# --- errors -----------------------------------------------------------------------------------------


def _cli_error(capsys, *args: str) -> str:
    from jaxenc.export.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_unknown_name_lists_close_names(capsys, tmp_path):
    err = _cli_error(capsys, "resnest5", "--format=onnx", f"--output={tmp_path / 'm.onnx'}")
    assert "unknown model 'resnest5'; did you mean 'resnest50'" in err


def test_cli_refuses_random_weights_unless_asked(capsys, tmp_path):
    err = _cli_error(capsys, "resnet18", "--format=stablehlo", f"--output={tmp_path / 'm.bin'}")
    assert "no --weights given" in err and "--random-weights" in err
    assert not (tmp_path / "m.bin").exists()


def test_cli_unwritable_output_fails_before_conversion(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _cli_error(
        capsys,
        "resnet18",
        "--format=stablehlo",
        f"--output={blocker / 'm.bin'}",
        "--random-weights",
    )
    assert f"cannot write the output {blocker / 'm.bin'}" in err
    err = _cli_error(
        capsys, "resnet18", "--format=stablehlo", f"--output={tmp_path}", "--random-weights"
    )
    assert "is a directory" in err


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    small = export.build_target("resnet18", nclass=5, model_kwargs=SMALL)
    models.save_checkpoint(
        tmp_path / "r18.msgpack", random_variables(small.model, images(1, 32, 32))
    )
    other = export.build_target("resnet18", nclass=7, model_kwargs=SMALL)
    with pytest.raises(
        ValueError,
        match=r"(?s)weights .*r18\.msgpack do not fit resnet18.*params/fc/kernel: shape \(64, 5\) in the checkpoint, \(64, 7\)",
    ):
        export.target_variables(other, weights=str(tmp_path / "r18.msgpack"), image_size=(32, 32))
    with pytest.raises(ValueError, match="no weights given for resnet18"):
        export.target_variables(other)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"dynamic must name axes among \('batch', 'size'\)"):
        export.input_spec(32, dynamic="height")
    with pytest.raises(ValueError, match="image_size .* is not one"):
        export.input_spec((32, 48), dynamic="size")
    with pytest.raises(FileNotFoundError, match="config file .*nope.py does not exist"):
        export.build_target("configs/nope.py")
    bf16 = export.build_target("resnet18", dtype="bfloat16", model_kwargs=SMALL)
    with pytest.raises(ValueError, match="ONNX export is float32 only"):
        export.export_onnx(bf16.model, {}, image_size=32)
    with pytest.raises(ValueError, match="is not a jaxenc.export.stablehlo artifact"):
        export.load_stablehlo(b"not an artifact")
