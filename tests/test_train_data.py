"""Tests for train/data: procedural shape datasets and the grain pipeline (sharding, state, eval padding)."""

from __future__ import annotations

import pickle
import time

import ml_collections
import numpy as np
import pytest
from index_source import IndexSource

from train.data import pipeline
from train.data.synthetic import ShapesRecognition, ShapesSegmentation


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def seg_config(**overrides):
    base = dict(
        name="shapes_seg", image_size=32, num_classes=6, num_train=40, num_val=12, data_dir=None
    )
    base.update(overrides)
    return ml_collections.ConfigDict(base)


# -- synthetic -----------------------------------------------------------------------------------


def test_segmentation_example_format_and_determinism():
    ds = ShapesSegmentation("train", num_examples=10, image_size=48, seed=3)
    ex = ds[4]
    assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (48, 48) and ex["mask"].dtype == np.int32
    # Same (seed, split, index) -> same element, whatever was read before and after pickling.
    again = pickle.loads(pickle.dumps(ds))
    _ = again[7]
    for key in ex:
        np.testing.assert_array_equal(ex[key], again[4][key])
        np.testing.assert_array_equal(ex[key], ds[-6][key])
    other_seed = ShapesSegmentation("train", num_examples=10, image_size=48, seed=4)[4]
    assert not np.array_equal(ex["image"], other_seed["image"])
    assert len(ds) == 10
    with pytest.raises(IndexError, match="out of range"):
        ds[10]


def test_splits_are_disjoint():
    kw = dict(num_examples=40, image_size=32, seed=0)
    train = {ShapesSegmentation("train", **kw)[i]["image"].tobytes() for i in range(40)}
    val = {ShapesSegmentation("validation", **kw)[i]["image"].tobytes() for i in range(40)}
    assert len(train) == 40 and len(val) == 40
    assert not train & val


def test_segmentation_class_coverage_and_colour_independence():
    ds = ShapesSegmentation("validation", num_examples=60, image_size=64, seed=1)
    masks = np.stack([ds[i]["mask"] for i in range(60)])
    assert masks.min() >= 0 and masks.max() < ds.num_classes
    assert set(np.unique(masks)) == set(range(ds.NUM_CLASSES))
    assert ds.PALETTE.shape == (ds.NUM_CLASSES, 3) and ds.PALETTE.dtype == np.uint8
    assert len(ds.CLASS_NAMES) == 6 and ds.CLASS_NAMES[0] == "background"
    # Every image has foreground; each class appears with many different colours (colour is not a cue).
    assert (masks.reshape(60, -1) > 0).any(axis=1).all()
    colours = {c: [] for c in range(1, 6)}
    for i in range(60):
        ex = ds[i]
        for c in np.unique(ex["mask"]):
            if c > 0:
                colours[int(c)].append(ex["image"][ex["mask"] == c].mean(axis=0))
    for c, values in colours.items():
        assert len(values) >= 3, c
        assert np.std(np.stack(values), axis=0).mean() > 25, c


@pytest.mark.parametrize("size", [32, 64])
def test_recognition_labels(size):
    ds = ShapesRecognition("train", num_examples=60, image_size=size, seed=0)
    labels = [int(ds[i]["label"]) for i in range(60)]
    assert set(labels) == set(range(5)) and ds.num_classes == 5
    ex = ds[0]
    assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
    assert ex["label"].dtype == np.int32 and ex["label"].shape == ()
    assert not np.array_equal(
        ex["image"], ShapesRecognition("validation", num_examples=1, image_size=size)[0]["image"]
    )


def test_synthetic_argument_errors():
    with pytest.raises(ValueError, match="split"):
        ShapesSegmentation("test", num_examples=3)
    with pytest.raises(ValueError, match="num_examples"):
        ShapesSegmentation("train", num_examples=0)
    with pytest.raises(ValueError, match="image_size"):
        ShapesRecognition("train", num_examples=3, image_size=8)
    with pytest.raises(ValueError, match="seed"):
        ShapesRecognition("train", num_examples=3, seed=-1)


def test_generation_speed_sanity():
    # No timing assertion (shared CPU); prints the rate for the report.
    ds = ShapesSegmentation("train", num_examples=200, image_size=64)
    start = time.perf_counter()
    for i in range(200):
        ds[i]
    print(f"ShapesSegmentation 64px: {(time.perf_counter() - start) / 200 * 1e3:.2f} ms/image")


# -- sources -------------------------------------------------------------------------------------


def test_get_source_builds_configured_datasets():
    src = pipeline.get_source(seg_config(), "validation")
    assert isinstance(src, ShapesSegmentation) and len(src) == 12 and src.image_size == 32
    cls = pipeline.get_source(seg_config(name="shapes_cls", num_classes=5), "train")
    assert isinstance(cls, ShapesRecognition) and len(cls) == 40
    # a plain dict works as well as a ConfigDict
    assert len(pipeline.get_source(dict(seg_config()), "train")) == 40


def test_get_source_errors():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*shapes_cls.*shapes_seg"):
        pipeline.get_source(seg_config(name="nope"), "train")
    with pytest.raises(ValueError, match=r"no split 'test'.*train.*validation"):
        pipeline.get_source(seg_config(), "test")
    with pytest.raises(ValueError, match=r"num_classes=21.*6 classes"):
        pipeline.get_source(seg_config(num_classes=21), "train")
    cfg = seg_config()
    del cfg["num_train"]
    with pytest.raises(KeyError, match="config.dataset.num_train"):
        pipeline.get_source(cfg, "train")


def test_register_source():
    name = "test_index_source"
    pipeline.register_source(name, lambda cfg, split: IndexSource(cfg["n"]), overwrite=True)
    assert name in pipeline.known_sources()
    assert len(pipeline.get_source({"name": name, "n": 5}, "train")) == 5
    with pytest.raises(ValueError, match="already registered"):
        pipeline.register_source(name, lambda cfg, split: None)


def test_palette():
    np.testing.assert_array_equal(pipeline.palette(seg_config()), ShapesSegmentation.PALETTE)
    voc = pipeline.palette(seg_config(name="shapes_cls", num_classes=21))
    assert voc.shape == (21, 3) and voc.dtype == np.uint8
    # PASCAL VOC colour map anchors
    assert (
        voc[0].tolist() == [0, 0, 0]
        and voc[1].tolist() == [128, 0, 0]
        and voc[15].tolist() == [192, 128, 128]
    )
    with pytest.raises(ValueError, match="unknown dataset"):
        pipeline.palette(seg_config(name="nope"))


# -- transforms ----------------------------------------------------------------------------------


def test_eval_transform_normalises_and_resizes():
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    mask = np.repeat(np.arange(4, dtype=np.int32), 10)[None, :].repeat(40, 0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    same = pipeline.segmentation_transform(train=False, image_size=40, mean=mean, std=std)(
        {"image": image, "mask": mask}
    )
    np.testing.assert_allclose(same["image"], (image / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(same["mask"], mask)
    out = pipeline.segmentation_transform(train=False, image_size=32)(
        {"image": image, "mask": mask[..., None]}
    )
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
    assert out["mask"].shape == (32, 32) and out["mask"].dtype == np.int32
    assert set(np.unique(out["mask"])) == {0, 1, 2, 3}  # nearest: no blended labels
    rec = pipeline.recognition_transform(train=False, image_size=20)(
        {"image": image[..., :1], "label": 3}
    )
    assert (
        rec["image"].shape == (20, 20, 3) and rec["label"] == 3 and rec["label"].dtype == np.int32
    )


def test_train_transform_keeps_image_and_mask_aligned():
    # Channel 0 encodes the mask, so any misalignment between image and mask shows up.
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 5, (32, 32)).astype(np.int32)
    image = np.stack([mask * 50, rng.integers(0, 256, (32, 32)), np.zeros((32, 32))], -1).astype(
        np.uint8
    )
    flip_only = pipeline.segmentation_transform(
        train=True, image_size=32, flip=True, mean=(0, 0, 0), std=(1, 1, 1)
    )
    flipped = 0
    for seed in range(8):
        out = flip_only({"image": image, "mask": mask}, np.random.default_rng(seed))
        np.testing.assert_allclose(out["image"][..., 0] * 255, out["mask"] * 50, atol=1e-3)
        flipped += not np.array_equal(out["mask"], mask)
    assert 0 < flipped < 8
    scaled = pipeline.segmentation_transform(
        train=True, image_size=32, scale_range=(0.5, 0.7), mean=(0, 0, 0), std=(1, 1, 1)
    )
    out = scaled({"image": image, "mask": mask}, np.random.default_rng(0))
    pad = out["mask"] == -1
    assert out["image"].shape == (32, 32, 3) and 0 < pad.mean() < 1
    assert np.all(out["image"][pad] == 0)
    big = pipeline.segmentation_transform(train=True, image_size=32, scale_range=(1.5, 2.0))
    out = big({"image": image, "mask": mask}, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and out["mask"].min() >= 0


def test_transform_errors():
    train = pipeline.segmentation_transform(train=True, image_size=8)
    with pytest.raises(ValueError, match="needs an rng"):
        train({"image": np.zeros((8, 8, 3), np.uint8), "mask": np.zeros((8, 8), np.int32)}, None)
    with pytest.raises(ValueError, match="uint8"):
        train(
            {"image": np.zeros((8, 8, 3), np.float32), "mask": np.zeros((8, 8), np.int32)},
            np.random.default_rng(),
        )
    with pytest.raises(ValueError, match="scale_range"):
        pipeline.segmentation_transform(train=True, image_size=8, scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="std"):
        pipeline.recognition_transform(train=False, image_size=8, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="config.task"):
        pipeline.transform_from_config({}, task="detection", image_size=8, train=False)


def test_transform_from_config():
    cfg = ml_collections.ConfigDict(
        dict(flip=False, scale_range=(0.75, 1.25), mean=(0.1, 0.2, 0.3), std=(1, 2, 3))
    )
    t = pipeline.transform_from_config(cfg, task="segmentation", image_size=16, train=True)
    assert isinstance(t, pipeline.SegmentationTransform)
    assert (t.flip, t.scale_range, t.std) == (False, (0.75, 1.25), (1.0, 2.0, 3.0))
    assert isinstance(
        pipeline.transform_from_config(cfg, task="recognition", image_size=16, train=False),
        pipeline.RecognitionTransform,
    )


# -- train iterator ------------------------------------------------------------------------------


def seg_pipeline_parts():
    source = ShapesSegmentation("train", num_examples=13, image_size=16, seed=0)
    transform = pipeline.segmentation_transform(train=True, image_size=16, scale_range=(0.75, 1.25))
    return source, transform


def test_train_iterator_epochs_and_determinism():
    it = pipeline.train_iterator(
        IndexSource(10),
        global_batch_size=4,
        seed=5,
        process_index=0,
        process_count=1,
        transform=None,
    )
    stream = np.concatenate([b["index"] for b in take(it, 10)])  # 40 elements = 4 epochs
    epochs = stream.reshape(4, 10)
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    assert not np.array_equal(epochs[0], np.arange(10))
    again = pipeline.train_iterator(
        IndexSource(10),
        global_batch_size=4,
        seed=5,
        process_index=0,
        process_count=1,
        transform=None,
    )
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in take(again, 10)]), stream)
    other = pipeline.train_iterator(
        IndexSource(10),
        global_batch_size=4,
        seed=6,
        process_index=0,
        process_count=1,
        transform=None,
    )
    assert not np.array_equal(np.concatenate([b["index"] for b in take(other, 10)]), stream)


def test_train_batches_and_augmentation_are_deterministic():
    source, transform = seg_pipeline_parts()
    kw = dict(global_batch_size=4, seed=0, process_index=0, process_count=1, transform=transform)
    a = take(pipeline.train_iterator(source, **kw), 4)
    assert a[0]["image"].shape == (4, 16, 16, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["mask"].shape == (4, 16, 16) and a[0]["mask"].dtype == np.int32
    assert_batches_equal(a, take(pipeline.train_iterator(source, **kw, read_threads=0), 4))
    # The same example is augmented differently in different epochs (rng follows stream position).
    b = take(pipeline.train_iterator(source, **{**kw, "transform": None}), 7)
    raw = np.concatenate([x["image"] for x in b])
    first = [i for i in range(26) if np.array_equal(raw[i], raw[0])]
    assert len(first) == 2
    aug = np.concatenate([x["image"] for x in take(pipeline.train_iterator(source, **kw), 7)])
    assert not np.array_equal(aug[first[0]], aug[first[1]])


def test_train_iterator_state_restore():
    source, transform = seg_pipeline_parts()
    kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1, transform=transform)
    it = pipeline.train_iterator(source, **kw)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    fresh = pipeline.train_iterator(source, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)


def test_train_multiprocess_sharding_matches_single_process():
    source, transform = seg_pipeline_parts()
    kw = dict(seed=3, transform=transform)
    single = take(
        pipeline.train_iterator(
            source, global_batch_size=8, process_index=0, process_count=1, **kw
        ),
        4,
    )
    shards = [
        take(
            pipeline.train_iterator(
                source, global_batch_size=8, process_index=p, process_count=2, **kw
            ),
            4,
        )
        for p in range(2)
    ]
    for step in range(4):
        for key in single[step]:
            assert shards[0][step][key].shape[0] == 4
            np.testing.assert_array_equal(
                np.concatenate([shards[0][step][key], shards[1][step][key]]), single[step][key]
            )


def test_train_iterator_errors():
    with pytest.raises(
        ValueError, match=r"global_batch_size=6 is not divisible by process_count=4"
    ):
        pipeline.train_iterator(
            IndexSource(8),
            global_batch_size=6,
            seed=0,
            process_index=0,
            process_count=4,
            transform=None,
        )
    with pytest.raises(ValueError, match="process_index"):
        pipeline.train_iterator(
            IndexSource(8),
            global_batch_size=4,
            seed=0,
            process_index=2,
            process_count=2,
            transform=None,
        )
    with pytest.raises(ValueError, match="seed"):
        pipeline.train_iterator(
            IndexSource(8),
            global_batch_size=4,
            seed=-1,
            process_index=0,
            process_count=1,
            transform=None,
        )
    with pytest.raises(ValueError, match="empty"):
        pipeline.train_iterator(
            IndexSource(0),
            global_batch_size=4,
            seed=0,
            process_index=0,
            process_count=1,
            transform=None,
        )


def test_process_defaults_come_from_jax():
    it = pipeline.train_iterator(IndexSource(8), global_batch_size=4, seed=0, transform=None)
    assert next(it)["index"].shape == (4,)  # one process in tests


# -- eval ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch,processes", [(10, 4, 1), (10, 4, 2), (3, 8, 4), (8, 4, 2)])
def test_eval_batches_cover_each_example_once(n, batch, processes):
    per_process = [
        list(
            pipeline.eval_batches(
                IndexSource(n),
                batch_size=batch,
                process_index=p,
                process_count=processes,
                transform=None,
            )
        )
        for p in range(processes)
    ]
    num = pipeline.num_eval_batches(n, batch)
    assert all(len(batches) == num for batches in per_process)
    rows, valid = [], []
    for step in range(num):  # reassemble global batches in process order
        rows.append(np.concatenate([per_process[p][step]["index"] for p in range(processes)]))
        valid.append(np.concatenate([per_process[p][step]["valid"] for p in range(processes)]))
        assert all(
            per_process[p][step]["valid"].shape == (batch // processes,) for p in range(processes)
        )
    rows, valid = np.concatenate(rows), np.concatenate(valid)
    assert valid.dtype == np.bool_ and len(rows) == num * batch
    np.testing.assert_array_equal(rows[valid], np.arange(n))  # ordered, each exactly once
    assert valid.sum() == n and valid[:n].all()


def test_eval_batches_with_transform():
    source = ShapesSegmentation("validation", num_examples=5, image_size=16)
    transform = pipeline.segmentation_transform(train=False, image_size=24)
    batches = list(
        pipeline.eval_batches(
            source, batch_size=4, process_index=0, process_count=1, transform=transform
        )
    )
    assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
    assert batches[1]["image"].shape == (4, 24, 24, 3) and batches[1]["mask"].shape == (4, 24, 24)
    np.testing.assert_array_equal(batches[1]["mask"][0], transform(source[4])["mask"])
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by process_count=4"):
        pipeline.eval_batches(
            source, batch_size=6, process_index=0, process_count=4, transform=None
        )


# -- grain worker processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_count_does_not_change_batches():
    source, transform = seg_pipeline_parts()
    kw = dict(global_batch_size=4, seed=4, process_index=1, process_count=2, transform=transform)
    expected = take(pipeline.train_iterator(source, **kw), 6)
    it = pipeline.train_iterator(source, **kw, worker_count=2)
    try:
        assert_batches_equal(take(it, 4), expected[:4])
        state = it.get_state()
    finally:
        it.close()
    restored = pipeline.train_iterator(source, **kw, worker_count=2)
    try:
        restored.set_state(state)
        assert_batches_equal(take(restored, 2), expected[4:])
    finally:
        restored.close()
