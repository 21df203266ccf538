"""A trained model on your own images: ``python -m train.predict``.

    python -m train.predict --config configs/<recipe>.py --checkpoint RUN_OR_STORE_NAME_OR_FILE \\
        --input photo.jpg [--input more/ ...] [more.jpg ...] --output DIR [--mode single_scale] ...

``--checkpoint`` is what ``train.evaluate`` takes (:mod:`train.inference`): a trainer workdir (its
latest checkpoint; ``--use_best`` for ``best/``), a checkpoint or step directory, a model-store name
or a weights file (``.pth``/``.zip``/``.msgpack``) for the config's model.

Inputs: ``--input`` (repeatable) and any positional arguments (so ``--input photos/*.jpg`` works), each
a file or a folder. A folder gives every file directly in it (not its subfolders; ``--recursive``
for those), sorted by name, hidden files (``.name``) left out. Every input is tried: a file that is
not an image PIL can read, or a corrupt or truncated one, is reported on one line (path and reason)
and skipped, the others are still written, and the exit code is 1. A path that does not exist, or no
file at all, is an error before the model is loaded (exit code 2). A file named twice (or also
found in a named folder) is predicted once.

Images of any size and PIL mode are converted to RGB uint8 (:func:`read_image`): the EXIF
orientation is applied first (phone photographs are often stored rotated); grey, palette, CMYK, YCbCr
and the other modes go through PIL's ``convert("RGB")``; an image with transparency (RGBA, LA, PA, or
a palette/grey image with a transparent colour) is composited on black, the colour the evaluator
pads with; 16-bit images (``I;16``) are scaled to 8 bits (x / 257), 32-bit integer (``I``) and float
(``F``) images likewise by their range (values up to 255 kept; up to 65535 divided by 257; otherwise
scaled by their maximum; float images in [0, 1] multiplied by 255). Multi-frame files give their
first frame. "The input's size" below is the size as displayed, after the EXIF rotation (width and
height swapped for a quarter turn), so the PNGs line up with the photograph in any viewer.

Segmentation configs: the config's evaluation protocol (``config.eval``, as ``train.evaluate``:
multi-scale + flip + sliding window, the long side resized to ``base_size`` times each scale, the
scores resized back to the input size; ``--mode single_scale`` for one pass at scale 1.0 without
flip), on the full image normalised as ``(x * (1/255) - mean) / std``. Per input ``<stem>.png``: the
labels as a palette PNG (mode "P", the input's size, the dataset's palette; with more than 256
classes a 16-bit grey PNG of the class indices instead), and ``<stem>_overlay.png``: the input
blended with the label colours, ``(1 - alpha) * image + alpha * colour`` (``--alpha``, default 0.5),
the input's size. ``--max_size N`` (default 0 = off) bounds the cost on large photographs: an
image whose long side exceeds N is first resized to long side N (PIL bilinear, antialiased), the
protocol runs on that, and the labels are resized back to the input size (nearest). The score maps
are float32 ``(H, W, num_classes)`` at the size the protocol runs at, e.g. 7 GB for a 12-megapixel
photograph and 150 classes, so a many-class model on phone photographs wants ``--max_size 1024``
or so, above all on a CPU. Two inputs with the same stem (``a/x.jpg`` and ``b/x.png``; compared
case-insensitively) get ``x`` and ``x-2`` in input order, so nothing is overwritten;
``predictions.jsonl`` maps each input to its files (``{"path", "label", "overlay", "size": [W,
H]}``).

Recognition configs: the config's validation transform (the single crop of ``train.evaluate``),
``predictions.jsonl`` with one line per image read: ``{"path": ..., "top_k": [{"class": name,
"index": i, "prob": p}, ...]}``, the ``--top_k`` (default 5) most probable classes under the
softmax of the logits, most probable first. Class names come from the dataset's source
(``config.dataset``; where it cannot be opened, e.g. the dataset is not on this machine, the
indices as strings).

The eval overrides of ``train.evaluate`` that apply here: ``--mode --scales --flip --base_size
--crop_size --batch_size`` (windows, or recognition images, per forward pass). A tqdm progress bar
goes to stderr (off when stderr is not a terminal or ``$JAXENC_NO_PROGRESS`` is set), and a summary
line at the end (images written, failed, the output folder).

One process, all of its local devices: the windows (or images) of each forward pass are split over
them (:func:`jaxenc.models.multi_eval.make_sharded_predict`); multi-process runs are not needed for
a folder of images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxenc.models import multi_eval
from train import inference
from train.data import arrays

__all__ = [
    "ImageReadError",
    "InputError",
    "PredictReport",
    "find_inputs",
    "output_stems",
    "overlay_image",
    "predict_images",
    "read_image",
]

PREDICTIONS_FILE = "predictions.jsonl"
OVERLAY_SUFFIX = "_overlay"
DEFAULT_ALPHA = 0.5
DEFAULT_TOP_K = 5
#: The ``config.eval`` keys that ``--mode`` etc. override here (the others are about a dataset split).
OVERRIDE_KEYS = ("mode", "scales", "flip", "base_size", "crop_size", "batch_size")


class InputError(ValueError):
    """A bad ``--input``: a path that does not exist, or no file to predict."""


class ImageReadError(ValueError):
    """A file that is not a readable image (the message says why)."""


@dataclasses.dataclass(frozen=True)
class PredictReport:
    """What :func:`predict_images` did: the inputs written, the ``(path, reason)`` of those skipped,
    and the output folder."""

    written: tuple[Path, ...]
    failed: tuple[tuple[Path, str], ...]
    output: Path


# ---------------------------------------------------------------------------------------------------
# inputs


def find_inputs(
    paths: Iterable[str | os.PathLike],
    *,
    recursive: bool = False,
    exclude: str | os.PathLike | None = None,
) -> list[Path]:
    """The files named by ``paths``, in order: a file as given; a folder's files sorted by name
    (``recursive``: those of its subfolders too), hidden ones and anything under ``exclude`` (the
    output folder) left out. A file reached twice is kept once. Raises :class:`InputError` for a
    path that does not exist or when no file is found."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("--input: no input given; name image files or folders")
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        if not p.exists():
            raise InputError(f"--input: {p} does not exist")
        if p.is_dir():
            walk = p.rglob("*") if recursive else p.iterdir()
            files = sorted(
                f
                for f in walk
                if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and not (skip is not None and f.resolve().is_relative_to(skip))
            )
        else:
            files = [p]
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    if not found:
        where = ", ".join(str(p) for p in paths)
        hint = "" if recursive else " (subfolders are read with --recursive)"
        raise InputError(f"--input: no files found in {where}{hint}")
    return found


def _scaled_to_uint8(x: np.ndarray, mode: str) -> np.ndarray:
    x = x.astype(np.float64)
    top = float(x.max()) if x.size else 0.0
    if mode.startswith("I;16"):
        x = x / 257.0
    elif mode == "F" and top <= 1.0:
        x = x * 255.0
    elif top > 65535:
        x = x * (255.0 / top)
    elif top > 255:
        x = x / 257.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _to_rgb(im) -> np.ndarray:
    from PIL import Image

    transparent = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if transparent:  # composite on black (the evaluator's padding colour)
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im.convert("RGBA"))
    elif im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = _scaled_to_uint8(np.asarray(im), im.mode)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    return arrays.as_rgb_image(np.asarray(im.convert("RGB")))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB of an image file, EXIF orientation applied, any PIL mode converted
    (module docstring). Raises :class:`ImageReadError` (a ValueError) saying why for a file that is
    not an image, or is corrupt or truncated."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return _to_rgb(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        raise ImageReadError("not an image file PIL can read") from None
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"too large: {err}") from None
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        raise ImageReadError(f"cannot decode ({type(err).__name__}: {err})") from None


def output_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One output stem per input, unique case-insensitively over ``<stem>.png`` and
    ``<stem>_overlay.png`` of all inputs: the file's stem, else ``<stem>-2``, ``<stem>-3``, ..."""
    taken: set[str] = set()
    out = []
    for p in paths:
        stem = Path(p).stem or "image"
        candidate, k = stem, 1
        while {
            f"{candidate}.png".casefold(),
            f"{candidate}{OVERLAY_SUFFIX}.png".casefold(),
        } & taken:
            k += 1
            candidate = f"{stem}-{k}"
        taken |= {f"{candidate}.png".casefold(), f"{candidate}{OVERLAY_SUFFIX}.png".casefold()}
        out.append(candidate)
    return out


def overlay_image(
    image: np.ndarray, pred: np.ndarray, palette: np.ndarray, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """uint8 ``(H, W, 3)``: ``round((1 - alpha) * image + alpha * palette[pred])``."""
    colours = np.asarray(palette, np.float32)[np.asarray(pred)]
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# the two tasks


def _dataset_class_names(config, split: str, say: Callable[[str], None]) -> list[str]:
    from train.data import pipeline

    num_classes = int(config.dataset.num_classes)
    try:
        source = pipeline.get_source(config.dataset, split)
    except Exception as err:  # names are a nicety: a dataset not on this machine must not stop us
        say(f"train.predict: class names are indices (dataset {config.dataset.name!r}: {err})")
        return [str(i) for i in range(num_classes)]
    return inference.class_names(source, num_classes)


class _Segmenter:
    """Writes the label and overlay PNGs of one image."""

    def __init__(self, config, predict, settings, output: Path, alpha: float, max_size: int):
        from train.data import pipeline

        self.num_classes = int(config.dataset.num_classes)
        self.mean, self.std = inference.input_stats(config)
        self.evaluator = inference.segmentation_evaluator(
            predict, settings, num_classes=self.num_classes, mean=self.mean, std=self.std
        )
        self.palette = inference.label_palette(
            pipeline.palette(config.dataset), self.num_classes - 1
        )
        self.output, self.alpha, self.max_size = output, alpha, max_size
        self.rows: list[dict] = []

    def describe(self, settings) -> str:
        e = self.evaluator
        return (
            f"{settings.mode} (scales {list(e.scales)}, flip {e.flip}, base {e.base_size}, crop "
            f"{e.crop_size}, {e.batch_size} windows per pass)"
        )

    def __call__(self, path: Path, stem: str, image: np.ndarray) -> None:
        from PIL import Image

        h, w = image.shape[:2]
        work = image
        if self.max_size and max(h, w) > self.max_size:
            f = self.max_size / max(h, w)
            work = arrays.resize_image(
                image, max(1, round(w * f)), max(1, round(h * f)), "bilinear"
            )
        pred = self.evaluator.predict(arrays.normalise_uint8(work, self.mean, self.std))
        if work is not image:
            pred = arrays.resize_mask(pred, w, h)
        label = f"{stem}.png"
        overlay = f"{stem}{OVERLAY_SUFFIX}.png"
        if self.num_classes <= 256:
            inference.label_image(pred, self.palette).save(self.output / label)
        else:  # no palette PNG holds more than 256 colours: the class indices, 16-bit grey
            Image.fromarray(pred.astype(np.uint16)).save(self.output / label)
        overlaid = overlay_image(image, pred, self.palette, self.alpha)
        Image.fromarray(overlaid).save(self.output / overlay)
        size = [int(image.shape[1]), int(image.shape[0])]
        self.rows.append({"path": str(path), "label": label, "overlay": overlay, "size": size})

    def finish(self) -> list[dict]:
        return self.rows


class _Classifier:
    """Top-k softmax probabilities, images batched through the sharded predict."""

    def __init__(self, config, predict, settings, names: list[str], top_k: int):
        from train.data import pipeline

        self.predict, self.names = predict, names
        self.transform = pipeline.transform_from_config(
            config.input, task="recognition", image_size=config.dataset.image_size, train=False
        )
        n_dev = predict.num_devices
        self.batch_size = -(-settings.batch_size // n_dev) * n_dev
        self.top_k = min(int(top_k), len(names))
        self.pending: list[tuple[Path, np.ndarray]] = []
        self.rows: list[dict] = []

    def describe(self, settings) -> str:
        return f"single crop, top {self.top_k}, {self.batch_size} images per pass"

    def __call__(self, path: Path, stem: str, image: np.ndarray) -> None:
        x = self.transform({"image": image, "label": 0})["image"]
        if self.pending and self.pending[0][1].shape != x.shape:
            self._flush()  # a transform that keeps the size (CIFAR's): batches of one size only
        self.pending.append((path, x))
        if len(self.pending) == self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        batch = np.zeros((self.batch_size,) + self.pending[0][1].shape, np.float32)
        for i, (_, x) in enumerate(self.pending):
            batch[i] = x
        logits = jax.device_get(self.predict(batch))[: len(self.pending)]
        probs = np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))
        for (path, _), p in zip(self.pending, probs):
            best = np.argsort(-p, kind="stable")[: self.top_k]
            top = [{"class": self.names[i], "index": int(i), "prob": float(p[i])} for i in best]
            self.rows.append({"path": str(path), "top_k": top})
        self.pending = []

    def finish(self) -> list[dict]:
        self._flush()
        return self.rows


# ---------------------------------------------------------------------------------------------------
# entry point


def _progress(total: int, enabled: bool | None):
    from tqdm import tqdm

    from train.observe import NO_PROGRESS_ENV

    if enabled is None:
        env_off = os.environ.get(NO_PROGRESS_ENV, "").strip().lower() not in (
            "",
            "0",
            "false",
            "no",
        )
        enabled = sys.stderr.isatty() and not env_off
    return tqdm(total=total, file=sys.stderr, unit="image", disable=not enabled, dynamic_ncols=True)


def predict_images(
    config: ml_collections.ConfigDict,
    checkpoint: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    use_best: bool = False,
    overrides: Mapping[str, Any] | None = None,
    top_k: int = DEFAULT_TOP_K,
    recursive: bool = False,
    alpha: float = DEFAULT_ALPHA,
    max_size: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictReport:
    """Predict every input (files or folders, :func:`find_inputs`) and write the results under
    ``output`` (module docstring). ``overrides``: ``config.eval`` keys of :data:`OVERRIDE_KEYS`
    (None = not given). ``progress``: None = a bar when stderr is a terminal. ``log`` gets the
    messages (default: stderr). Unreadable images are skipped and listed in the report's ``failed``."""
    from train.evaluate import eval_settings

    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if config.task not in ("segmentation", "recognition"):
        raise ValueError(
            f"train.predict: config.task must be 'segmentation' or 'recognition', got {config.task!r}"
        )
    unknown = sorted(set(overrides or {}) - set(OVERRIDE_KEYS))
    if unknown:
        raise KeyError(f"predict_images: unknown override(s) {unknown}; known: {OVERRIDE_KEYS}")
    if not (isinstance(max_size, int) and max_size >= 0):
        raise ValueError(f"--max_size must be an integer >= 0 (0 = no limit), got {max_size!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha!r}")
    if int(top_k) < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k!r}")
    output = Path(output)
    files = find_inputs(inputs, recursive=recursive, exclude=output)
    settings = eval_settings(config, overrides)

    inference.enable_compile_cache(config, checkpoint, use_best=use_best)
    loaded = inference.load_model(config, checkpoint, use_best=use_best)
    predict = multi_eval.make_sharded_predict(loaded.model, loaded.variables)
    output.mkdir(parents=True, exist_ok=True)
    if config.task == "segmentation":
        worker = _Segmenter(config, predict, settings, output, alpha, max_size)
    else:
        names = _dataset_class_names(config, settings.split, say)
        worker = _Classifier(config, predict, settings, names, top_k)
    say(
        f"train.predict: {len(files)} file(s), {config.task} {worker.describe(settings)} on "
        f"{predict.num_devices} device(s), checkpoint {loaded.checkpoint}"
    )

    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    with _progress(len(files), progress) as bar:
        for path, stem in zip(files, output_stems(files)):
            try:
                worker(path, stem, read_image(path))
                written.append(path)
            except ValueError as err:  # unreadable, or an image the protocol cannot take
                failed.append((path, str(err)))
                bar.write(f"train.predict: skipped {path}: {err}", file=sys.stderr)
            bar.update(1)
        rows = worker.finish()
    with open(output / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    say(f"train.predict: {len(written)} written, {len(failed)} failed, output in {output}")
    return PredictReport(tuple(written), tuple(failed), output)


# ---------------------------------------------------------------------------------------------------
# command line


def _define_flags():
    from absl import flags

    inference.define_common_flags(("base_size", "crop_size", "batch_size"))
    flags.adopt_module_key_flags(inference)
    flags.DEFINE_multi_string(
        "input", [], "An image file or a folder of images (repeatable; positional paths too)."
    )
    flags.DEFINE_string("output", None, "Where the PNGs / predictions.jsonl go (created).")
    flags.DEFINE_bool("recursive", False, "Also read the files in subfolders of --input folders.")
    flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "Recognition: how many classes per image.")
    flags.DEFINE_float("alpha", DEFAULT_ALPHA, "Segmentation: label colour weight in overlays.")
    flags.DEFINE_integer(
        "max_size", 0, "Segmentation: predict at most at this long side (0 = the full image)."
    )
    flags.mark_flags_as_required(["config", "checkpoint", "output"])
    return flags.FLAGS


def main(argv):
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    f = FLAGS
    overrides = inference.flag_overrides(f, OVERRIDE_KEYS)
    try:
        report = predict_images(
            f.config,
            f.checkpoint,
            [*f.input, *argv[1:]],
            f.output,
            use_best=f.use_best,
            overrides=overrides,
            top_k=f.top_k,
            recursive=f.recursive,
            alpha=f.alpha,
            max_size=f.max_size,
        )
    except InputError as err:
        print(f"train.predict: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
