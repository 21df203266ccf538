"""Dataset adapters (train.data.sources): label mappings on crafted masks, folder layouts built in
tmp_path with PIL, TFDS adapters under ``tfds.testing.mock_data`` (no TensorFlow, no network), clear
errors for missing data and unknown splits, pickling, and one batch of each through the pipeline."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from train.data import pipeline
from train.data.palette import voc_palette
from train.data.sources import _base, ade20k, cityscapes, coco, folders, pascal, recognition

SEG_NAMES = ("ade20k", "cityscapes", "pascal_voc", "pcontext", "coco", "seg_folder")
CLS_NAMES = ("imagenet2012", "cifar10", "minc", "image_folder")


def _cfg(name, data_dir=None, **extra):
    return {"name": name, "data_dir": None if data_dir is None else str(data_dir), **extra}


def _rgb(path, h, w, mode="RGB", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)


def _label_png(path, values, mode="L"):
    values = np.asarray(values, np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "P":
        img = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
        img.putpalette(voc_palette(256).tobytes())
    else:
        img = Image.fromarray(values)  # uint8 (H, W) -> mode L
    img.save(path)


def _check_seg(example, num_classes):
    image, mask = example["image"], example["mask"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert mask.dtype == np.int32 and mask.ndim == 2
    assert mask.min() >= -1 and mask.max() < num_classes


def _check_cls(example, num_classes):
    image, label = example["image"], example["label"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert label.dtype == np.int32 and label.shape == () and 0 <= int(label) < num_classes


def _one_batch(source, seg=True):
    make = pipeline.segmentation_transform if seg else pipeline.recognition_transform
    it = pipeline.train_iterator(
        source,
        global_batch_size=2,
        seed=0,
        process_index=0,
        process_count=1,
        transform=make(train=True, image_size=32),
    )
    batch = next(it)
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
    if seg:
        assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == np.int32
        assert batch["mask"].min() >= -1 and batch["mask"].max() < source.num_classes
    else:
        assert batch["label"].shape == (2,) and batch["label"].dtype == np.int32
    return batch


def _check_pickle(source):
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == len(source) and clone.num_classes == source.num_classes
    a, b = source[0], clone[0]
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


# -- registry ------------------------------------------------------------------------------------


def test_all_adapters_registered_with_palettes():
    known = pipeline.known_sources()
    for name in SEG_NAMES + CLS_NAMES:
        assert name in known
    expected = {"ade20k": 150, "cityscapes": 19, "pascal_voc": 21, "pcontext": 59, "coco": 21}
    for name, k in expected.items():
        pal = pipeline.palette({"name": name})
        assert pal.shape == (k, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(pipeline.palette({"name": "cityscapes"})[0], [128, 64, 128])
    np.testing.assert_array_equal(pipeline.palette({"name": "ade20k"})[0], [120, 120, 120])
    np.testing.assert_array_equal(
        pipeline.palette({"name": "pascal_voc"})[:3], [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    )
    # seg_folder has no registered palette: the VOC map for config.dataset.num_classes.
    assert pipeline.palette({"name": "seg_folder", "num_classes": 4}).shape == (4, 3)
    assert len(ade20k.CLASS_NAMES) == 150 and len(cityscapes.CLASS_NAMES) == 19
    assert len(pascal.CONTEXT_CLASS_NAMES) == 59 and len(recognition.MINC_CLASS_NAMES) == 23


def test_importing_pipeline_registers_without_importing_tfds():
    code = (
        "import sys; from train.data import pipeline; "
        "assert 'ade20k' in pipeline.known_sources(), pipeline.known_sources(); "
        "assert 'tensorflow_datasets' not in sys.modules"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


# -- label mappings on crafted masks -------------------------------------------------------------


def test_ade20k_semantic_shift():
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = ade20k.SEMANTIC_LABELS(raw).ravel()
    assert out.dtype == np.int32
    assert out[0] == -1
    np.testing.assert_array_equal(out[1:151], np.arange(150))
    assert (out[151:] == -1).all()


def test_ade20k_tfds_instance_mapping_by_name():
    r = np.array([[0, 1, 4, 100], [101, 254, 85, 52]], np.uint8)
    raw = np.stack(
        [r, np.full_like(r, 7), np.full_like(r, 200)], axis=-1
    )  # G, B: instance ids, ignored
    out = ade20k.INSTANCE_LABELS(raw)
    names = ade20k.CLASS_NAMES
    assert out[0, 0] == -1 and out[1, 0] == -1 and out[1, 1] == -1
    assert names[out[0, 1]] == "bed" and names[out[0, 2]] == "person" and names[out[0, 3]] == "flag"
    assert names[out[1, 2]] == "screen" and names[out[1, 3]] == "light"
    table = ade20k.INSTANCE_LABELS.table
    for k, name in enumerate(ade20k.INSTANCE_CLASS_NAMES, start=1):
        assert names[table[k]] == name
    assert len(set(table[1:101].tolist())) == 100 and (table[101:] == -1).all()


def test_cityscapes_full_label_id_table():
    expected = [
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
        -1,
        0,
        1,
        -1,
        -1,
        2,
        3,
        4,
        -1,
        -1,
        -1,
        5,
        -1,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
        -1,
        -1,
        16,
        17,
        18,
    ]
    raw = np.array([list(range(34)) + [34, 100, 255]], np.uint8)
    out = cityscapes.TRAIN_IDS(raw[..., None])  # TFDS gives (H, W, 1)
    np.testing.assert_array_equal(out[0], expected + [-1, -1, -1])


def test_voc_and_context_tables():
    raw = np.array([[0, 1, 20, 21, 254, 255]], np.uint8)
    np.testing.assert_array_equal(pascal.VOC_LABELS(raw), [[0, 1, 20, -1, -1, -1]])
    np.testing.assert_array_equal(coco.LABELS(raw), [[0, 1, 20, -1, -1, -1]])
    raw = np.array([[0, 1, 2, 59, 60, 255]], np.uint8)
    np.testing.assert_array_equal(pascal.CONTEXT_LABELS(raw), [[-1, 0, 1, 58, -1, -1]])


def test_label_table_wide_and_negative_inputs():
    table = _base.shift_table(3, size=4)
    raw = np.array([[-5, 0, 1, 3, 4, 70000]], np.int64)
    np.testing.assert_array_equal(table(raw), [[-1, -1, 0, 2, -1, -1]])
    np.testing.assert_array_equal(table(raw.astype(np.int32)), [[-1, -1, 0, 2, -1, -1]])
    with pytest.raises(ValueError, match="integer"):
        table(np.zeros((2, 2), np.float32))


def test_seg_folder_labels_strict():
    labels = folders.FolderLabels(3)
    np.testing.assert_array_equal(labels(np.array([[0, 1, 2, 255]], np.uint8)), [[0, 1, 2, -1]])
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        labels(np.array([[0, 3, 7]], np.uint8))


# -- TFDS adapters under mock_data ---------------------------------------------------------------


@pytest.fixture
def mock_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path / "tfds_mock")):
        yield str(tmp_path / "empty_data_dir")


def test_ade20k_tfds_backend_mock(mock_tfds):
    src = pipeline.get_source(_cfg("ade20k", mock_tfds, num_classes=150), "train")
    assert isinstance(src, _base.TfdsSegmentation) and src.inner is not None
    assert len(src) == 3 and src.num_classes == 150 and len(src.class_names) == 150
    raw = src.inner[0]
    assert raw["annotation"].ndim == 3 and raw["annotation"].shape[-1] == 3  # RGB instance masks
    ex = src[0]
    _check_seg(ex, 150)
    np.testing.assert_array_equal(ex["mask"], ade20k.INSTANCE_LABELS(raw["annotation"]))
    assert len(pipeline.get_source(_cfg("ade20k", mock_tfds), "validation")) == 3
    _check_pickle(src)
    _one_batch(src)


def test_tfds_segmentation_feeds_crafted_annotation_through_adapter(mock_tfds):
    src = ade20k.build(_cfg("ade20k", mock_tfds, backend="tfds"), "train")
    r = np.array([[0, 1], [4, 200]], np.uint8)
    src.inner = [{"image": np.zeros((5, 7, 3), np.uint8), "annotation": np.stack([r, r, r], -1)}]
    ex = src[0]
    assert ex["image"].shape == (5, 7, 3)
    np.testing.assert_array_equal(ex["mask"], [[-1, 7], [12, -1]])
    city = cityscapes.build(_cfg("cityscapes", mock_tfds), "train")
    ids = np.array([[7, 33], [0, 26]], np.uint8)[..., None]
    city.inner = [{"image_left": np.zeros((2, 2, 3), np.uint8), "segmentation_label": ids}]
    np.testing.assert_array_equal(city[0]["mask"], [[0, 18], [-1, 13]])


def test_cityscapes_tfds_backend_mock(mock_tfds):
    config = ml_collections.ConfigDict({"name": "cityscapes", "num_classes": 19, "backend": "tfds"})
    config.data_dir = ml_collections.FieldReference(mock_tfds, field_type=str)
    src = pipeline.get_source(config, "train")
    assert isinstance(src, _base.TfdsSegmentation) and len(src) == 3
    ex = src[0]
    _check_seg(ex, 19)
    assert ex["image"].shape == (1024, 2048, 3) and ex["mask"].shape == (1024, 2048)
    for split in ("validation", "test", "trainval"):
        assert len(pipeline.get_source(config, split)) == 3
    _one_batch(src)


@pytest.mark.parametrize("name,num_classes", [("imagenet2012", 1000), ("cifar10", 10)])
def test_tfds_recognition_mock(mock_tfds, name, num_classes):
    src = pipeline.get_source(_cfg(name, mock_tfds, num_classes=num_classes), "train")
    assert isinstance(src, _base.TfdsRecognition) and len(src) == 3
    assert src.num_classes == num_classes and len(src.class_names) == num_classes
    _check_cls(src[0], num_classes)
    assert len(pipeline.get_source(_cfg(name, mock_tfds), "validation")) == 3
    if name == "cifar10":
        assert src.class_names == recognition.CIFAR10_CLASS_NAMES
    else:
        assert src.class_names[0] == "n01440764"
    _check_pickle(src)
    _one_batch(src, seg=False)


@pytest.mark.parametrize(
    "name,builder",
    [
        ("ade20k", "scene_parse150"),
        ("cityscapes", "cityscapes"),
        ("imagenet2012", "imagenet2012"),
        ("cifar10", "cifar10"),
    ],
)
def test_tfds_missing_data_is_file_not_found(tmp_path, name, builder):
    with pytest.raises(FileNotFoundError) as info:
        pipeline.get_source(_cfg(name, tmp_path), "train")
    msg = str(info.value)
    assert builder in msg and "not prepared" in msg and str(tmp_path) in msg
    assert "tfds build" in msg and "array_record" in msg
    if name == "cityscapes":
        assert "gtFine_trainvaltest.zip" in msg and "--manual_dir" in msg
    assert not any(tmp_path.iterdir())  # nothing created, nothing downloaded


def test_tfds_prepared_as_tfrecord_is_reported(tmp_path):
    version_dir = tmp_path / "cifar10" / "3.0.2"
    os.makedirs(version_dir)
    # fmt: off
    info = {"name": "cifar10", "version": "3.0.2", "fileFormat": "tfrecord",
            "splits": [{"name": "train", "numBytes": "1", "shardLengths": ["3"],
                        "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}]}
    # fmt: on
    (version_dir / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(
        FileNotFoundError, match="'tfrecord' format, which has no random access"
    ) as err:
        pipeline.get_source(_cfg("cifar10", tmp_path), "train")
    assert "--file_format=array_record" in str(err.value)


# -- folder adapters -----------------------------------------------------------------------------


def _ade_folder(root):
    base = root / "ADEChallengeData2016"
    raw = np.array([[0, 1, 2, 150], [151, 255, 10, 0], [5, 5, 5, 5]], np.uint8)
    for sub, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            stem = f"ADE_{sub[:5]}_{i:08d}"
            _rgb(str(base / "images" / sub / f"{stem}.jpg"), 3, 4, seed=i)
            _label_png(str(base / "annotations" / sub / f"{stem}.png"), raw)


def test_ade20k_folder(tmp_path):
    _ade_folder(tmp_path)
    src = pipeline.get_source(_cfg("ade20k", tmp_path), "train")  # auto: the folder exists
    assert isinstance(src, _base.FileSegmentation) and len(src) == 2
    ex = src[1]
    _check_seg(ex, 150)
    assert ex["image"].shape == (3, 4, 3)
    np.testing.assert_array_equal(ex["mask"], [[-1, 0, 1, 149], [-1, -1, 9, -1], [4, 4, 4, 4]])
    assert len(pipeline.get_source(_cfg("ade20k", tmp_path), "validation")) == 1
    assert len(pipeline.get_source(_cfg("ade20k", tmp_path), "trainval")) == 3
    _check_pickle(src)
    _one_batch(src)


def test_cityscapes_folder(tmp_path):
    ids = np.array([list(range(34)) + [255, 255]], np.uint8).reshape(4, 9)
    root = tmp_path / "cityscapes"
    for split, city in (
        ("train", "aachen"),
        ("train", "bonn"),
        ("val", "lindau"),
        ("test", "berlin"),
    ):
        stem = f"{city}_000000_000019"
        _rgb(str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"), 4, 9)
        _label_png(str(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"), ids)
    src = pipeline.get_source(_cfg("cityscapes", tmp_path), "train")
    assert isinstance(src, _base.FileSegmentation) and len(src) == 2
    assert [os.path.basename(p) for p in src.image_paths] == [
        "aachen_000000_000019_leftImg8bit.png",
        "bonn_000000_000019_leftImg8bit.png",
    ]
    expected = np.asarray(cityscapes.TRAIN_IDS(ids))
    np.testing.assert_array_equal(src[0]["mask"], expected)
    np.testing.assert_array_equal(np.sort(np.unique(expected)), np.arange(-1, 19))
    for split, n in (("validation", 1), ("test", 1), ("trainval", 3)):
        assert len(pipeline.get_source(_cfg("cityscapes", tmp_path), split)) == n
    with pytest.raises(FileNotFoundError, match="gtFine_labelIds"):
        os.remove(root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png")
        pipeline.get_source(_cfg("cityscapes", tmp_path), "validation")
    _check_pickle(src)
    _one_batch(src)


def _voc_tree(root, year, mask_dir, sets_dir, lists, raw, mode):
    base = root / "VOCdevkit" / year
    ids = sorted({i for v in lists.values() for i in v})
    for k, i in enumerate(ids):
        _rgb(
            str(base / "JPEGImages" / f"{i}.jpg"), 3, 4, mode="L" if k == 0 else "RGB", seed=k
        )  # one grayscale
        _label_png(str(base / mask_dir / f"{i}.png"), raw, mode=mode)
    os.makedirs(base / "ImageSets" / sets_dir, exist_ok=True)
    for name, v in lists.items():
        (base / "ImageSets" / sets_dir / f"{name}.txt").write_text("".join(f"{i}\n" for i in v))


def test_pascal_voc_folder_train_is_train_txt(tmp_path):
    raw = np.array([[0, 1, 15, 255], [20, 255, 0, 3], [0, 0, 0, 0]], np.uint8)
    _voc_tree(
        tmp_path,
        "VOC2012",
        "SegmentationClass",
        "Segmentation",
        {
            "train": ["2007_000032"],
            "val": ["2007_000033", "2007_000039"],
            "trainval": ["2007_000032", "2007_000033", "2007_000039"],
        },
        raw,
        mode="P",
    )
    src = pipeline.get_source(_cfg("pascal_voc", tmp_path, num_classes=21), "train")
    assert len(src) == 1  # train.txt, not upstream's trainval.txt
    ex = src[0]
    _check_seg(ex, 21)
    assert ex["image"].shape == (3, 4, 3)  # grayscale JPEG -> RGB
    assert np.array_equal(ex["image"][..., 0], ex["image"][..., 1])
    np.testing.assert_array_equal(ex["mask"], [[0, 1, 15, -1], [20, -1, 0, 3], [0, 0, 0, 0]])
    assert len(pipeline.get_source(_cfg("pascal_voc", tmp_path), "validation")) == 2
    assert len(pipeline.get_source(_cfg("pascal_voc", tmp_path), "trainval")) == 3
    _check_pickle(src)
    _one_batch(src)


def test_pascal_voc_refuses_colour_masks(tmp_path):
    _voc_tree(
        tmp_path,
        "VOC2012",
        "SegmentationClass",
        "Segmentation",
        {"train": ["a"]},
        np.zeros((3, 4)),
        "L",
    )
    _rgb(str(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/a.png"), 3, 4)
    src = pipeline.get_source(_cfg("pascal_voc", tmp_path), "train")
    with pytest.raises(ValueError, match="single-channel"):
        src[0]


def test_pcontext_folder(tmp_path):
    raw = np.array([[0, 1, 59, 60], [2, 2, 0, 30], [0, 0, 0, 0]], np.uint8)
    _voc_tree(
        tmp_path,
        "VOC2010",
        "SegmentationClassContext",
        "SegmentationContext",
        {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]},
        raw,
        mode="L",
    )
    src = pipeline.get_source(_cfg("pcontext", tmp_path, num_classes=59), "train")
    assert len(src) == 2
    _check_seg(src[0], 59)
    np.testing.assert_array_equal(
        src[0]["mask"], [[-1, 0, 58, -1], [1, 1, -1, 29], [-1, -1, -1, -1]]
    )
    assert len(pipeline.get_source(_cfg("pcontext", tmp_path), "validation")) == 1
    _check_pickle(src)
    _one_batch(src)


def _rle_string(counts):
    """Test-side encoder of compressed COCO RLE (the inverse of the format the adapter decodes)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(out)


def test_coco_rle_decoding():
    assert coco.rle_counts_from_string("1232") == [1, 2, 3, 4]
    assert coco.rle_counts_from_string("12H") == [1, 2, -8]  # a negative group (sign bit 0x10)
    counts = [5, 1000, 37, 2, 90000, 3, 1, 0, 64]
    assert coco.rle_counts_from_string(_rle_string(counts)) == counts
    mask = coco.decode_rle([1, 2, 3], 2, 3)  # column-major: 0, then 1 1, then 0 0 0
    np.testing.assert_array_equal(mask, [[False, True, False], [True, False, False]])


def test_coco_render_first_instance_wins_and_prepare(tmp_path):
    h, w = 40, 50
    square = [
        10,
        10,
        29,
        10,
        29,
        29,
        10,
        29,
    ]  # x, y pairs: pixels 10..29 (PIL fills the outline too)
    shifted = [20, 20, 39, 20, 39, 39, 20, 39]
    crowd = np.zeros((h, w), bool)
    crowd[0:5, 40:50] = True
    flat = crowd.T.ravel().astype(np.int64)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])) != 0)
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    anns = [
        {
            "image_id": 1,
            "category_id": 90,
            "segmentation": [[0, 0, 49, 0, 49, 39, 0, 39]],
        },  # toothbrush: skipped
        {"image_id": 1, "category_id": 18, "segmentation": [square]},  # dog -> 12, painted first
        {
            "image_id": 1,
            "category_id": 1,
            "segmentation": [shifted],
        },  # person -> 15, loses the overlap
        {
            "image_id": 1,
            "category_id": 72,
            "iscrowd": 1,
            "segmentation": {"size": [h, w], "counts": _rle_string(counts)},
        },  # tv -> 20, compressed RLE
        {
            "image_id": 2,
            "category_id": 5,
            "segmentation": {"size": [h, w], "counts": [0, 4, h * w - 4]},
        },
    ]
    mask = coco.render_voc_mask([a for a in anns if a["image_id"] == 1], h, w)
    assert (mask[10:30, 10:30] == 12).all()
    assert (mask[30:40, 20:40] == 15).all() and (mask[20:30, 30:40] == 15).all()
    np.testing.assert_array_equal(mask[0:5, 40:50], 20)
    assert mask[0, 0] == 0 and mask[35, 5] == 0
    assert coco.CAT_LIST[12] == 18 and coco.CLASS_NAMES[12] == "dog"

    os.makedirs(tmp_path / "annotations")
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "height": h, "width": w},
        {"id": 2, "file_name": "000000000002.jpg", "height": h, "width": w},
    ]  # 4 fg pixels: dropped
    ann_file = tmp_path / "annotations" / "instances_val2017.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns}))
    assert coco.prepare_voc_masks(str(tmp_path), "val2017", min_foreground_pixels=100) == 1
    written = Image.open(tmp_path / "masks_voc" / "val2017" / "000000000001.png")
    assert written.mode == "P"
    np.testing.assert_array_equal(np.asarray(written), mask)
    _rgb(str(tmp_path / "val2017" / "000000000001.jpg"), h, w)
    src = pipeline.get_source(_cfg("coco", tmp_path, num_classes=21), "validation")
    assert len(src) == 1
    np.testing.assert_array_equal(src[0]["mask"], mask.astype(np.int32))
    with pytest.raises(FileNotFoundError, match="train2017"):
        pipeline.get_source(_cfg("coco", tmp_path), "train")


def test_coco_folder_ignore_and_batch(tmp_path):
    raw = np.array([[0, 5, 255, 20], [1, 1, 255, 0], [0, 0, 0, 0]], np.uint8)
    for i in range(2):
        _rgb(
            str(tmp_path / "train2017" / f"{i:012d}.jpg"), 3, 4, mode="CMYK" if i else "RGB"
        )  # CMYK JPEG -> RGB
        _label_png(str(tmp_path / "masks_voc" / "train2017" / f"{i:012d}.png"), raw, mode="P")
    _rgb(str(tmp_path / "train2017" / "unlabelled_extra.jpg"), 3, 4)  # no mask: not an example
    src = pipeline.get_source(_cfg("coco", tmp_path), "train")
    assert len(src) == 2
    np.testing.assert_array_equal(src[1]["mask"], [[0, 5, -1, 20], [1, 1, -1, 0], [0, 0, 0, 0]])
    _check_pickle(src)
    _one_batch(src)


def _minc_tree(root):
    base = root / "minc-2500"
    for cls in recognition.MINC_CLASS_NAMES:
        os.makedirs(base / "images" / cls, exist_ok=True)
    entries = {
        "train1": ["brick/brick_000001", "wood/wood_000001", "sky/sky_000003"],
        "validate1": ["carpet/carpet_000002"],
        "test1": ["wood/wood_000009"],
    }
    for name, items in entries.items():
        for item in items:
            _rgb(str(base / "images" / f"{item}.jpg"), 6, 5)
        os.makedirs(base / "labels", exist_ok=True)
        (base / "labels" / f"{name}.txt").write_text("".join(f"images/{i}.jpg\n" for i in items))


def test_minc_folder(tmp_path):
    _minc_tree(tmp_path)
    src = pipeline.get_source(_cfg("minc", tmp_path, num_classes=23), "train")
    assert len(src) == 3 and src.class_names == recognition.MINC_CLASS_NAMES
    names = recognition.MINC_CLASS_NAMES
    assert [int(src[i]["label"]) for i in range(3)] == [
        names.index("brick"),
        names.index("wood"),
        names.index("sky"),
    ]
    _check_cls(src[0], 23)
    assert int(
        pipeline.get_source(_cfg("minc", tmp_path), "validation")[0]["label"]
    ) == names.index("carpet")
    assert int(pipeline.get_source(_cfg("minc", tmp_path), "test")[0]["label"]) == names.index(
        "wood"
    )
    with pytest.raises(FileNotFoundError, match="train2.txt"):
        pipeline.get_source(_cfg("minc", tmp_path, fold=2), "train")
    _check_pickle(src)
    _one_batch(src, seg=False)


def test_image_folder(tmp_path):
    for split, cls, mode in (
        ("train", "cat", "RGB"),
        ("train", "dog", "RGBA"),
        ("train", "dog", "L"),
        ("val", "dog", "P"),
    ):
        directory = tmp_path / split / cls
        _rgb(
            str(directory / f"{len(list(directory.glob('*'))) if directory.exists() else 0}.png"),
            7,
            9,
            mode=mode,
        )
    src = pipeline.get_source(_cfg("image_folder", tmp_path, num_classes=2), "train")
    assert src.class_names == ("cat", "dog") and len(src) == 3
    assert [int(src[i]["label"]) for i in range(3)] == [0, 1, 1]
    for i in range(3):
        _check_cls(src[i], 2)
    val = pipeline.get_source(_cfg("image_folder", tmp_path), "validation")  # val/ accepted
    assert len(val) == 1 and int(val[0]["label"]) == 1 and val.class_names == ("cat", "dog")
    with pytest.raises(FileNotFoundError, match="test"):
        pipeline.get_source(_cfg("image_folder", tmp_path), "test")
    _check_pickle(src)
    _one_batch(src, seg=False)


def test_seg_folder(tmp_path):
    for i, raw in enumerate(([[0, 1, 2], [255, 0, 1]], [[2, 2, 2], [0, 0, 0]])):
        _rgb(str(tmp_path / "train" / "images" / f"img{i}.jpg"), 2, 3)
        _label_png(str(tmp_path / "train" / "masks" / f"img{i}.png"), raw)
    _rgb(str(tmp_path / "validation" / "images" / "v.png"), 2, 3)
    _label_png(str(tmp_path / "validation" / "masks" / "v.png"), [[0, 3, 0], [0, 0, 0]])
    config = _cfg("seg_folder", tmp_path, num_classes=3, class_names=("bg", "a", "b"))
    src = pipeline.get_source(config, "train")
    assert len(src) == 2 and src.class_names == ("bg", "a", "b")
    np.testing.assert_array_equal(src[0]["mask"], [[0, 1, 2], [-1, 0, 1]])
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        pipeline.get_source(config, "validation")[0]
    with pytest.raises(ValueError, match="num_classes"):
        pipeline.get_source(_cfg("seg_folder", tmp_path), "train")
    os.remove(tmp_path / "train" / "masks" / "img1.png")
    with pytest.raises(FileNotFoundError, match="img1.png"):
        pipeline.get_source(config, "train")
    _label_png(str(tmp_path / "train" / "masks" / "img1.png"), [[2, 2, 2], [0, 0, 0]])
    _check_pickle(pipeline.get_source(config, "train"))
    _one_batch(pipeline.get_source(config, "train"))


def test_mismatched_image_and_mask_sizes_in_folders_are_reported(tmp_path):
    _rgb(str(tmp_path / "train" / "images" / "a.png"), 4, 4)
    _label_png(str(tmp_path / "train" / "masks" / "a.png"), np.zeros((3, 4)))
    src = pipeline.get_source(_cfg("seg_folder", tmp_path, num_classes=2), "train")
    with pytest.raises(ValueError, match="a.png"):
        src[0]


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEG_NAMES + CLS_NAMES)
def test_unknown_split(name):
    with pytest.raises(
        ValueError, match=r"has no split 'bogus'; available splits: \[.*'train'.*'validation'"
    ):
        pipeline.get_source(
            _cfg(name, None, num_classes=3 if name == "seg_folder" else None), "bogus"
        )


@pytest.mark.parametrize(
    "name,needle",
    [
        ("pascal_voc", "VOCdevkit/VOC2012"),
        ("pcontext", "SegmentationClassContext"),
        ("coco", "masks_voc"),
        ("minc", "minc-2500"),
        ("image_folder", "<class>"),
        ("seg_folder", "masks"),
    ],
)
def test_folder_adapters_missing_data(tmp_path, name, needle):
    extra = {"num_classes": 3} if name == "seg_folder" else {}
    with pytest.raises(FileNotFoundError, match="data_dir is not set") as info:
        pipeline.get_source(_cfg(name, None, **extra), "train")
    assert needle in str(info.value)
    with pytest.raises(FileNotFoundError, match="not found") as info:
        pipeline.get_source(_cfg(name, tmp_path / "nowhere", **extra), "train")
    assert str(tmp_path / "nowhere") in str(info.value) and "expected layout" in str(info.value)
    assert needle in str(info.value)


def test_forced_folder_backend_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        pipeline.get_source(_cfg("ade20k", tmp_path, backend="folder"), "train")
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        pipeline.get_source(_cfg("cityscapes", tmp_path, backend="folder"), "train")
    with pytest.raises(ValueError, match="backend"):
        pipeline.get_source(_cfg("cityscapes", tmp_path, backend="gcs"), "train")


def test_num_classes_mismatch_is_caught(tmp_path):
    _rgb(str(tmp_path / "train" / "a" / "x.png"), 4, 4)
    with pytest.raises(ValueError, match="1 classes"):
        pipeline.get_source(_cfg("image_folder", tmp_path, num_classes=5), "train")
