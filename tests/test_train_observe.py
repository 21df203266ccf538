"""train/observe.py: JSONL + TensorBoard logging, progress output, main-only writing, summary.json,
resume truncation and the segmentation sample PNG."""

from __future__ import annotations

import io
import json
import math
import re
import struct

import numpy as np
import pytest
from PIL import Image

from train import observe
from train.observe import Observer, read_metrics, save_segmentation_samples, voc_palette

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class FakeClock:
    """Replaces observe._now so throughput numbers are exact."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(observe, "_now", c)
    return c


def read_events(workdir):
    """All tensorboardX events under workdir/tb, parsed from the TFRecord framing by hand (no
    tensorboard reader offline): u64 length, masked crc32c(length), payload, masked crc32c(payload)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    files = list((workdir / "tb").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file written"
    per_file = []
    for f in files:
        events = []
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (hcrc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            assert hcrc == masked_crc32c(header)
            payload = data[pos + 12 : pos + 12 + length]
            (pcrc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert pcrc == masked_crc32c(payload)
            ev = Event()
            ev.ParseFromString(payload)
            events.append(ev)
            pos += 16 + length
        per_file.append(events)
    # Files in write order: names of two writers opened in the same second sort arbitrarily, the
    # first event's (sub-second) wall time does not.
    per_file.sort(key=lambda evs: evs[0].wall_time if evs else 0.0)
    return [ev for evs in per_file for ev in evs]


def scalars(events):
    """{tag: [(step, value), ...]} from parsed events."""
    out = {}
    for ev in events:
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def run_small(workdir, stream, clock=None, **kw):
    with Observer(workdir, total_steps=100, stream=stream, best_metric="mIoU", **kw) as obs:
        for step, loss in ((10, 2.0), (20, float("nan")), (30, 1.0)):
            if clock is not None:
                clock.t += 2.0
            obs.log_train(step, {"loss": loss, "lr": np.float32(0.01) * step}, examples=640)
            if step == 20:
                obs.log_eval(20, {"pixAcc": 0.9, "mIoU": 0.4, "iou": np.array([0.2, np.nan, 0.6])})
        obs.log_eval(30, {"pixAcc": 0.95, "mIoU": 0.35})
        table = obs.summary({"pixAcc": 0.95, "mIoU": 0.35}, config_name="cfg_small")
    return table


def test_jsonl_rows_order_values_and_nan_as_null(tmp_path, clock):
    run_small(tmp_path, io.StringIO(), clock)
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [
        (10, "train"),
        (20, "train"),
        (20, "eval"),
        (30, "train"),
        (30, "eval"),
    ]
    times = [r["time"] for r in rows]
    assert times == sorted(times) and all(isinstance(t, float) for t in times)
    r10, r20, e20 = rows[0], rows[1], rows[2]
    assert r10["loss"] == 2.0 and r10["lr"] == pytest.approx(0.1)
    assert r20["loss"] is None  # NaN -> null (strict JSON)
    # 10 steps and 640 examples per 2 s of the fake clock.
    assert r10["examples_per_sec"] == pytest.approx(320.0)
    assert r10["steps_per_sec"] == pytest.approx(5.0)
    assert e20["iou"] == [0.2, None, 0.6]  # non-scalar eval metric: JSONL only
    assert read_metrics(tmp_path, split="eval") == [rows[2], rows[4]]
    # Every line is strict JSON (no NaN/Infinity tokens).
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_tensorboard_event_file_has_scalar_tags(tmp_path):
    run_small(tmp_path, io.StringIO())
    sc = scalars(read_events(tmp_path))
    assert {
        "train/loss",
        "train/lr",
        "train/examples_per_sec",
        "train/steps_per_sec",
        "eval/pixAcc",
        "eval/mIoU",
    } <= set(sc)
    assert not any("iou" == t.split("/")[-1] for t in sc)  # the per-class list is JSONL-only
    assert [s for s, _ in sc["train/loss"]] == [10, 20, 30]
    assert sc["train/loss"][0][1] == 2.0 and math.isnan(sc["train/loss"][1][1])
    assert sc["eval/mIoU"] == [(20, pytest.approx(0.4)), (30, pytest.approx(0.35))]


def test_jax_values_including_bfloat16(tmp_path):
    import jax.numpy as jnp

    with Observer(tmp_path, total_steps=10, stream=io.StringIO()) as obs:
        obs.log_train(
            1, {"loss": jnp.asarray(0.5, jnp.bfloat16), "lr": jnp.float32(0.25)}, examples=2
        )
        obs.log_eval(1, {"mIoU": jnp.asarray(0.75), "iou": jnp.array([0.5, 1.0], jnp.bfloat16)})
    train, ev = read_metrics(tmp_path)
    assert (train["loss"], train["lr"]) == (0.5, 0.25)
    assert ev["mIoU"] == 0.75 and ev["iou"] == [0.5, 1.0]


def test_eval_is_flushed_before_close(tmp_path):
    obs = Observer(tmp_path, total_steps=10, stream=io.StringIO())
    obs.log_eval(5, {"top1": 0.5})
    # Not closed: a killed run must still have the row and the TB scalar on disk.
    assert read_metrics(tmp_path)[0]["top1"] == 0.5
    assert scalars(read_events(tmp_path))["eval/top1"] == [(5, 0.5)]
    obs.close()
    obs.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        obs.log_eval(6, {"top1": 0.5})


def test_non_main_writes_and_prints_nothing(tmp_path):
    workdir = tmp_path / "run"
    stream = TTY()
    with Observer(workdir, total_steps=10, is_main=False, stream=stream, best_metric="top1") as obs:
        rates = obs.log_train(5, {"loss": 1.0}, examples=8)
        obs.log_eval(5, {"top1": 0.7, "per_class": [0.1, 0.2]})
        obs.log_text("hello")
        assert (
            obs.save_samples(
                5,
                np.zeros((1, 2, 2, 3), np.float32),
                np.zeros((1, 2, 2), np.int32),
                np.zeros((1, 2, 2), np.int32),
                palette=voc_palette(2),
                mean=MEAN,
                std=STD,
            )
            is None
        )
        table = obs.summary({"top1": 0.7})
    assert set(rates) == {"examples_per_sec", "steps_per_sec"}
    assert "best top1" in table and obs.best_step == 5  # same API and state as on the main process
    assert not workdir.exists()
    assert stream.getvalue() == ""


def test_progress_disabled_prints_plain_lines(tmp_path):
    stream = io.StringIO()
    run_small(tmp_path, stream, progress=False)
    out = stream.getvalue()
    lines = out.splitlines()
    assert lines[0].startswith("step 10/100 | loss 2 | lr 0.1 |") and "ex/s" in lines[0]
    assert "steps/s" in lines[0]
    assert lines[1].startswith("step 20/100 | loss nan")
    assert lines[2].startswith("eval step 20 | pixAcc 0.9 | mIoU 0.4 | best mIoU 0.4 @ 20")
    assert "iou" not in lines[2]
    assert "\r" not in out


@pytest.mark.parametrize("how", ["env", "not_tty"])
def test_progress_auto_disabled(tmp_path, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("JAXENC_NO_PROGRESS", "1")
        stream = TTY()
    else:
        monkeypatch.delenv("JAXENC_NO_PROGRESS", raising=False)
        stream = io.StringIO()
    with Observer(tmp_path, total_steps=10, stream=stream) as obs:
        assert not obs.progress_enabled
        obs.log_train(5, {"loss": 0.5}, examples=8)
    assert stream.getvalue().startswith("step 5/10 | loss 0.5 |")


def test_progress_bar_on_tty(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXENC_NO_PROGRESS", raising=False)
    stream = TTY()
    with Observer(tmp_path, total_steps=100, stream=stream) as obs:
        assert obs.progress_enabled
        obs.log_train(50, {"loss": 0.25, "lr": 0.001, "other": 3.0}, examples=800)
        obs.log_text("a message")
        obs.log_train(100, {"loss": 0.125, "lr": 0.0005}, examples=800)
    out = stream.getvalue()
    assert "100/100" in out and "loss=0.125" in out and "lr=0.0005" in out
    assert "ex/s=" in out and "steps/s=" in out
    assert "a message" in out
    assert "step 50/100 |" not in out  # no plain train lines while the bar is shown


def test_summary_json_and_table(tmp_path, clock):
    table = run_small(tmp_path, io.StringIO(), clock)
    info = json.loads((tmp_path / "summary.json").read_text())
    assert info["config"] == "cfg_small"
    assert info["steps"] == 30 and info["start_step"] == 0 and info["total_steps"] == 100
    assert info["best"] == {"metric": "mIoU", "value": 0.4, "step": 20}
    assert info["final"] == {"pixAcc": 0.95, "mIoU": 0.35}
    assert info["examples_per_sec"] == pytest.approx(320.0)
    assert info["examples_per_sec_steady"] == pytest.approx(320.0)
    assert info["wall_time_s"] == pytest.approx(6.0)
    lines = table.splitlines()
    assert lines[0].split() == ["config", "cfg_small"]
    assert "best mIoU" in table and "0.4 (step 20)" in table and "final pixAcc" in table
    value_cols = {re.match(r"^(.*?\S)\s{2,}(\S.*)$", line).start(2) for line in lines}
    assert len(value_cols) == 1  # values aligned in one column


def test_summary_accepts_trainer_result_dict(tmp_path):
    # The trainer passes its result dict: reserved-looking keys, str, bool, None and lists are fine.
    result = {
        "step": 10,
        "pixAcc": 0.5,
        "mIoU": float("nan"),
        "best_metric": "mIoU",
        "best_value": None,
        "stopped_early": False,
        "iou": [0.5, float("inf")],
    }
    with Observer(tmp_path, total_steps=10, stream=io.StringIO()) as obs:
        table = obs.summary(result)
    info = json.loads((tmp_path / "summary.json").read_text())
    assert info["best"] is None and info["config"] is None and info["examples_per_sec"] is None
    assert info["final"] == {
        "step": 10,
        "pixAcc": 0.5,
        "mIoU": None,
        "best_metric": "mIoU",
        "best_value": None,
        "stopped_early": False,
        "iou": [0.5, None],
    }
    assert "final best_metric" in table and "final iou" not in table
    with pytest.raises(TypeError, match="final"):
        obs.summary([("a", 1.0)])


def test_paused_time_excluded_from_throughput(tmp_path, clock):
    with Observer(tmp_path, total_steps=100, stream=io.StringIO()) as obs:
        clock.t += 1.0
        with obs.paused():
            clock.t += 5.0  # e.g. eval / checkpointing
        clock.t += 1.0
        rates = obs.log_train(10, {"loss": 1.0}, examples=100)
    assert rates == {"examples_per_sec": pytest.approx(50.0), "steps_per_sec": pytest.approx(5.0)}


def test_resume_drops_lost_rows_and_restores_best(tmp_path):
    with Observer(tmp_path, total_steps=100, stream=io.StringIO(), best_metric="mIoU") as obs:
        for step in (10, 20, 30, 40, 50):
            obs.log_train(step, {"loss": 1.0 / step}, examples=4)
        obs.log_eval(20, {"mIoU": 0.3})
        obs.log_eval(40, {"mIoU": 0.6})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 60, "split": "tr')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30, 40, 50, 20, 40]

    with Observer(
        tmp_path, total_steps=100, start_step=30, stream=io.StringIO(), best_metric="mIoU"
    ) as obs:
        assert (obs.best_value, obs.best_step) == (0.3, 20)
        obs.log_train(40, {"loss": 0.5}, examples=4)
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [
        (10, "train"),
        (20, "train"),
        (30, "train"),
        (20, "eval"),
        (40, "train"),
    ]
    assert rows[-1]["loss"] == 0.5
    # Each run has its own event file (a restart within the same second must not truncate the first).
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    assert [s for s, _ in scalars(read_events(tmp_path))["train/loss"]] == [10, 20, 30, 40, 50, 40]
    purge = [ev for ev in read_events(tmp_path) if ev.HasField("session_log")]
    assert any(ev.step == 31 for ev in purge)  # TensorBoard hides steps >= 31 of the first run


def test_read_metrics_missing_and_corrupt(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match="split"):
        read_metrics(tmp_path, split="test")


def test_observer_argument_errors(tmp_path):
    s = io.StringIO()
    with pytest.raises(ValueError, match="total_steps"):
        Observer(tmp_path, total_steps=0)
    with pytest.raises(ValueError, match="start_step"):
        Observer(tmp_path, total_steps=10, start_step=11)
    with Observer(tmp_path, total_steps=10, stream=s) as obs:
        with pytest.raises(ValueError, match="reserved"):
            obs.log_train(1, {"step": 1.0}, examples=1)
        with pytest.raises(ValueError, match=r"metrics\['per_class'\].*scalars only"):
            obs.log_train(1, {"per_class": np.zeros(3)}, examples=1)
        with pytest.raises(ValueError, match="examples"):
            obs.log_train(1, {"loss": 1.0}, examples=-1)
        with pytest.raises(TypeError, match="dict"):
            obs.log_eval(1, [("top1", 1.0)])
        with pytest.raises(TypeError, match="'bad'"):
            obs.log_eval(1, {"bad": object()})
        obs.log_train(5, {"loss": 1.0}, examples=1)
        with pytest.raises(ValueError, match="previous log_train step 5"):
            obs.log_train(5, {"loss": 1.0}, examples=1)
        with pytest.raises(ValueError, match="step"):
            obs.log_eval(-1, {"top1": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [5]  # failed calls wrote nothing


# ---------------------------------------------------------------------- segmentation samples
def normalise(img_u8):
    return ((img_u8 / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)


def test_samples_png_layout_and_colours(tmp_path):
    rng = np.random.default_rng(0)
    n, h, w = 3, 6, 5
    img_u8 = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    masks = rng.integers(0, 4, (n, h, w)).astype(np.int32)
    masks[:, 0, :] = -1  # ignore row
    preds = rng.integers(0, 4, (n, h, w)).astype(np.int64)
    palette = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]])
    path = save_segmentation_samples(
        tmp_path / "sub" / "s.png",
        normalise(img_u8),
        masks,
        preds,
        palette=palette.reshape(-1).tolist(),
        mean=MEAN,
        std=STD,
    )
    assert path == tmp_path / "sub" / "s.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (3 * w, n * h)  # (width, height): 3 panels, one row per sample
        arr = np.asarray(im)
    for i in range(n):
        row = arr[i * h : (i + 1) * h]
        np.testing.assert_array_equal(row[:, :w], img_u8[i])  # de-normalised image round-trips
        gt, pr = row[:, w : 2 * w], row[:, 2 * w :]
        np.testing.assert_array_equal(gt[1:], palette[masks[i, 1:]])
        np.testing.assert_array_equal(gt[0], np.full((w, 3), 255))  # ignore pixels are white
        np.testing.assert_array_equal(pr, palette[preds[i]])


def test_samples_max_rows_and_observer_path(tmp_path):
    n, h, w = 5, 4, 4
    imgs = np.zeros((n, h, w, 3), np.float32)
    labels = np.zeros((n, h, w), np.int32)
    with Observer(tmp_path, total_steps=10, stream=io.StringIO()) as obs:
        path = obs.save_samples(
            7, imgs, labels, labels, palette=voc_palette(21), mean=MEAN, std=STD, max_rows=2
        )
    assert path == tmp_path / "samples" / "step_0000007.png"
    with Image.open(path) as im:
        assert im.size == (3 * w, 2 * h)


def test_samples_pixel_scale_0_255_mean(tmp_path):
    # mean/std given in 0..255 units (mmseg style) de-normalise without the extra x255.
    img_u8 = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3) * 20
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    x = ((img_u8 - np.array(mean)) / np.array(std)).astype(np.float32)
    p = save_segmentation_samples(
        tmp_path / "a.png",
        x,
        np.zeros((1, 2, 2), np.int32),
        np.zeros((1, 2, 2), np.int32),
        palette=[[0, 0, 0]],
        mean=mean,
        std=std,
    )
    with Image.open(p) as im:
        np.testing.assert_array_equal(np.asarray(im)[:, :2], img_u8[0])


def test_voc_palette():
    pal = voc_palette(21)
    assert pal.shape == (21, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128]  # VOC "person"
    full = voc_palette(256)
    assert len({tuple(c) for c in full.tolist()}) == 256 and [255, 255, 255] not in full.tolist()
    with pytest.raises(ValueError, match="num_classes"):
        voc_palette(0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(images=np.zeros((2, 4, 4), np.float32)), r"images: expected \(N, H, W, 3\)"),
        (dict(images=np.zeros((2, 4, 4, 3), np.uint8)), "images: expected a float array"),
        (
            dict(masks=np.zeros((2, 4, 5), np.int32)),
            r"masks: expected shape \(N, H, W\) = \(2, 4, 4\)",
        ),
        (dict(preds=np.zeros((2, 4, 4), np.float32)), "preds: expected an integer array"),
        (dict(masks=np.full((2, 4, 4), 3, np.int32)), r"masks: labels must be in \[0, 3\).*got 3"),
        (
            dict(preds=np.full((2, 4, 4), -2, np.int32)),
            r"preds: labels must be in \[0, 3\).*got -2",
        ),
        (dict(palette=[[0, 0]]), "palette: expected"),
        (dict(palette=[[0, 0, 300]]), r"palette: RGB values must be in \[0, 255\]"),
        (dict(mean=(0.5, 0.5)), "mean: expected 3"),
        (dict(std=(0.5, 0.0, 0.5)), "std: expected 3 positive"),
        (dict(max_rows=0), "max_rows"),
    ],
)
def test_samples_errors(tmp_path, change, match):
    kw = dict(
        images=np.zeros((2, 4, 4, 3), np.float32),
        masks=np.zeros((2, 4, 4), np.int32),
        preds=np.zeros((2, 4, 4), np.int32),
        palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]],
        mean=MEAN,
        std=STD,
    )
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        save_segmentation_samples(
            tmp_path / "x.png", kw.pop("images"), kw.pop("masks"), kw.pop("preds"), **kw
        )
    assert not (tmp_path / "x.png").exists()
