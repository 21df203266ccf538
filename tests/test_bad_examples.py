"""Bad files in users' data: ``config.input.bad_examples = "error" | "skip"`` (issue 17 item 5).

Crafted folders in tmp_path: a truncated JPEG, a text file named ``.jpg`` and a mask with a label
outside 0..K-1, in image_folder / seg_folder layouts. "error" stops with one line naming the file,
the split and the step (``train.main`` in a subprocess: exit 1, no traceback); "skip" replaces the
example by the next readable record, the same for any worker count and after resume, counts it and
logs each path once; evaluation follows the same policy.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from index_source import IndexSource
from PIL import Image, ImageFile
from tiny_config import tiny_config

from train import observe
from train.data import bad_examples, pipeline
from train.data.bad_examples import BadExample, BadExampleError
from train.data.sources import _base
from train.trainer import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
SKIP = {"input.bad_examples": "skip"}
SIZE = 8  # every crafted image is SIZE x SIZE, so raw examples stack into batches


def _image(path: Path, seed: int, fmt: str = "PNG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _truncated_jpeg(path: Path, seed: int) -> None:
    data = _image(path, seed, "JPEG")
    path.write_bytes(data[:-10])  # headers intact: PIL opens it and fails (or pads) when decoding


def _not_an_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("these are my notes, not a picture\n")


def make_image_folder(root: Path) -> dict[str, list[str]]:
    """train: a/{0.png, 1.jpg (truncated), 2.png}, b/{0.png, 1.jpg (text), 2.png} (records 1 and 4
    bad); validation: a/0.png, b/0.png, b/1.jpg (text; record 2). Returns the bad paths per split."""
    for cls, k in (("a", 0), ("a", 2), ("b", 0), ("b", 2)):
        _image(root / "train" / cls / f"{k}.png", seed=10 * k + len(cls))
    _truncated_jpeg(root / "train" / "a" / "1.jpg", seed=1)
    _not_an_image(root / "train" / "b" / "1.jpg")
    _image(root / "validation" / "a" / "0.png", seed=5)
    _image(root / "validation" / "b" / "0.png", seed=6)
    _not_an_image(root / "validation" / "b" / "1.jpg")
    return {
        "train": [str(root / "train" / "a" / "1.jpg"), str(root / "train" / "b" / "1.jpg")],
        "validation": [str(root / "validation" / "b" / "1.jpg")],
    }


def _dataset(name: str, root: Path, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, "data_dir": str(root), **extra})


def _records(n: int, steps: int, **kw) -> np.ndarray:
    """The record index at each (step, row) of a training stream over n records."""
    it = pipeline.train_iterator(IndexSource(n), **{**kw, "transform": None})
    return np.stack([next(it)["index"] for _ in range(steps)])


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# -- decoding: what counts as bad ----------------------------------------------------------------


def test_decoding_errors_are_bad_examples(tmp_path, monkeypatch):
    good = tmp_path / "good.jpg"
    _image(good, seed=0, fmt="JPEG")
    assert _base.read_rgb(str(good)).shape == (SIZE, SIZE, 3)
    _truncated_jpeg(tmp_path / "cut.jpg", seed=0)
    _not_an_image(tmp_path / "notes.png")
    cases = {"cut.jpg": "truncated", "notes.png": r"not an image \(PIL cannot identify"}
    for flag in (False, True):  # PIL pads truncated files when a program sets this flag
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", flag)
        for name, needle in cases.items():
            with pytest.raises(BadExample, match=needle) as info:
                _base.read_rgb(str(tmp_path / name))
            assert info.value.path == str(tmp_path / name)
            assert isinstance(info.value, ValueError)  # a data error for policy-free callers
    with pytest.raises(BadExample, match="cannot be read") as info:
        _base.read_rgb(str(tmp_path / "gone.png"))
    assert info.value.path == str(tmp_path / "gone.png")


def test_mask_labels_outside_the_classes_are_bad(tmp_path):
    for stem, top in (("ok", 2), ("bad", 7)):
        _image(tmp_path / "train" / "images" / f"{stem}.png", seed=1)
        labels = np.zeros((SIZE, SIZE), np.uint8)
        labels[0, :3] = (1, top, 255)
        (tmp_path / "train" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(tmp_path / "train" / "masks" / f"{stem}.png")
    src = pipeline.get_source(_dataset("seg_folder", tmp_path, num_classes=3), "train")
    assert [os.path.basename(p) for p in src.mask_paths] == ["bad.png", "ok.png"]
    assert src[1]["mask"][0, 2] == -1  # 255 = ignore is not bad
    with pytest.raises(BadExample, match=r"\[7\] are outside 0\.\.2") as info:
        src[0]
    assert info.value.path == str(tmp_path / "train" / "masks" / "bad.png")

    # Evaluation under "skip": left out (valid False) and counted; under "error": one line.
    batches = list(pipeline.eval_batches(src, batch_size=2, transform=None, bad_examples="skip"))
    np.testing.assert_array_equal(batches[0]["valid"], [False, True])
    np.testing.assert_array_equal(batches[0]["skipped"], [1, 0])
    with pytest.raises(BadExampleError, match="'train' split at example 0: .*bad.png"):
        list(pipeline.eval_batches(src, batch_size=2, transform=None))


def test_exceptions_survive_pickling():
    # Grain workers send exceptions back pickled; a lost field would hang or garble the message.
    for err in (
        BadExample("/d/x.jpg", "is truncated"),
        BadExampleError("/d/x.jpg", "is truncated", "train", "at training step 3 (record 1)"),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.path == "/d/x.jpg"
    err = BadExampleError("/d/x.jpg", "is truncated", "validation", "at example 2")
    assert str(err.during("in the evaluation at step 6")).startswith(
        "bad example in the 'validation' split at example 2, in the evaluation at step 6: "
        "/d/x.jpg: is truncated. Fix or remove the file"
    )


def test_policy_value_is_checked(tmp_path):
    message = r"config.input.bad_examples must be one of \['error', 'skip'\], got 'ignore'"
    with pytest.raises(ValueError, match=message):
        pipeline.train_iterator(
            IndexSource(4), global_batch_size=2, seed=0, transform=None, bad_examples="ignore"
        )
    with pytest.raises(ValueError, match=message):
        pipeline.eval_batches(IndexSource(4), batch_size=2, transform=None, bad_examples="ignore")
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(**{"input.bad_examples": "ignore"}), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# -- the pipeline ----------------------------------------------------------------------------------


def test_error_names_the_file_split_and_step(tmp_path):
    bad = make_image_folder(tmp_path)
    src = pipeline.get_source(_dataset("image_folder", tmp_path), "train")
    kw = dict(global_batch_size=2, seed=3, transform=None, process_index=0, process_count=1)
    records = _records(len(src), 3, **kw)  # one epoch
    first = int(np.flatnonzero(np.isin(records, [1, 4]).any(axis=1))[0])  # 0-based step
    it = pipeline.train_iterator(src, **kw)
    for _ in range(first):
        assert set(next(it)) == {"image", "label"}  # "error" adds no column
    with pytest.raises(BadExampleError) as info:
        next(it)
    message = str(info.value)
    assert "\n" not in message
    assert f"bad example in the 'train' split at training step {first + 1} (record " in message
    assert info.value.path in bad["train"] and info.value.path in message
    assert "--config.input.bad_examples=skip" in message


@pytest.mark.slow
def test_skip_is_the_same_for_any_worker_count_and_after_resume(tmp_path):
    bad = make_image_folder(tmp_path)
    src = pipeline.get_source(_dataset("image_folder", tmp_path), "train")
    n, steps = len(src), 6  # two epochs of batch 2
    kw = dict(global_batch_size=2, seed=3, transform=None, process_index=0, process_count=1)
    expected = _take(pipeline.train_iterator(src, bad_examples="skip", **kw), steps)

    # The replacement of a bad record is the next readable one, and the count is 1 per bad file
    # per epoch.
    records = _records(n, steps, **kw).reshape(-1)
    readable = {r: src[r] for r in range(n) if r not in (1, 4)}
    replaced = {1: 2, 4: 5}
    rows = [(b, i) for b in range(steps) for i in range(2)]
    for (b, i), r in zip(rows, records):
        want = readable[replaced.get(int(r), int(r))]
        np.testing.assert_array_equal(expected[b]["image"][i], want["image"])
        assert expected[b]["label"][i] == want["label"]
        assert expected[b]["skipped"][i] == (r in (1, 4))
    assert sum(int(b["skipped"].sum()) for b in expected[:3]) == len(bad["train"])

    # Resume mid-epoch from the iterator state (what a checkpoint stores).
    it = pipeline.train_iterator(src, bad_examples="skip", **kw)
    _take(it, 4)
    resumed = pipeline.train_iterator(src, bad_examples="skip", **kw)
    resumed.set_state(it.get_state())
    _assert_batches_equal(_take(resumed, 2), expected[4:])

    # Two grain worker processes: the same batches.
    it = pipeline.train_iterator(src, bad_examples="skip", worker_count=2, **kw)
    try:
        _assert_batches_equal(_take(it, steps), expected)
    finally:
        it.close()

    # "error" from a worker process arrives as the same one-line error.
    it = pipeline.train_iterator(src, worker_count=2, **kw)
    try:
        with pytest.raises(BadExampleError, match="'train' split at training step"):
            _take(it, 3)
    finally:
        it.close()


def test_eval_batches_policies_and_read_example(tmp_path, caplog):
    bad = make_image_folder(tmp_path)
    src = pipeline.get_source(_dataset("image_folder", tmp_path), "validation")
    with pytest.raises(BadExampleError, match="'validation' split at example 2: .*b/1.jpg"):
        list(pipeline.eval_batches(src, batch_size=2, transform=None))
    caplog.set_level(logging.WARNING, logger="train.data.bad_examples")
    batches = list(pipeline.eval_batches(src, batch_size=2, transform=None, bad_examples="skip"))
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(valid, [True, True, False, False])  # bad, padding
    np.testing.assert_array_equal(np.concatenate([b["skipped"] for b in batches]), [0, 0, 1, 0])
    # The bad record 2 takes the data of record (2 + 1) mod 3 = 0; the padding is record 3 mod 3.
    np.testing.assert_array_equal(batches[1]["image"][0], src[0]["image"])

    # For callers reading by index (train.evaluate's full-size segmentation pass).
    assert bad_examples.read_example(src, 0, policy="error")["label"] == 0
    assert bad_examples.read_example(src, 2, policy="skip") is None
    with pytest.raises(BadExampleError, match="'validation' split at example 2"):
        bad_examples.read_example(src, 2, policy="error")
    logged = [r.getMessage() for r in caplog.records if bad["validation"][0] in r.getMessage()]
    assert len(logged) == 1 and "skipping a bad example in the 'validation' split" in logged[0]


class RaisingSource:
    """Every record raises ``error``."""

    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise self.error


def test_all_bad_is_an_error_and_other_exceptions_are_not_touched():
    kw = dict(global_batch_size=2, seed=0, transform=None, bad_examples="skip")
    everything_bad = RaisingSource(BadExample("/d/x.png", "is truncated"))
    with pytest.raises(BadExampleError, match="every other of the 2 examples is bad too"):
        next(pipeline.train_iterator(everything_bad, **kw))
    with pytest.raises(KeyError, match="a bug"):  # not a data problem: no policy applies
        next(pipeline.train_iterator(RaisingSource(KeyError("a bug")), **kw))


def test_observer_writes_counts_as_ints_and_prints_them_when_non_zero(tmp_path):
    stream = io.StringIO()
    with observe.Observer(tmp_path, total_steps=2, stream=stream, progress=False) as obs:
        obs.log_train(1, {"loss": 1.0}, examples=2, counts={"skipped_examples": 0})
        obs.log_train(2, {"loss": 1.0}, examples=2, counts={"skipped_examples": 3})
        obs.log_eval(2, {"top1": 0.5}, counts={"skipped_examples": 1})
        with pytest.raises(ValueError, match="non-negative int"):
            obs.log_eval(2, {"top1": 0.5}, counts={"skipped_examples": -1})
        obs.summary({"top1": 0.5}, skipped_examples={"train": 3, "eval": 1})
    rows = observe.read_metrics(tmp_path)
    assert [r["skipped_examples"] for r in rows] == [0, 3, 1]
    assert all(type(r["skipped_examples"]) is int for r in rows)
    lines = stream.getvalue().splitlines()
    assert "skipped" not in lines[0] and "skipped_examples 3" in lines[1]
    assert "skipped_examples 1" in lines[2]
    assert any(
        line.split() == ["skipped", "examples", "train", "3,", "eval", "1"] for line in lines
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_examples"] == {"train": 3, "eval": 1}


# -- the trainer -----------------------------------------------------------------------------------


def _cls_overrides(data_dir: Path) -> dict:
    return {
        "dataset.name": "image_folder",
        "dataset.data_dir": str(data_dir),
        "dataset.num_classes": 2,
        "input.global_batch_size": 2,
        "input.eval_batch_size": 2,
        "train.num_steps": 6,
        "train.eval_every": 6,
        "train.checkpoint_every": 1,
        "train.log_every": 1,
        "optim.warmup_steps": 1,
    }


def _cls_config(data_dir: Path, **more):
    from configs import tiny_cls

    c = tiny_cls.get_config()
    for dotted, value in {**_cls_overrides(data_dir), **more}.items():
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _stream(seed: int) -> dict:
    return dict(global_batch_size=2, seed=seed, process_index=0, process_count=1)


def _first_bad_step(seed: int) -> int:
    records = _records(6, 3, **_stream(seed))
    return int(np.flatnonzero(np.isin(records, [1, 4]).any(axis=1))[0]) + 1


def _last_line_of_failed_cli(module: str, *args: str) -> str:
    """``python -m <module> --config configs/tiny_cls.py <args>`` from the repository root: asserts
    exit 1 and no traceback on stderr; returns stderr's last line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXENC_NO_PROGRESS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", module, "--config", "configs/tiny_cls.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_error_stops_train_main_with_one_line_then_skip_resumes(tmp_path, caplog):
    bad = make_image_folder(tmp_path / "data")
    # A seed whose first batch holds a bad file: the run stops before it compiles anything.
    seed = next(s for s in range(100) if _first_bad_step(s) == 1)
    flags = [
        f"--config.{k}={v}" for k, v in {**_cls_overrides(tmp_path / "data"), "seed": seed}.items()
    ]
    workdir = tmp_path / "run"
    last = _last_line_of_failed_cli("train.main", "--workdir", str(workdir), *flags)
    assert last.startswith("train.main: bad example in the 'train' split at training step 1 ")
    assert any(path in last for path in bad["train"]), last
    assert last.endswith(
        "Fix or remove the file, or run the same command again with "
        "--config.input.bad_examples=skip (training resumes from its last checkpoint)"
    )
    assert not observe.read_metrics(workdir) and (workdir / "config.json").is_file()

    caplog.set_level(logging.WARNING, logger="train.data.bad_examples")
    result = train_and_evaluate(_cls_config(tmp_path / "data", seed=seed, **SKIP), workdir)
    assert result["step"] == 6 and result["skipped_examples"] == {"train": 4, "eval": 1}
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["skipped_examples"] == {"train": 4, "eval": 1}  # 2 epochs x 2 bad files
    train_rows = observe.read_metrics(workdir, split="train")
    eval_rows = observe.read_metrics(workdir, split="eval")
    assert eval_rows[-1]["skipped_examples"] == 1
    for path in bad["train"] + bad["validation"]:  # met twice in training: logged once
        assert sum(path in r.getMessage() for r in caplog.records) == 1, path

    per_step = np.isin(_records(6, 6, **_stream(seed)), [1, 4]).sum(axis=1)
    assert [r["skipped_examples"] for r in train_rows] == np.cumsum(per_step).tolist()
    # Run again: nothing left to train, the count comes back from the last checkpoint.
    again = train_and_evaluate(_cls_config(tmp_path / "data", seed=seed, **SKIP), workdir)
    assert again["step"] == 6 and again["skipped_examples"]["train"] == 4


@pytest.mark.slow
def test_error_in_the_trainers_evaluation_names_the_step(tmp_path):
    make_image_folder(tmp_path / "data")
    # Only the validation split is bad here.
    (tmp_path / "data" / "train" / "a" / "1.jpg").unlink()
    (tmp_path / "data" / "train" / "b" / "1.jpg").unlink()
    config = _cls_config(tmp_path / "data", **{"train.eval_every": 1})  # compiles as above
    with pytest.raises(BadExampleError) as info:
        train_and_evaluate(config, tmp_path / "run")
    assert str(info.value).startswith(
        "bad example in the 'validation' split at example 2, in the evaluation at step 1: "
    )


# -- python -m train.evaluate ------------------------------------------------------------------------


def _seg_folder_with_a_bad_mask(root: Path) -> None:
    """validation: images/{bad,ok}.png, masks with labels in 0..2 except bad.png's 7."""
    for stem, top in (("ok", 2), ("bad", 7)):
        _image(root / "validation" / "images" / f"{stem}.png", seed=2)
        labels = np.zeros((SIZE, SIZE), np.uint8)
        labels[0, :2] = (1, top)
        (root / "validation" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(root / "validation" / "masks" / f"{stem}.png")


@pytest.mark.slow
def test_train_evaluate_follows_the_policy(tmp_path):
    from random_weights import save_random_weights

    from configs import tiny
    from train.evaluate import evaluate_checkpoint

    seg = tiny.get_config()
    seg.dataset = _dataset("seg_folder", tmp_path / "seg", num_classes=3, image_size=SIZE)
    _seg_folder_with_a_bad_mask(tmp_path / "seg")
    cls = _cls_config(tmp_path / "cls")
    make_image_folder(tmp_path / "cls")
    single = {"mode": "single_scale", "base_size": SIZE, "crop_size": SIZE, "save_predictions": 0}
    for config, name, extra in ((seg, "seg", single), (cls, "cls", {})):
        weights = tmp_path / f"{name}.msgpack"
        save_random_weights(config, weights, size=SIZE)
        with pytest.raises(
            BadExampleError, match=r"'validation' split at example [02]: .*(bad|1)\."
        ):
            evaluate_checkpoint(config, weights, tmp_path / f"e_{name}", overrides=extra)
        config.input.bad_examples = "skip"
        out = evaluate_checkpoint(config, weights, tmp_path / f"s_{name}", overrides=extra)
        assert (out["skipped_examples"], out["num_images"]) == (1, 1 if name == "seg" else 2)
        saved = json.loads((tmp_path / f"s_{name}" / "eval_metrics.json").read_text())
        assert saved["skipped_examples"] == 1

    # The command line: one line on stderr and exit 1 under "error", no traceback.
    flags = [f"--config.{k}={v}" for k, v in _cls_overrides(tmp_path / "cls").items()]
    last = _last_line_of_failed_cli(
        "train.evaluate",
        *("--checkpoint", str(tmp_path / "cls.msgpack"), "--outdir", str(tmp_path / "cli")),
        *flags,
    )
    assert last.startswith("train.evaluate: bad example in the 'validation' split at example 2: ")
    assert str(tmp_path / "cls" / "validation" / "b" / "1.jpg") in last
    assert last.endswith("run again with --config.input.bad_examples=skip"), last
