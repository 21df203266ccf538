"""``train.evaluate``: upstream's test protocol on a trainer checkpoint, end to end.

Trains ``configs/tiny.py`` for 2 steps, then evaluates the checkpoint in single- and multi-scale
modes. The single-scale pass at the training size (scale 1.0, no flip, base = crop = image_size)
must reproduce the trainer's own held-out numbers exactly: the shapes images are already
image_size, so both paths run the same forward pass on the same pixels (exp is monotonic, so the
argmax of exp(logits) is that of the logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image
from tiny_config import tiny_config

from configs import tiny_cls
from train import evaluate
from train.trainer import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


_config = tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("evalrun")
    # A negligible lr keeps the checkpoint near its random initialisation, whose predictions cover
    # every class; a few real steps collapse the tiny model to all-background, which would make the
    # comparison with the trainer's numbers trivially true.
    config = _config(
        **{
            "train.num_steps": 2,
            "optim.warmup_steps": 1,
            "optim.lr": 1e-6,
            "train.sample_predictions": 0,
        }
    )
    result = train_and_evaluate(config, workdir)
    return config, workdir, result


def test_single_scale_equals_trainer_eval(trained, tmp_path):
    config, workdir, result = trained
    out = evaluate.evaluate_checkpoint(
        config,
        workdir,
        tmp_path / "ss",
        overrides={
            "mode": "single_scale",
            "base_size": SIZE,
            "crop_size": SIZE,
            "save_predictions": 12,
            "batch_size": 3,
        },
        log=lambda msg: None,
    )
    assert out["step"] == 2 and out["num_images"] == config.dataset.num_val
    assert out["mode"] == "single_scale" and out["scales"] == [1.0] and out["flip"] is False
    assert out["mIoU"] == pytest.approx(result["mIoU"], abs=1e-12)
    assert out["pixAcc"] == pytest.approx(result["pixAcc"], abs=1e-12)
    written = json.loads((tmp_path / "ss" / "eval_metrics.json").read_text())
    assert written["mIoU"] == out["mIoU"] and written["IoU"] == out["IoU"]
    assert (
        written["class_names"][0] == "background"
        and len(written["IoU"]) == config.dataset.num_classes
    )
    pngs = sorted(p.name for p in (tmp_path / "ss" / "predictions").iterdir())
    assert pngs == sorted(f"{i:05d}{suffix}.png" for i in range(12) for suffix in ("", "_pred"))
    predicted = set()
    for i in range(12):
        with Image.open(tmp_path / "ss" / "predictions" / f"{i:05d}_pred.png") as im:
            predicted |= set(np.unique(np.asarray(im)).tolist())
    assert len(predicted) >= 3, predicted  # a non-trivial prediction (see the fixture)
    with Image.open(tmp_path / "ss" / "predictions" / "00000.png") as im:
        assert im.size == (3 * SIZE, SIZE)
    with Image.open(tmp_path / "ss" / "predictions" / "00001_pred.png") as im:
        assert im.mode == "P" and im.size == (SIZE, SIZE)


def test_multi_scale_from_config_eval(trained, tmp_path):
    config, workdir, _ = trained
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval = ml_collections.ConfigDict(
        dict(
            mode="multi_scale",
            scales=(0.5, 1.0, 1.5),
            flip=True,
            base_size=SIZE,
            crop_size=SIZE,
            num_images=5,
            save_predictions=1,
            batch_size=4,
        )
    )
    out = evaluate.evaluate_checkpoint(
        config, workdir / "best", tmp_path / "ms", log=lambda msg: None
    )
    assert out["step"] == 2 and out["num_images"] == 5
    assert out["scales"] == [0.5, 1.0, 1.5] and out["flip"] is True and out["mode"] == "multi_scale"
    for key in ("pixAcc", "mIoU"):
        assert 0.0 <= out[key] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in out["IoU"])
    assert (tmp_path / "ms" / "eval_metrics.json").is_file()
    assert (tmp_path / "ms" / "predictions" / "00000.png").is_file()


def test_recipe_eval_section_follows_the_image_size():
    c = _config(**{"dataset.image_size": 48})
    s = evaluate.eval_settings(c)
    assert (s.base_size, s.crop_size, s.mode, s.flip) == (48, 48, "multi_scale", True)


def test_settings_defaults_and_errors():
    c = _config()
    del c["eval"]  # a config without an eval section gets upstream's defaults
    s = evaluate.eval_settings(c)
    assert s.mode == "multi_scale" and s.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and s.flip
    assert (s.base_size, s.crop_size, s.split, s.num_images) == (
        520,
        c.dataset.image_size,
        "validation",
        0,
    )
    assert evaluate.eval_settings(c, {"mode": "single_scale", "flip": True}).scales == (1.0,)
    with pytest.raises(ValueError, match="config.eval.mode"):
        evaluate.eval_settings(c, {"mode": "ms"})
    with pytest.raises(ValueError, match="config.eval.scales"):
        evaluate.eval_settings(c, {"scales": ()})
    with pytest.raises(ValueError, match="config.eval.crop_size"):
        evaluate.eval_settings(c, {"crop_size": 0})


def test_resolve_checkpoint(trained, tmp_path):
    _, workdir, _ = trained
    step_dir, step, wd = evaluate.resolve_checkpoint(workdir)
    assert (step_dir.parent.name, step, wd) == ("checkpoints", 2, workdir.resolve())
    assert evaluate.resolve_checkpoint(workdir, use_best=True)[0].parent.name == "best"
    assert evaluate.resolve_checkpoint(workdir / "checkpoints" / "2")[1] == 2
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        evaluate.resolve_checkpoint(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)does not exist.*not a model-store name.*deeplab_resnest50_ade",
    ):
        evaluate.resolve_checkpoint("deeplab_resnest50_adee")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m train.evaluate ARGS`` in the repository, on CPU, without progress bars."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAXENC_NO_PROGRESS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, "-m", "train.evaluate", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_cli_smoke(trained, tmp_path):
    _, workdir, _ = trained
    proc = _run_cli(
        "--config",
        "configs/tiny.py",
        "--checkpoint",
        str(workdir),
        "--outdir",
        str(tmp_path),
        "--scales",
        "0.75,1.25",
        "--base_size",
        str(SIZE),
        "--num_images",
        "2",
        "--save_predictions",
        "1",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mIoU" in proc.stdout and "background" in proc.stdout
    out = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert out["scales"] == [0.75, 1.25] and out["num_images"] == 2 and out["step"] == 2
    assert 0.0 <= out["mIoU"] <= 1.0


def test_published_weights_file_gives_the_checkpoints_numbers(trained, tmp_path):
    """``--checkpoint`` may be a weights file (how published store weights are evaluated)."""
    import jax

    from jaxenc.models import store
    from train import finetune
    from train.trainer import build_model

    config, workdir, _ = trained
    shapes = jax.eval_shape(
        lambda: build_model(config).init(
            jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32)
        )
    )
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    variables = finetune.load_params_for_finetune(workdir, dict(target))
    store.save_checkpoint(tmp_path / "exported.msgpack", jax.tree.map(np.asarray, variables))
    settings = {"mode": "single_scale", "base_size": SIZE, "crop_size": SIZE, "save_predictions": 0}
    from_ckpt = evaluate.evaluate_checkpoint(
        config, workdir, tmp_path / "a", overrides=settings, log=lambda m: None
    )
    from_file = evaluate.evaluate_checkpoint(
        config,
        tmp_path / "exported.msgpack",
        tmp_path / "b",
        overrides=settings,
        log=lambda m: None,
    )
    assert from_file["mIoU"] == from_ckpt["mIoU"] and from_file["IoU"] == from_ckpt["IoU"]
    assert from_file["step"] is None and from_file["checkpoint"].endswith("exported.msgpack")


@pytest.mark.slow
def test_cli_recognition_exits_zero(tmp_path):
    """A recognition run: top-1/top-5 printed and written, exit code 0 (it used to end in a
    KeyError on the segmentation metric)."""
    config = tiny_cls.get_config()
    config.train.num_steps = 2
    config.optim.warmup_steps = 1
    config.train.eval_every = 2
    config.train.sample_predictions = 0
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir)
    proc = _run_cli(
        "--config",
        "configs/tiny_cls.py",
        "--checkpoint",
        str(workdir),
        "--outdir",
        str(tmp_path / "eval"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "top-1" in proc.stdout and "Traceback" not in proc.stderr
    out = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert 0.0 <= out["top1"] <= out["top5"] <= 1.0
