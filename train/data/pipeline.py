"""Grain input pipeline: sources by name, per-process train/eval batches, image/mask transforms.

``get_source(config.dataset, split)`` looks ``config.dataset.name`` up in a registry
(``register_source``); ``"shapes_seg"`` / ``"shapes_cls"`` are built in, real datasets register
themselves (``train.data.sources``). Process ``p`` of ``P`` holds rows ``[p*b, (p+1)*b)`` of every
global batch (``b = global_batch / P``; ``MapDataset.batch(b)[p::P]``), which
``jax.make_array_from_process_local_data`` reassembles. The train stream ``source -> shuffle(seed)
-> repeat() -> random_map(transform)`` reshuffles per epoch and derives each augmentation rng from
the seed and the element's global position, so batches do not depend on worker, thread or process
counts and ``it.get_state()`` / ``it.set_state(state)`` restore a position exactly.
A record the source cannot read (``bad_examples.BadExample``) stops the stream or is replaced, as
``bad_examples`` ("error" | "skip", ``config.input.bad_examples``) says (``train.data.bad_examples``).
Transforms are picklable ``(example, rng | None) -> example``; PIL resizes images bilinear
(antialiased when downscaling) and masks nearest on int32 (mode "I", so -1 survives); non-square
inputs become square in train and eval alike; normalisation is ``(x / 255 - mean) / std``, float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from jaxenc.validation import check_int
from train.data import bad_examples as bad
from train.data import synthetic

# The transforms' factory and jaxenc's basic transforms live beside the other transforms
# (train.data.augment, train.data.basic_transforms); these names stay importable from here.
from train.data.augment import AUGMENTS, testval_transform, transform_from_config  # noqa: F401, E402
from train.data.basic_transforms import (  # noqa: F401, E402
    RecognitionTransform,
    SegmentationTransform,
    recognition_transform,
    segmentation_transform,
)
from train.data.palette import voc_palette

# Default host-side parallelism: a couple of threads overlap data generation with device compute;
# the buffer is in batches (grain's default of 500 would hold hundreds of MB of float images).
DEFAULT_READ_THREADS = 2
DEFAULT_PREFETCH_BATCHES = 4

_REQUIRED = object()


# -- config access -------------------------------------------------------------------------------


def _cfg(config: Any, key: str, default: Any = _REQUIRED, *, prefix: str = "config.dataset") -> Any:
    """``config[key]`` for a ConfigDict or a mapping, with a KeyError naming the full key."""
    if key in config:
        return config[key]
    if default is _REQUIRED:
        raise KeyError(f"{prefix}.{key} is required but missing")
    return default


# -- source registry -----------------------------------------------------------------------------

SourceFn = Callable[[Any, str], Any]
_SOURCES: dict[str, SourceFn] = {}
_PALETTES: dict[str, np.ndarray] = {}


def register_source(
    name: str, fn: SourceFn, *, palette: Any = None, overwrite: bool = False
) -> None:
    """Registers ``fn(dataset_config, split) -> source`` under ``config.dataset.name == name``.

    A source is random-access (``__len__``, ``__getitem__(i) -> dict of numpy arrays``) and picklable.
    ``fn`` raises ValueError for a split the dataset does not have. ``palette`` (uint8 (K, 3), optional)
    colours the dataset's masks in visualisations (``palette(config.dataset)``). Re-registering a name
    raises ValueError unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_source: name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_source: fn must be callable, got {type(fn).__name__}")
    if name in _SOURCES and not overwrite:
        raise ValueError(
            f"register_source: {name!r} is already registered (pass overwrite=True to replace it)"
        )
    if palette is not None:
        palette = np.asarray(palette)
        if palette.ndim != 2 or palette.shape[1] != 3 or palette.min() < 0 or palette.max() > 255:
            raise ValueError(
                f"register_source: palette must be (num_classes, 3) RGB in [0, 255], "
                f"got shape {palette.shape}"
            )
        _PALETTES[name] = palette.astype(np.uint8)
    else:
        _PALETTES.pop(name, None)
    _SOURCES[name] = fn


def known_sources() -> tuple[str, ...]:
    """The registered dataset names, sorted."""
    return tuple(sorted(_SOURCES))


def get_source(dataset_config: Any, split: str):
    """The random-access source for ``dataset_config.name`` and ``split``.

    Raises ValueError naming the known datasets for an unknown ``name``, and ValueError naming the
    available splits for a split the dataset lacks. If ``dataset_config.num_classes`` is set, it must
    match the source's ``num_classes``.
    """
    name = _cfg(dataset_config, "name")
    if name not in _SOURCES:
        raise ValueError(
            f"config.dataset.name: unknown dataset {name!r}; known datasets: {list(known_sources())}"
        )
    source = _SOURCES[name](dataset_config, split)
    expected = _cfg(dataset_config, "num_classes", None)
    actual = getattr(source, "num_classes", None)
    if expected is not None and actual is not None and int(expected) != int(actual):
        raise ValueError(
            f"config.dataset.num_classes={expected} does not match dataset {name!r}, "
            f"which has {actual} classes"
        )
    return source


def _shapes_factory(cls):
    def build(dataset_config, split):
        splits = {"train": "num_train", "validation": "num_val"}
        if split not in splits:
            raise ValueError(
                f"dataset {_cfg(dataset_config, 'name')!r} has no split {split!r}; "
                f"available splits: {list(splits)}"
            )
        # The dataset's content seed is part of the dataset, not of the training run: it comes from
        # config.dataset.seed (default 0), so changing config.seed reshuffles but keeps the data.
        return cls(
            split,
            num_examples=_cfg(dataset_config, splits[split]),
            image_size=_cfg(dataset_config, "image_size", 64),
            seed=_cfg(dataset_config, "seed", 0),
        )

    return build


register_source(
    "shapes_seg",
    _shapes_factory(synthetic.ShapesSegmentation),
    palette=synthetic.ShapesSegmentation.PALETTE,
)
register_source("shapes_cls", _shapes_factory(synthetic.ShapesRecognition))


def palette(dataset_config: Any) -> np.ndarray:
    """uint8 (num_classes, 3) mask colours for ``config.dataset``: the palette registered with the
    dataset, else the PASCAL VOC colour map for ``config.dataset.num_classes`` classes."""
    name = _cfg(dataset_config, "name")
    if name not in _SOURCES:
        raise ValueError(
            f"config.dataset.name: unknown dataset {name!r}; known datasets: {list(known_sources())}"
        )
    if name in _PALETTES:
        return _PALETTES[name].copy()
    num_classes = _cfg(dataset_config, "num_classes", None)
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(
            f"palette: dataset {name!r} registered no palette and config.dataset.num_classes is "
            f"{num_classes!r}; a positive class count is needed"
        )
    return voc_palette(int(num_classes))


# -- iterators -----------------------------------------------------------------------------------


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when asked for the defaults; keeps grain workers free of a jax import

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_count = check_int(process_count, "process_count", "input pipeline", minimum=1)
    process_index = check_int(process_index, "process_index", "input pipeline", minimum=0)
    if process_index >= process_count:
        raise ValueError(
            f"process_index must be < process_count={process_count}, got {process_index}"
        )
    return process_index, process_count


def _local_batch_size(arg: str, batch_size: Any, process_count: int) -> int:
    batch_size = check_int(batch_size, arg, "input pipeline", minimum=1)
    if batch_size % process_count:
        raise ValueError(
            f"{arg}={batch_size} is not divisible by process_count={process_count}: "
            "every process must hold the same number of rows"
        )
    return batch_size // process_count


def _check_source(source: Any) -> int:
    try:
        n = len(source)
    except TypeError as err:
        raise TypeError(
            f"source must be random-access (__len__, __getitem__), got {type(source).__name__}"
        ) from err
    if n < 1:
        raise ValueError(f"source is empty: {source!r}")
    return n


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; a program that did not go through absl's app.run
    # (pytest, notebooks) would get UnparsedFlagAccessError, so accept the flag defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _iterate(ds: grain.MapDataset, worker_count: int, read_threads: int, prefetch_batches: int):
    worker_count = check_int(worker_count, "worker_count", "input pipeline", minimum=0)
    read_options = grain.ReadOptions(
        num_threads=check_int(read_threads, "read_threads", "input pipeline", minimum=0),
        prefetch_buffer_size=check_int(
            prefetch_batches, "prefetch_batches", "input pipeline", minimum=0
        ),
    )
    iter_ds = ds.to_iter_dataset(read_options)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iter_ds)


def train_iterator(
    source,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    transform: Callable | None,
    worker_count: int = 0,
    read_threads: int = DEFAULT_READ_THREADS,
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
    bad_examples: str = "error",
) -> grain.DatasetIterator:
    """Endless per-process training batches: a grain ``DatasetIterator`` of dicts of stacked arrays
    with leading dim ``global_batch_size // process_count``.

    Epochs repeat forever, each reshuffled (seeded by ``seed``); batches run across epoch boundaries.
    ``transform(example, rng)`` is applied with grain's ``random_map``: ``rng`` is derived from the
    seed and the element's global stream position (``None`` -> examples pass through unchanged).
    Process defaults come from ``jax.process_index()`` / ``jax.process_count()``; process ``p`` gets
    rows ``[p*b, (p+1)*b)`` of each global batch (module docstring). ``worker_count > 0`` prefetches
    in that many grain worker processes; the batches are the same for any worker count.
    Checkpoint with ``it.get_state()`` / ``it.set_state(state)`` (same arguments on restore).
    A record the source cannot read raises ``BadExampleError`` naming the training step
    (``bad_examples="error"``) or is replaced by the next readable record and counted in the
    int32 ``(rows,)`` column ``"skipped"`` ("skip"; ``train.data.bad_examples``).
    """
    n = _check_source(source)
    policy = bad.check_policy(bad_examples)
    process_index, process_count = _processes(process_index, process_count)
    local = _local_batch_size("global_batch_size", global_batch_size, process_count)
    seed = check_int(seed, "seed", "input pipeline", minimum=0)
    # Separate 32-bit seeds (grain's limit) for the permutation and the augmentation streams.
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    # The permutation of record indices is that of the source itself (shuffle permutes positions);
    # reading by (position, record) lets the policy name the step and pick a replacement.
    ds = grain.MapDataset.range(n).shuffle(seed=shuffle_seed).repeat()
    ds = ds.map_with_index(bad.TrainReader(source, policy, global_batch_size))
    if policy == "skip":  # (example, skipped) elements: the flag goes around the transform
        ds = ds.random_map(bad.WithSkipped(transform), seed=augment_seed)
    elif transform is not None:
        ds = ds.random_map(transform, seed=augment_seed)
    ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
    return _iterate(ds, worker_count, read_threads, prefetch_batches)


@dataclasses.dataclass(frozen=True)
class _EvalMap:
    """Applies the eval transform (rng None) to ``EvalReader``'s ``(example, valid, skipped)`` and
    records ``valid`` (padding and skipped examples are False) and, under "skip", ``skipped``."""

    transform: Callable | None
    count_skipped: bool

    def __call__(self, element) -> dict:
        example, valid, skipped = element
        out = example if self.transform is None else self.transform(example, None)
        if not isinstance(out, Mapping):
            raise TypeError(f"transform must return a dict, got {type(out).__name__}")
        out = {**out, "valid": np.asarray(valid, np.bool_)}
        if self.count_skipped:
            out[bad.SKIPPED_KEY] = np.asarray(int(skipped), np.int32)
        return out


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """How many batches ``eval_batches`` yields (per process and globally): ``ceil(n / batch_size)``."""
    return -(-num_examples // batch_size)


def eval_batches(
    source,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    transform: Callable | None,
    worker_count: int = 0,
    read_threads: int = DEFAULT_READ_THREADS,
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
    bad_examples: str = "error",
) -> grain.DatasetIterator:
    """One ordered pass over ``source`` in global batches of ``batch_size`` (per process:
    ``batch_size // process_count`` rows, same sharding rule as ``train_iterator``).

    There are ``num_eval_batches(len(source), batch_size)`` batches on every process. The global
    examples ``0..n-1`` fill the batches in order; the tail of the last global batch is padding (a
    repeat of real examples) marked ``valid=False``: each batch carries ``"valid"``, bool
    ``(batch_size // process_count,)``, so metrics weighted by it count each example exactly once.
    ``transform(example, None)`` is applied to every element (eval transforms ignore the rng).
    A record the source cannot read raises ``BadExampleError`` naming the example
    (``bad_examples="error"``), or ("skip") takes the next readable record's data with
    ``valid=False`` and ``"skipped"`` = 1: batches then carry an int32 ``"skipped"`` column whose
    sum over the pass is the number of bad examples in the split.
    """
    n = _check_source(source)
    policy = bad.check_policy(bad_examples)
    process_index, process_count = _processes(process_index, process_count)
    local = _local_batch_size("batch_size", batch_size, process_count)
    total = num_eval_batches(n, batch_size) * batch_size
    ds = grain.MapDataset.range(total).map_with_index(bad.EvalReader(source, policy))
    ds = ds.map(_EvalMap(transform, count_skipped=policy == "skip"))
    ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
    return _iterate(ds, worker_count, read_threads, prefetch_batches)
