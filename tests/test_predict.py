"""``train.predict``: a model on a user's own images (files or folders, any size and PIL mode).

Random weights of the tiny recipes (``configs/tiny.py``, ``configs/tiny_cls.py``) saved as a native
``.msgpack`` stand in for a trained model: what is checked is that the written files are what the
evaluation protocol (segmentation) or the validation transform + softmax (recognition) give for each
image, at the input's size, and that unreadable files are reported and skipped.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from random_weights import save_random_weights

from configs import tiny, tiny_cls
from jaxenc.models import multi_eval
from train import predict
from train.data import arrays, pipeline
from train.trainer import build_model

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
# Two scales around a base larger than the window: resizing, flip and sliding windows all happen.
SEG_SETTINGS = {"scales": (0.75, 1.25), "flip": True, "base_size": 48, "batch_size": 4}
# (file name, PIL mode, (width, height)): odd, non-square, and the common non-RGB modes.
SEG_IMAGES = [
    ("rgb.png", "RGB", (70, 45)),
    ("grey.png", "L", (33, 33)),
    ("rgba.png", "RGBA", (29, 40)),
    ("palette.png", "P", (37, 50)),
]


def _random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random RGB picture (so that the model sees structure, not only noise) in ``mode``."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    rgb = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 21, (h, w, 3))
    rgb = Image.fromarray(np.clip(np.asarray(rgb, np.int64) + noise, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        rgba = np.concatenate([np.asarray(rgb), alpha[..., None]], axis=-1)
        return Image.fromarray(rgba)
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """The tiny segmentation recipe, random weights as a .msgpack, a folder of images."""
    root = tmp_path_factory.mktemp("predict_seg")
    config = tiny.get_config()
    variables = save_random_weights(config, root / "weights.msgpack")
    folder = root / "images"
    folder.mkdir()
    for i, (name, mode, size) in enumerate(SEG_IMAGES):
        _random_image(mode, size, i).save(folder / name)
    other = root / "other"
    other.mkdir()
    _random_image("RGB", (41, 23), 9).save(other / "rgb.jpg", quality=95)  # the stem of rgb.png
    apply = multi_eval.make_sharded_predict(build_model(config), variables)
    return config, apply, root


def _expected_labels(config, apply, rgb: np.ndarray, **settings) -> np.ndarray:
    """The evaluation protocol called directly on the normalised image (not through predict), with
    ``settings`` (base_size, scales, flip, batch_size) in place of SEG_SETTINGS' values."""
    settings = {**SEG_SETTINGS, **settings}
    mean, std = tuple(config.input.mean), tuple(config.input.std)
    image = arrays.normalise_uint8(rgb, mean, std)
    return multi_eval.multi_scale_predict(
        apply,
        image,
        num_classes=config.dataset.num_classes,
        base_size=settings["base_size"],
        crop_size=config.dataset.image_size,
        scales=settings["scales"],
        flip=settings["flip"],
        mean=mean,
        std=std,
        batch_size=settings["batch_size"],
    )


SINGLE_SCALE = {"scales": (1.0,), "flip": False, "batch_size": 8}  # what --mode single_scale runs


def test_segmentation_writes_the_protocols_labels_at_input_size(seg, tmp_path):
    config, apply, root = seg
    inputs = [root / "images", root / "other" / "rgb.jpg"]
    report = predict.predict_images(
        config,
        root / "weights.msgpack",
        inputs,
        tmp_path,
        overrides=SEG_SETTINGS,
        progress=False,
        log=lambda msg: None,
    )
    assert report.failed == () and len(report.written) == len(SEG_IMAGES) + 1
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    by_path = {Path(r["path"]).name if "other" not in r["path"] else "other": r for r in rows}
    # the two stems "rgb" do not overwrite each other: input order decides who gets "rgb"
    assert by_path["rgb.png"]["label"] == "rgb.png" and by_path["other"]["label"] == "rgb-2.png"
    palette = pipeline.palette(config.dataset)
    seen = set()
    for name, _, size in [*SEG_IMAGES, ("other", "RGB", (41, 23))]:
        row = by_path[name]
        src = root / "other" / "rgb.jpg" if name == "other" else root / "images" / name
        rgb = predict.read_image(src)
        expected = _expected_labels(config, apply, rgb)
        with Image.open(tmp_path / row["label"]) as im:
            assert im.mode == "P" and im.size == size, (name, im.mode, im.size)
            got = np.asarray(im)
            pal = np.asarray(im.getpalette()[: 3 * len(palette)], np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(pal, palette)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        with Image.open(tmp_path / row["overlay"]) as im:
            assert im.mode == "RGB" and im.size == size
            overlay = np.asarray(im).astype(np.int64)
        blend = np.rint(0.5 * rgb + 0.5 * palette[expected].astype(np.float64))
        assert np.abs(overlay - blend).max() <= 1, name
        assert row["size"] == list(size)
        seen |= set(np.unique(got).tolist())
    assert len(seen) >= 2, seen  # the comparison is not between two constant maps


def test_single_scale_mode_override(seg, tmp_path):
    config, apply, root = seg
    src = root / "images" / "rgb.png"
    predict.predict_images(
        config,
        root / "weights.msgpack",
        [src],
        tmp_path,
        overrides={"mode": "single_scale", "base_size": 48},
        progress=False,
        log=lambda msg: None,
    )
    expected = _expected_labels(
        config, apply, predict.read_image(src), base_size=48, **SINGLE_SCALE
    )
    with Image.open(tmp_path / "rgb.png") as im:
        np.testing.assert_array_equal(np.asarray(im), expected)


def test_max_size_predicts_smaller_and_writes_the_input_size(seg, tmp_path):
    config, apply, root = seg
    src = root / "images" / "rgb.png"  # 70 x 45
    predict.predict_images(
        config,
        root / "weights.msgpack",
        [src],
        tmp_path,
        overrides={"mode": "single_scale", "base_size": 40},
        max_size=40,
        progress=False,
        log=lambda msg: None,
    )
    small = arrays.resize_image(predict.read_image(src), 40, 26, "bilinear")
    expected = _expected_labels(config, apply, small, base_size=40, **SINGLE_SCALE)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.size == (70, 45)
        np.testing.assert_array_equal(np.asarray(im), arrays.resize_mask(expected, 70, 45))
    with pytest.raises(ValueError, match="--max_size must be an integer >= 0"):
        predict.predict_images(config, root / "weights.msgpack", [src], tmp_path, max_size=-1)


def test_recognition_top_k_is_the_softmax_of_the_validation_crop(tmp_path):
    config = tiny_cls.get_config()
    variables = save_random_weights(config, tmp_path / "cls.msgpack")
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = {"a.png": (50, 31), "b.jpg": (32, 32), "c.png": (17, 64)}
    for i, (name, size) in enumerate(sizes.items()):
        _random_image("RGB" if i != 2 else "L", size, 20 + i).save(folder / name)
    predict.predict_images(
        config,
        tmp_path / "cls.msgpack",
        [folder],
        tmp_path / "out",
        top_k=3,
        overrides={"batch_size": 2},  # two passes, the second padded
        progress=False,
        log=lambda msg: None,
    )
    rows = [
        json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().split("\n") if x
    ]
    assert [Path(r["path"]).name for r in rows] == sorted(sizes)
    transform = pipeline.transform_from_config(
        config.input, task="recognition", image_size=SIZE, train=False
    )
    names = pipeline.get_source(config.dataset, "validation").class_names
    images = [
        transform({"image": predict.read_image(r["path"]), "label": 0})["image"] for r in rows
    ]
    logits = np.asarray(
        jax.jit(functools.partial(build_model(config).apply, train=False))(
            variables, np.stack(images)
        ),
        np.float64,
    )
    for row, z in zip(rows, logits):
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        order = np.argsort(-probs)[:3]
        assert [t["index"] for t in row["top_k"]] == order.tolist()
        assert [t["class"] for t in row["top_k"]] == [names[i] for i in order]
        np.testing.assert_allclose([t["prob"] for t in row["top_k"]], probs[order], rtol=1e-4)
    tops = np.array([[t["prob"] for t in r["top_k"]] for r in rows])
    assert np.ptp(tops, axis=0).max() > 1e-3  # the images are told apart (not a constant output)


# -- reading images -----------------------------------------------------------------------------


def test_read_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(predict.read_image(tmp_path / "rgb.png"), rgb)
    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(
        predict.read_image(tmp_path / "grey.png"), np.stack([grey] * 3, -1)
    )
    alpha = np.array([0, 255, 128, 0, 255, 64, 200], np.uint8)[None, :].repeat(5, 0)
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1)).save(tmp_path / "rgba.png")
    on_black = rgb * (alpha[..., None] / 255.0)
    got = predict.read_image(tmp_path / "rgba.png").astype(np.float64)
    assert np.abs(got - on_black).max() <= 1  # composited on black, not alpha dropped
    deep = (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1800).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    got = predict.read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(got[..., 1], np.rint(deep / 257.0).astype(np.uint8))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    got = predict.read_image(tmp_path / "cmyk.jpg")
    assert got.shape == (5, 7, 3) and got.dtype == np.uint8
    pal = Image.fromarray(rgb).quantize(8)
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(
        predict.read_image(tmp_path / "pal.png"), np.asarray(pal.convert("RGB"))
    )


def test_read_image_applies_exif_orientation(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (4, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "turned.png", exif=exif)
    got = predict.read_image(tmp_path / "turned.png")
    np.testing.assert_array_equal(got, np.rot90(rgb, k=-1))


def test_read_image_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture\n")
    with pytest.raises(ValueError, match="not an image file"):
        predict.read_image(tmp_path / "notes.txt")
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decode"):
        predict.read_image(tmp_path / "cut.jpg")


# -- inputs and names -------------------------------------------------------------------------


def test_find_inputs(tmp_path):
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.png").write_bytes(b"x")
    names = lambda files: [f.relative_to(tmp_path).as_posix() for f in files]  # noqa: E731
    assert names(predict.find_inputs([tmp_path])) == ["a.jpg", "b.png"]
    found = predict.find_inputs(
        [tmp_path, tmp_path / "a.jpg"], recursive=True, exclude=tmp_path / "out"
    )
    assert names(found) == ["a.jpg", "b.png", "sub/c.png"]
    with pytest.raises(predict.InputError, match=r"--input: .*missing\.jpg does not exist"):
        predict.find_inputs([tmp_path / "a.jpg", tmp_path / "missing.jpg"])
    (tmp_path / "nest" / "inner").mkdir(parents=True)
    (tmp_path / "nest" / "inner" / "d.png").write_bytes(b"x")
    with pytest.raises(predict.InputError, match=r"no files found in .*nest .*--recursive"):
        predict.find_inputs([tmp_path / "nest"])
    assert names(predict.find_inputs([tmp_path / "nest"], recursive=True)) == ["nest/inner/d.png"]
    with pytest.raises(predict.InputError, match="no input given"):
        predict.find_inputs([])


def test_output_stems_never_collide():
    stems = predict.output_stems(["a/x.jpg", "b/x.png", "c/X.gif", "x_overlay.png", "d/x.jpg"])
    files = [f"{s}{suffix}.png".casefold() for s in stems for suffix in ("", "_overlay")]
    assert len(set(files)) == len(files)
    assert stems[:3] == ["x", "x-2", "X-3"]


# -- command line ---------------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m train.predict ARGS`` from the repository root, on CPU, without a progress bar."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXENC_NO_PROGRESS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "train.predict", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_cli_segmentation_skips_bad_files_and_exits_one(seg, tmp_path):
    _, _, root = seg
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("rgb.png", "palette.png"):
        (folder / name).write_bytes((root / "images" / name).read_bytes())
    good = (root / "other" / "rgb.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("shopping list\n")
    proc = _run_cli(
        "--config",
        "configs/tiny.py",
        "--checkpoint",
        str(root / "weights.msgpack"),
        "--input",
        str(folder),
        "--output",
        str(tmp_path / "out"),
        "--mode",
        "single_scale",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert any("broken.jpg" in x and "cannot decode" in x for x in lines), proc.stderr
    assert any("notes.txt" in x and "not an image" in x for x in lines), proc.stderr
    assert "2 written, 2 failed" in proc.stderr and "Traceback" not in proc.stderr
    for name, _, size in SEG_IMAGES:
        if name in ("rgb.png", "palette.png"):
            for out in (name, name.replace(".png", "_overlay.png")):
                with Image.open(tmp_path / "out" / out) as im:
                    assert im.size == size
    missing = _run_cli(
        "--config",
        "configs/tiny.py",
        "--checkpoint",
        str(root / "weights.msgpack"),
        "--input",
        str(tmp_path / "nowhere"),
        "--output",
        str(tmp_path / "out2"),
    )
    assert missing.returncode == 2 and "nowhere does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_cli_recognition(tmp_path):
    config = tiny_cls.get_config()
    save_random_weights(config, tmp_path / "cls.msgpack")
    for i, size in enumerate([(40, 30), (25, 60)]):
        _random_image("RGB", size, 40 + i).save(tmp_path / f"p{i}.jpg")
    proc = _run_cli(
        "--config",
        "configs/tiny_cls.py",
        "--checkpoint",
        str(tmp_path / "cls.msgpack"),
        "--output",
        str(tmp_path / "out"),
        "--top_k",
        "2",
        "--input",
        str(tmp_path / "p0.jpg"),
        str(tmp_path / "p1.jpg"),  # a positional path is an input too (shell globs)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [
        json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [Path(r["path"]).name for r in rows] == ["p0.jpg", "p1.jpg"]
    for row in rows:
        probs = [t["prob"] for t in row["top_k"]]
        assert len(probs) == 2 and probs[0] >= probs[1] > 0
    assert "2 written, 0 failed" in proc.stderr
