"""Shared pieces of the dataset adapters: config and split access, the folder / TFDS backend choice,
image and label-PNG decoding, ``LabelTable``, the file and TFDS source classes and ``open_tfds``.

Images decode to RGB uint8 whatever their mode; label PNGs must be index images (L / P / I / I;16:
the pixel values are the labels), colour PNGs are refused. A file that cannot be read, is not an
image, is truncated (also when a program set PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES``) or is a
colour mask raises ``train.data.bad_examples.BadExample`` naming it; ``config.input.bad_examples``
decides what the pipeline does then. ``tensorflow_datasets`` is imported only
inside ``open_tfds`` (about a second), so the folder adapters never import it.
"""

from __future__ import annotations

import io
import logging
import operator
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from train.data.augment import as_rgb_image
from train.data.bad_examples import BadExample

log = logging.getLogger(__name__)

IGNORE = -1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BACKENDS = ("auto", "folder", "tfds")


# -- config --------------------------------------------------------------------------------------


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` when present and not None, else ``default`` (ConfigDict or mapping)."""
    try:
        value = config[key] if key in config else None
    except TypeError:
        value = getattr(config, key, None)
    return default if value is None else value


def dataset_name(config: Any, fallback: str) -> str:
    return str(cfg_get(config, "name", fallback))


def data_dir(config: Any) -> str | None:
    """``config.dataset.data_dir`` with ``~`` expanded, or None."""
    value = cfg_get(config, "data_dir")
    return None if value is None else os.path.expanduser(str(value))


def require_data_dir(config: Any, dataset: str, layout: str) -> str:
    """The data directory of a folder adapter; FileNotFoundError with the layout when it is unset."""
    root = data_dir(config)
    if root is None:
        raise FileNotFoundError(
            f"dataset {dataset!r} reads a local folder but config.dataset.data_dir is not set; "
            f"expected layout:\n{layout}"
        )
    return root


def backend(config: Any, dataset: str) -> str:
    """``config.dataset.backend``: "auto" (default), "folder" or "tfds"."""
    value = str(cfg_get(config, "backend", "auto"))
    if value not in BACKENDS:
        raise ValueError(
            f"dataset {dataset!r}: config.dataset.backend must be one of {list(BACKENDS)}, got {value!r}"
        )
    return value


def lookup_split(dataset: str, split: str, splits: Mapping[str, Any]) -> Any:
    """``splits[split]``, or ValueError naming the dataset's splits."""
    if split not in splits:
        raise ValueError(
            f"dataset {dataset!r} has no split {split!r}; available splits: {list(splits)}"
        )
    return splits[split]


def folder_or_tfds(
    config: Any, split: str, fallback_name: str, marker: str, folder: Callable, tfds: Callable
) -> Any:
    """``folder(config, split, name)`` or ``tfds(config, split, name)`` as ``config.dataset.backend``
    says; "auto" picks the folder backend when ``<data_dir>/<marker>`` is a directory."""
    name = dataset_name(config, fallback_name)
    choice = backend(config, name)
    if choice == "auto":
        root = data_dir(config)
        choice = (
            "folder" if root is not None and os.path.isdir(os.path.join(root, marker)) else "tfds"
        )
    return folder(config, split, name) if choice == "folder" else tfds(config, split, name)


# -- decoding ------------------------------------------------------------------------------------


def to_rgb(image: Any) -> np.ndarray:
    """uint8 (H, W, 3) from (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped)."""
    return as_rgb_image(image)  # one definition of "an RGB image" for the whole input pipeline


class _WatchedFile(io.BytesIO):
    """A file's bytes that notes an empty read: PIL decoding past the end of a truncated file,
    which it pads silently when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set."""

    read_past_end = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if size != 0 and not data:
            self.read_past_end = True
        return data


# What PIL raises for a file it cannot decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


def _decoded(path: str, check: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """The fully decoded image in ``path``; BadExample (train.data.bad_examples) when the file
    cannot be read, is not an image, is truncated or fails ``check``."""
    try:
        with open(path, "rb") as f:
            data = _WatchedFile(f.read())
    except OSError as err:
        raise BadExample(path, f"cannot be read ({err.strerror or err})") from None
    try:
        img = Image.open(data)
    except UnidentifiedImageError:  # its message names our in-memory file, not the path
        raise BadExample(path, "is not an image (PIL cannot identify its format)") from None
    except _DECODE_ERRORS as err:
        raise BadExample(path, f"is not an image PIL can read ({err})") from None
    if check is not None:
        check(img)
    data.read_past_end = False
    try:
        img.load()
    except _DECODE_ERRORS as err:
        raise BadExample(path, f"cannot be decoded ({err})") from None
    if data.read_past_end:
        raise BadExample(path, "is truncated (the image data ends before the image does)")
    return img


def read_rgb(path: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3): every PIL mode is converted to RGB (alpha dropped).
    A file that cannot be read or decoded (truncated, not an image) raises BadExample."""
    img = _decoded(path)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, np.uint8)


_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


def _label_mode(img: Image.Image) -> None:
    if img.mode not in _LABEL_MODES:
        raise BadExample(
            None,
            f"a label image must be single-channel (PIL mode L, P or I, whose pixel values are "
            f"the labels), got mode {img.mode!r}; colour-coded masks are not read",
        )


def read_label_png(path: str) -> np.ndarray:
    """A label image as int (H, W): its pixel values (palette indices for mode P), unconverted.
    Unreadable files and colour images raise BadExample."""
    try:
        return np.asarray(_decoded(path, _label_mode))
    except BadExample as err:
        raise (err if err.path else err.with_path(path)) from None


# -- labels --------------------------------------------------------------------------------------


class LabelTable:
    """Raw label id -> class index (``IGNORE`` = -1 for every id the table does not list).

    ``table[raw]`` for raw ids ``0..len(table)-1``; anything else (negative, too large) -> -1.
    A 3-D input (H, W, C) is reduced to ``channel`` (or must have one channel). Picklable.
    """

    def __init__(self, table: Sequence[int], channel: int | None = None):
        self.table = np.asarray(table, np.int32)
        if self.table.ndim != 1:
            raise ValueError("LabelTable: table must be 1-D")
        self.channel = channel

    @classmethod
    def from_pairs(
        cls, pairs: Mapping[int, int], size: int = 256, channel: int | None = None
    ) -> LabelTable:
        table = np.full(size, IGNORE, np.int32)
        for raw, label in pairs.items():
            table[raw] = label
        return cls(table, channel)

    def __call__(self, raw: Any) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.ndim == 3:
            if self.channel is not None:
                raw = raw[..., self.channel]
            elif raw.shape[-1] == 1:
                raw = raw[..., 0]
        if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"expected an integer (H, W) label image, got {raw.dtype} {raw.shape}")
        if raw.dtype == np.uint8 and len(self.table) >= 256:
            return self.table[raw]
        raw = raw.astype(np.int64)
        out = np.full(raw.shape, IGNORE, np.int32)
        valid = (raw >= 0) & (raw < len(self.table))
        out[valid] = self.table[raw[valid]]
        return out


def shift_table(num_classes: int, size: int = 256) -> LabelTable:
    """0 -> -1, k -> k-1 for k in 1..num_classes, anything else -> -1 (ADE20K, Pascal Context)."""
    return LabelTable.from_pairs({k: k - 1 for k in range(1, num_classes + 1)}, size)


def identity_table(num_classes: int, size: int = 256) -> LabelTable:
    """k -> k for k < num_classes, anything else (255 = VOC's void) -> -1."""
    return LabelTable.from_pairs({k: k for k in range(num_classes)}, size)


# -- sources -------------------------------------------------------------------------------------


def _index(index: Any, n: int, owner: Any) -> int:
    i = operator.index(index)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"{owner!r}: index {index} out of range for {n} examples")
    return i


class _Source:
    """Common attributes: ``name``, ``split``, ``num_classes``, ``class_names``."""

    def __init__(self, name: str, split: str, class_names: Sequence[str]):
        self.name = name
        self.split = split
        self.class_names = tuple(str(c) for c in class_names)
        self.num_classes = len(self.class_names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, num_examples={len(self)})"

    def __len__(self) -> int:
        raise NotImplementedError


class FileSegmentation(_Source):
    """Image files paired with label PNGs; ``label_map(raw)`` turns raw ids into class indices."""

    def __init__(
        self,
        name: str,
        split: str,
        image_paths: Sequence[str],
        mask_paths: Sequence[str],
        label_map: Callable[[np.ndarray], np.ndarray],
        class_names: Sequence[str],
    ):
        super().__init__(name, split, class_names)
        if len(image_paths) != len(mask_paths):
            raise ValueError(f"{name}: {len(image_paths)} images but {len(mask_paths)} masks")
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths)
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: Any) -> dict:
        i = _index(index, len(self), self)
        image = read_rgb(self.image_paths[i])
        raw = read_label_png(self.mask_paths[i])
        try:
            mask = np.asarray(self.label_map(raw), np.int32)
        except (
            BadExample
        ) as err:  # labels outside the classes: the label map does not know the file
            raise err.with_path(self.mask_paths[i]) from None
        if mask.shape != image.shape[:2]:
            raise BadExample(
                self.image_paths[i],
                f"is {image.shape[:2]} but its mask {self.mask_paths[i]} is {mask.shape}",
            )
        return {"image": image, "mask": mask}


class FileRecognition(_Source):
    """Image files with integer labels."""

    def __init__(
        self,
        name: str,
        split: str,
        image_paths: Sequence[str],
        labels: Sequence[int],
        class_names: Sequence[str],
    ):
        super().__init__(name, split, class_names)
        if len(image_paths) != len(labels):
            raise ValueError(f"{name}: {len(image_paths)} images but {len(labels)} labels")
        self.image_paths = list(image_paths)
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: Any) -> dict:
        i = _index(index, len(self), self)
        return {
            "image": read_rgb(self.image_paths[i]),
            "label": np.asarray(self.labels[i], np.int32),
        }


class _TfdsSource(_Source):
    """A ``tfds.data_source`` read by index: ``{"image": example[image_key] as RGB, <target>: ...}``,
    the target named by ``_TARGET`` and read by ``_target(example)``."""

    _TARGET = "label"

    def __init__(
        self, name: str, split: str, inner: Any, image_key: str, class_names: Sequence[str]
    ):
        super().__init__(name, split, class_names)
        self.inner = inner
        self.image_key = image_key

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: Any) -> dict:
        example = self.inner[_index(index, len(self), self)]
        return {"image": to_rgb(example[self.image_key]), self._TARGET: self._target(example)}

    def _target(self, example: Any) -> np.ndarray:
        raise NotImplementedError


class TfdsSegmentation(_TfdsSource):
    """A ``tfds.data_source`` with an image and a label-image feature."""

    _TARGET = "mask"

    def __init__(
        self,
        name: str,
        split: str,
        inner: Any,
        image_key: str,
        mask_key: str,
        label_map: Callable[[np.ndarray], np.ndarray],
        class_names: Sequence[str],
    ):
        super().__init__(name, split, inner, image_key, class_names)
        self.mask_key = mask_key
        self.label_map = label_map

    def _target(self, example: Any) -> np.ndarray:
        return np.asarray(self.label_map(example[self.mask_key]), np.int32)


class TfdsRecognition(_TfdsSource):
    """A ``tfds.data_source`` with an image and an integer label feature (label passed through)."""

    def __init__(
        self,
        name: str,
        split: str,
        inner: Any,
        class_names: Sequence[str],
        image_key: str = "image",
        label_key: str = "label",
    ):
        super().__init__(name, split, inner, image_key, class_names)
        self.label_key = label_key

    def _target(self, example: Any) -> np.ndarray:
        return np.asarray(example[self.label_key], np.int32)


def tfds_class_names(inner: Any, key: str, num_classes: int) -> tuple:
    """The ClassLabel names of feature ``key`` from the TFDS source's dataset info, when available
    (else ``class_0``, ``class_1``, ...)."""
    try:
        names = tuple(inner.dataset_info.features[key].names)
    except Exception:  # noqa: BLE001 - any missing piece of metadata means "no names"
        names = ()
    if len(names) == num_classes:
        return names
    return tuple(f"class_{k}" for k in range(num_classes))


# -- TFDS ----------------------------------------------------------------------------------------


def open_tfds(
    dataset: str, builder_name: str, tfds_split: str, root: str | None, how_to_prepare: str
) -> Any:
    """``tfds.data_source(builder_name, split=tfds_split, data_dir=root, download=False)``.

    Never downloads. When TFDS cannot open the split because the dataset is not prepared in ``root``
    (or was prepared as TFRecord, which has no random access), raises FileNotFoundError naming the
    dataset, the directory TFDS looked in and ``how_to_prepare``.
    """
    import tensorflow_datasets as tfds  # lazy: importing it costs about a second

    try:
        return tfds.data_source(builder_name, split=tfds_split, data_dir=root, download=False)
    except Exception as err:  # noqa: BLE001 - diagnosed below; re-raised when it is not "missing data"
        problem = _diagnose_tfds(tfds, builder_name, root)
        if problem is None:
            raise
        raise FileNotFoundError(
            f"dataset {dataset!r}: TFDS dataset {builder_name!r} (split {tfds_split!r}) {problem} "
            f"(config.dataset.data_dir={root!r}; None = TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets). "
            f"tfds.data_source needs it prepared in the ArrayRecord format. To prepare it: {how_to_prepare}. "
            f"TFDS said: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def open_tfds_split(
    config: Any,
    dataset: str,
    split: str,
    splits: Mapping[str, str],
    builder_name: str,
    manual: str | None = None,
    hint: str = "{}",
) -> Any:
    """``open_tfds`` of the TFDS split that ``splits`` maps ``split`` to, from ``config``'s data
    directory; the how-to-prepare text is ``hint`` with ``tfds_prepare_hint(...)`` for its ``{}``."""
    tfds_split = lookup_split(dataset, split, splits)
    root = data_dir(config)
    how_to_prepare = hint.format(tfds_prepare_hint(builder_name, root, manual))
    return open_tfds(dataset, builder_name, tfds_split, root, how_to_prepare)


def split_dirs(
    config: Any,
    dataset: str,
    split: str,
    splits: Mapping[str, Sequence[str]],
    folder: str,
    subfolders: tuple[str, str],
    layout: str,
):
    """Yields ``(image_dir, mask_dir)`` for each folder ``sub`` of the split (``splits[split]``):
    ``<data_dir>/<folder>/<subfolders[0 or 1]>/<sub>``, each required to exist."""
    subdirs = lookup_split(dataset, split, splits)
    root = os.path.join(require_data_dir(config, dataset, layout), folder)
    for sub in subdirs:
        yield tuple(require_dir(os.path.join(root, d, sub), dataset, layout) for d in subfolders)


def _diagnose_tfds(tfds: Any, builder_name: str, root: str | None) -> str | None:
    """Why ``builder_name`` cannot be opened from ``root``, or None when that is not about the data."""
    try:
        builder = tfds.builder(builder_name, data_dir=root)
    except ModuleNotFoundError as err:
        return f"cannot be opened without {err.name!r} (its builder code imports it)"
    except Exception as err:  # noqa: BLE001
        return f"could not be inspected ({type(err).__name__}: {err})"
    if not builder.is_prepared():
        return f"is not prepared: nothing found at {builder.data_dir}"
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if str(file_format) not in ("array_record", "parquet"):
        return (
            f"is prepared at {builder.data_dir} in the {file_format!r} format, which has no random access "
            "(no ArrayRecord files found)"
        )
    return None


def tfds_prepare_hint(builder_name: str, root: str | None, manual: str | None = None) -> str:
    target = root or "~/tensorflow_datasets"
    cmd = f"run `tfds build {builder_name} --data_dir {target} --file_format=array_record"
    if manual:
        return (
            cmd
            + " --manual_dir <DIR>` on a machine with TensorFlow, where <DIR> holds "
            + manual
            + f"; then copy the prepared folder to {target}"
        )
    return (
        cmd
        + f"` on a machine with TensorFlow and network access, then copy the prepared folder to {target}"
    )


# -- folders -------------------------------------------------------------------------------------


def require_dir(path: str, dataset: str, layout: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"dataset {dataset!r}: directory not found: {path}\nexpected layout:\n{layout}"
        )
    return path


def require_file(path: str, dataset: str, layout: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"dataset {dataset!r}: file not found: {path}\nexpected layout:\n{layout}"
        )
    return path


def require_all(paths: Sequence[str], dataset: str, layout: str) -> None:
    """FileNotFoundError naming the first missing file (and how many are missing)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"dataset {dataset!r}: {len(missing)} of {len(paths)} listed files are missing, "
            f"e.g. {missing[0]}\nexpected layout:\n{layout}"
        )


def paired_by_stem(
    found: Sequence[str],
    what: str,
    directory: str,
    other_dir: str,
    ext: str,
    dataset: str,
    layout: str,
) -> list[str]:
    """``other_dir/<stem><ext>`` for each file of ``found`` (the ``what``, e.g. "images", listed in
    ``directory``); FileNotFoundError when ``found`` is empty."""
    if not found:
        raise FileNotFoundError(
            f"dataset {dataset!r}: no {what} in {directory}\nexpected layout:\n{layout}"
        )
    return [os.path.join(other_dir, os.path.splitext(os.path.basename(p))[0] + ext) for p in found]


def list_images(directory: str) -> list[str]:
    """Sorted image files (jpg/jpeg/png, any case) directly in ``directory``."""
    with os.scandir(directory) as entries:
        names = [
            e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return [os.path.join(directory, n) for n in sorted(names)]


def read_ids(path: str) -> list[str]:
    """Non-empty stripped lines of a split list (VOC-style ImageSets files)."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]
