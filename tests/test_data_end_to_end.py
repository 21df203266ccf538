"""Every dataset adapter through the whole job: train (upstream augmentation) -> held-out evaluation
-> ``train.evaluate`` (segmentation: multi-scale + flip + sliding window on full-size images;
recognition: single-crop top-k, equal to the trainer's own held-out numbers).

TFDS adapters run under ``tfds.testing.mock_data`` (random images whose image and mask sizes differ,
Cityscapes at 1024 x 2048); folder adapters on tiny generated trees in upstream's layouts with
non-square images of mixed sizes. A tiny model (8-channel stages) trains 2 steps; the point is that
every path runs and its outputs are well formed, not what it learns.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from train import evaluate
from train.data import pipeline
from train.trainer import train_and_evaluate

pytestmark = pytest.mark.slow

SMALL = {"layers": (1, 1, 1, 1), "stage_planes": (8, 16, 32, 64)}


def _rgb(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(path)


def _labels(path, h, w, high, seed, ignore=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.random.default_rng(seed).integers(0, high, (h, w)).astype(np.uint8)
    if ignore is not None:
        values[: h // 4] = ignore
    Image.fromarray(values).save(path)


SIZES = ((30, 44), (41, 27), (36, 36))  # non-square, both orientations


def _voc_like(root, year, mask_dir, sets_dir, classes, ignore):
    base = root / "VOCdevkit" / year
    names = {"train": ["a0", "a1", "a2"], "val": ["b0", "b1"]}
    for split, stems in names.items():
        for k, stem in enumerate(stems):
            h, w = SIZES[k % 3]
            _rgb(base / "JPEGImages" / f"{stem}.jpg", h, w, seed=k)
            _labels(base / mask_dir / f"{stem}.png", h, w, classes, seed=k, ignore=ignore)
        (base / "ImageSets" / sets_dir).mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / sets_dir / f"{split}.txt").write_text(
            "".join(s + "\n" for s in stems)
        )


def make_pascal_voc(root):
    _voc_like(root, "VOC2012", "SegmentationClass", "Segmentation", 21, ignore=255)


def make_pcontext(root):
    _voc_like(root, "VOC2010", "SegmentationClassContext", "SegmentationContext", 60, ignore=None)


def make_coco(root):
    for split, n in (("train2017", 3), ("val2017", 2)):
        for k in range(n):
            h, w = SIZES[k % 3]
            _rgb(root / split / f"{k:012d}.jpg", h, w, seed=k)
            _labels(root / "masks_voc" / split / f"{k:012d}.png", h, w, 21, seed=k, ignore=255)


def make_seg_folder(root):
    for split, n in (("train", 3), ("validation", 2)):
        for k in range(n):
            h, w = SIZES[k % 3]
            _rgb(root / split / "images" / f"im{k}.png", h, w, seed=k)
            _labels(root / split / "masks" / f"im{k}.png", h, w, 4, seed=k, ignore=255)


def make_minc(root):
    from train.data.sources import recognition

    base = root / "minc-2500"
    lists = {"train1": [], "validate1": [], "test1": []}
    for cls in recognition.MINC_CLASS_NAMES:  # upstream reads the class list from the folders
        (base / "images" / cls).mkdir(parents=True, exist_ok=True)
    for c, cls in enumerate(recognition.MINC_CLASS_NAMES[:4]):
        for k, name in enumerate(("train1", "train1", "validate1", "test1")):
            item = f"images/{cls}/{cls}_{c}{k}.jpg"
            _rgb(base / item, *SIZES[k % 3], seed=c * 10 + k)
            lists[name].append(item)
    (base / "labels").mkdir(parents=True, exist_ok=True)
    for name, items in lists.items():
        (base / "labels" / f"{name}.txt").write_text("".join(i + "\n" for i in items))


def make_image_folder(root):
    for split in ("train", "validation"):
        for c, cls in enumerate(("cat", "dog", "owl")):
            for k in range(2):
                _rgb(root / split / cls / f"{k}.png", *SIZES[(c + k) % 3], seed=c * 10 + k)


# name -> (task, num_classes, maker or None for TFDS mock data, extra dataset keys)
ADAPTERS = {
    "ade20k": ("segmentation", 150, None, {"backend": "tfds"}),
    "cityscapes": ("segmentation", 19, None, {}),
    "pascal_voc": ("segmentation", 21, make_pascal_voc, {}),
    "pcontext": ("segmentation", 59, make_pcontext, {}),
    "coco": ("segmentation", 21, make_coco, {}),
    "seg_folder": ("segmentation", 4, make_seg_folder, {}),
    "imagenet2012": ("recognition", 1000, None, {}),
    "cifar10": ("recognition", 10, None, {}),
    "minc": ("recognition", 23, make_minc, {}),
    "image_folder": ("recognition", 3, make_image_folder, {}),
}


def test_every_registered_adapter_is_covered():
    assert set(ADAPTERS) == set(pipeline.known_sources()) - {"shapes_seg", "shapes_cls"}


def _config(name, data_dir):
    task, num_classes, _, extra = ADAPTERS[name]
    c = tiny.get_config()
    c.task = task
    c.dataset.name = name
    c.dataset.num_classes = num_classes
    c.dataset.data_dir = str(data_dir)
    for key, value in extra.items():
        c.dataset[key] = value
    c.input.global_batch_size = 2
    c.input.eval_batch_size = 2
    c.train.num_steps = 2
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.optim.warmup_steps = 1
    if task == "segmentation":
        c.input.augment = "upstream"
        c.input.base_size = 40  # long side in [20, 80], then pad / crop to 32
        c.train.sample_predictions = 2
    else:
        c.input.augment = {"cifar10": "cifar", "minc": "minc"}.get(name, "imagenet")
        if name == "imagenet2012":
            c.input.rand_augment = (2, 12)
        c.model.name = "resnet18"
        c.model.kwargs = dict(SMALL)
        c.train.best_metric = "top1"
        c.train.sample_predictions = 0
    return c


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_train_and_evaluate(name, tmp_path):
    task, num_classes, maker, _ = ADAPTERS[name]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = _config(name, data_dir)
    workdir = tmp_path / "run"
    if maker is None:
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=4, data_dir=str(tmp_path / "mock")):
            result, out = _run(config, workdir, task)
    else:
        maker(data_dir)
        result, out = _run(config, workdir, task)
    assert result["step"] == 2 and not result["stopped_early"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2
    if task == "segmentation":
        assert 0.0 <= result["mIoU"] <= 1.0 and 0.0 <= result["pixAcc"] <= 1.0
        assert (workdir / "samples.png").is_file()
        for mode, settings in out.items():
            assert settings["num_images"] == 2 and len(settings["IoU"]) == num_classes, mode
            assert 0.0 <= settings["mIoU"] <= 1.0
        assert (workdir / "eval_ms" / "eval_metrics.json").is_file()
        assert (workdir / "eval_ms" / "predictions" / "00000.png").is_file()
    else:
        assert 0.0 <= result["top1"] <= 1.0
        assert out["single_crop"]["top1"] == pytest.approx(result["top1"], abs=1e-12)
        assert out["single_crop"]["num_images"] >= 1
        assert (workdir / "eval" / "eval_metrics.json").is_file()


def _run(config, workdir, task):
    result = train_and_evaluate(config, workdir)
    quiet = lambda msg: None  # noqa: E731
    if task != "segmentation":
        # Single-crop top-k of the same checkpoint: the trainer's own held-out numbers.
        return result, {
            "single_crop": evaluate.evaluate_checkpoint(
                config, workdir, workdir / "eval", log=quiet, overrides={"batch_size": 2}
            )
        }
    common = {"num_images": 2, "crop_size": 32, "base_size": 40, "batch_size": 4}
    # Two scales + flip: the small scale takes the pad branch, 1.5 x 40 = 60 > 32 slides windows.
    # (Single-scale mode is the same code with one scale: tests/test_evaluate.py.)
    out = {
        "multi": evaluate.evaluate_checkpoint(
            config,
            workdir,
            workdir / "eval_ms",
            log=quiet,
            overrides={
                **common,
                "mode": "multi_scale",
                "scales": (0.5, 1.5),
                "flip": True,
                "save_predictions": 1,
            },
        )
    }
    return result, out
