"""The real-data recipes in configs/ carry upstream's hyper-parameters (its experiments/ scripts)
and build the very networks whose published weights the model store lists."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxenc import models
from jaxenc.models import store
from train import evaluate
from train.data import augment, pipeline
from train.trainer import build_model

REPO = Path(__file__).resolve().parents[1]

# recipe -> (dataset, classes, train images, epochs, lr @ reference batch, store weights of the same network)
# fmt: off
SEGMENTATION = {
    "ade20k_encnet_resnet50s": ("ade20k", 150, 20210, 180, 0.004, "encnet_resnet50s_ade"),
    "ade20k_fcn_resnest50": ("ade20k", 150, 20210, 180, 0.004, "fcn_resnest50_ade"),
    "ade20k_deeplab_resnest50": ("ade20k", 150, 20210, 180, 0.004, "deeplab_resnest50_ade"),
    "pcontext_encnet_resnet50s": ("pcontext", 59, 4998, 80, 0.001, "encnet_resnet50s_pcontext"),
    "pcontext_deeplab_resnest50": ("pcontext", 59, 4998, 80, 0.001, "deeplab_resnest50_pcontext"),
    "cityscapes_deeplab_resnest50": ("cityscapes", 19, 2975, 240, 0.004, None),
}
# fmt: on
# fmt: off
RECOGNITION = {
    "imagenet_resnest50": ("imagenet2012", 1000, 1_281_167, 270, 0.1, "resnest50"),
    "minc_deepten_resnet50s": ("minc", 23, 48_875, 80, 0.004, "deepten_resnet50_minc"),
}
# fmt: on


def _recipe(name):
    return importlib.import_module(f"configs.{name}").get_config()


def _param_shapes(model, size=64):
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    return jax.tree.map(lambda s: s.shape, shapes["params"])


def test_every_recipe_file_is_listed():
    files = {p.stem for p in (REPO / "configs").glob("*.py")} - {
        "__init__",
        "common",
        "default",
        "tiny",
        "tiny_cls",
    }
    assert files == set(SEGMENTATION) | set(RECOGNITION)


@pytest.mark.parametrize("name", sorted(SEGMENTATION))
def test_segmentation_recipe_is_upstreams(name):
    dataset, classes, num_train, epochs, lr, weights = SEGMENTATION[name]
    c = _recipe(name)
    assert (c.task, c.dataset.name, c.dataset.num_classes) == ("segmentation", dataset, classes)
    assert (c.input.global_batch_size, c.dataset.image_size, c.input.base_size) == (16, 480, 520)
    assert c.train.num_steps == epochs * (num_train // 16)  # drop_last batches
    o = c.optim
    assert (o.name, o.lr, o.lr_batch_reference, o.momentum, o.weight_decay) == (
        "sgd",
        lr,
        16,
        0.9,
        1e-4,
    )
    assert (o.schedule, o.poly_power, o.warmup_steps, o.head_lr_mult, o.nesterov) == (
        "poly",
        0.9,
        0,
        10.0,
        False,
    )
    assert c.model.norm == "sync_bn" and c.model.kwargs.aux and c.loss.aux_weight == 0.2
    assert c.model.kwargs.get("se_loss", False) == (c.model.name == "encnet")
    assert c.model.backbone_pretrained in models.pretrained_model_list()
    # Upstream's augmentation and evaluation protocol.
    train_t = pipeline.transform_from_config(
        c.input, task=c.task, image_size=c.dataset.image_size, train=True
    )
    val_t = pipeline.transform_from_config(
        c.input, task=c.task, image_size=c.dataset.image_size, train=False
    )
    assert isinstance(train_t, augment.UpstreamSegTrain) and isinstance(
        val_t, augment.UpstreamSegVal
    )
    assert (train_t.base_size, train_t.crop_size, train_t.scale) == (520, 480, (0.5, 2.0))
    settings = evaluate.eval_settings(c)
    scales = (
        (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25)
        if dataset == "cityscapes"
        else (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    )
    assert (settings.mode, settings.scales, settings.flip) == ("multi_scale", scales, True)
    assert (settings.base_size, settings.crop_size) == (520, 480)
    # The recipe's network is the published one: same parameter tree as the store's model.
    if weights is not None:
        store_model = models.get_model(store.pretrained_entry(weights).model)
        assert _param_shapes(build_model(c)) == _param_shapes(store_model)


@pytest.mark.parametrize("name", sorted(RECOGNITION))
def test_recognition_recipe_is_upstreams(name):
    dataset, classes, num_train, epochs, lr, weights = RECOGNITION[name]
    c = _recipe(name)
    batch = c.input.global_batch_size
    assert (c.task, c.dataset.name, c.dataset.num_classes, c.dataset.image_size) == (
        "recognition",
        dataset,
        classes,
        224,
    )
    assert c.train.num_steps == epochs * (num_train // batch)
    assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.nesterov) == ("sgd", lr, 0.9, False)
    if name == "imagenet_resnest50":
        # 0.1 per 256 images at a global batch of 2048 (0.8), cosine, 5 warmup epochs, and the tricks.
        assert (batch, c.optim.lr_batch_reference, c.optim.schedule) == (2048, 256, "cosine")
        assert c.optim.warmup_steps == 5 * (num_train // batch)
        assert (c.loss.label_smoothing, c.loss.mixup_alpha, c.optim.no_bn_wd) == (0.1, 0.2, True)
        assert tuple(c.input.rand_augment) == (2, 12) and c.model.kwargs.last_gamma
        train_t = pipeline.transform_from_config(c.input, task=c.task, image_size=224, train=True)
        assert isinstance(train_t, augment.ImageNetTrain)
    else:
        assert (batch, c.optim.weight_decay, c.optim.schedule) == (512, 5e-4, "step")
        assert (
            tuple(c.optim.step_boundaries) == (60 * (num_train // batch),)
            and c.optim.step_gamma == 0.1
        )
        train_t = pipeline.transform_from_config(c.input, task=c.task, image_size=224, train=True)
        assert isinstance(train_t, augment.MincTrain)
    store_model = models.get_model(store.pretrained_entry(weights).model)
    assert _param_shapes(build_model(c)) == _param_shapes(store_model)


def test_recipe_on_the_command_line_without_data_says_where_the_data_goes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAXENC_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.main",
            "--config",
            "configs/ade20k_fcn_resnest50.py",
            "--workdir",
            str(tmp_path / "run"),
            f"--config.dataset.data_dir={tmp_path / 'nodata'}",
            "--config.dataset.backend=folder",
            "--config.optim.lr=0.01",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "FileNotFoundError" in proc.stderr and "ADEChallengeData2016" in proc.stderr, (
        proc.stderr[-2000:]
    )
