"""What the input pipeline does with a record it cannot read: ``config.input.bad_examples``.

A source raises :class:`BadExample` (path, reason) when a record's file cannot be decoded (an
unreadable or truncated image, a file that is not an image, a mask whose labels are outside the
dataset's classes). Every other exception is a bug and propagates unchanged. The policy decides the
rest:

- ``"error"`` (default): :class:`BadExampleError`, one line naming the file, the split, where it was
  met (the training step, or the example of an evaluation) and how to go on. ``train.main`` prints
  it and exits 1.
- ``"skip"``: the element takes the data of the next readable record (``r+1, r+2, ... mod n``, a
  pure function of the record index, so the same for any worker count and after resume) and carries
  ``SKIPPED_KEY`` = 1 (0 for the others); batches then hold an int32 ``(batch,)`` column that the
  consumer sums and drops. In evaluation a skipped element is also ``valid=False``, so metrics leave
  it out. Each bad path is logged once per process (a warning naming the file and the reason).
  A split with no readable record at all is a BadExampleError under "skip" too.

The count is the number of stream elements that were replaced: over one epoch, the number of bad
files. Under "error" batches carry no ``SKIPPED_KEY`` (they are exactly the policy-free batches).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "POLICIES",
    "SKIPPED_KEY",
    "BadExample",
    "BadExampleError",
    "EvalReader",
    "TrainReader",
    "WithSkipped",
    "check_policy",
    "pop_skipped",
    "read_example",
]

POLICIES = ("error", "skip")
SKIPPED_KEY = "skipped"
RESUME_HINT = (
    "Fix or remove the file, or run the same command again with "
    "--config.input.bad_examples=skip (training resumes from its last checkpoint)"
)

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # per process: grain workers each hold their own


class BadExample(ValueError):
    """A record that cannot be read: ``path`` (the file at fault, or None when the caller adds it)
    and ``reason``. Raised by sources; a ValueError, so code that does not know the policy still
    sees a data error."""

    def __init__(self, path: str | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = str(reason)
        super().__init__(self.reason if self.path is None else f"{self.path}: {self.reason}")

    def with_path(self, path: str) -> BadExample:
        """The same problem attributed to ``path`` (a label map does not know its file)."""
        return BadExample(path, self.reason)

    def __reduce__(self):  # grain workers send exceptions back pickled
        return (type(self), (self.path, self.reason))


class BadExampleError(RuntimeError):
    """The "error" policy's stop: one line with the file, the split, ``where`` it was met and how to
    go on (``RESUME_HINT``). Picklable, so it comes back from a grain worker unchanged."""

    def __init__(
        self, path: str | None, reason: str, split: str, where: str, hint: str = RESUME_HINT
    ):
        self.path, self.reason, self.split, self.where = path, reason, split, where
        self.hint = hint
        what = reason if path is None else f"{path}: {reason}"
        super().__init__(f"bad example in the {split!r} split {where}: {what}. {hint}")

    def during(self, context: str) -> BadExampleError:
        """The same error with ``context`` added to where it was met (e.g. "in the evaluation at
        step 6")."""
        return BadExampleError(
            self.path, self.reason, self.split, f"{self.where}, {context}", self.hint
        )

    def with_hint(self, hint: str) -> BadExampleError:
        """The same error with another way to go on (``train.evaluate`` has nothing to resume)."""
        return BadExampleError(self.path, self.reason, self.split, self.where, hint)

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.split, self.where, self.hint))


def check_policy(policy: Any) -> str:
    """``policy`` if it is one of ``POLICIES``, else ValueError naming the config key and choices."""
    if policy not in POLICIES:
        raise ValueError(
            f"config.input.bad_examples must be one of {list(POLICIES)}, got {policy!r}"
        )
    return policy


def _log_once(split: str, err: BadExample) -> None:
    key = err.path if err.path is not None else err.reason
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    log.warning(
        "skipping a bad example in the %r split (config.input.bad_examples=skip): %s", split, err
    )


def _split_of(source: Any, default: str) -> str:
    return str(getattr(source, "split", None) or default)


class _Reader:
    """Reads ``source[record]`` under a policy; ``skip`` finds the replacement record. Picklable;
    the set of records known bad is per process (each grain worker has its copy)."""

    def __init__(self, source: Any, policy: str, split: str):
        self.source = source
        self.policy = check_policy(policy)
        self.split = split
        self.n = len(source)
        self._known_bad: dict[int, BadExample] = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_known_bad"}

    def __setstate__(self, state):
        self.__dict__.update(state, _known_bad={})

    def _try(self, record: int) -> Mapping | BadExample:
        if record in self._known_bad:  # a replacement search meets the same bad files again
            return self._known_bad[record]
        try:
            return self.source[record]
        except BadExample as err:
            self._known_bad[record] = err
            if self.policy == "skip":
                _log_once(self.split, err)
            return err

    def read(self, record: int, where: str) -> tuple[Mapping, bool]:
        """``(example, skipped)``: ``source[record]``, or under "skip" the next readable record's
        example and True. "error" raises BadExampleError naming ``where``."""
        got = self._try(record)
        if not isinstance(got, BadExample):
            return got, False
        if self.policy == "error":
            raise BadExampleError(got.path, got.reason, self.split, where)
        for step in range(1, self.n):
            candidate = self._try((record + step) % self.n)
            if not isinstance(candidate, BadExample):
                return candidate, True
        raise BadExampleError(
            got.path,
            f"{got.reason}; and every other of the {self.n} examples is bad too",
            self.split,
            where,
        )


class TrainReader(_Reader):
    """``map_with_index`` function of the training stream: ``(position, record) -> example``.

    ``position`` is the element's place in the global stream, so the training step that consumes
    it is ``position // global_batch_size + 1`` (any process count: rows are split per batch).
    """

    def __init__(self, source: Any, policy: str, global_batch_size: int):
        super().__init__(source, policy, _split_of(source, "train"))
        self.global_batch_size = int(global_batch_size)

    def __call__(self, position: int, record: Any):
        """The example ("error"), or ``(example, skipped)`` ("skip", for ``WithSkipped``)."""
        record = int(record)
        step = position // self.global_batch_size + 1
        example, skipped = self.read(record, f"at training step {step} (record {record})")
        return example if self.policy == "error" else (example, skipped)


@dataclasses.dataclass(frozen=True)
class WithSkipped:
    """``random_map`` function of a "skip" training stream: ``transform(example, rng)`` (or the
    example itself) plus ``SKIPPED_KEY``; the transform sees the rng it would see without it."""

    transform: Callable | None

    def __call__(self, element: tuple[Mapping, bool], rng) -> dict:
        example, skipped = element
        out = example if self.transform is None else self.transform(example, rng)
        if not isinstance(out, Mapping):
            raise TypeError(f"transform must return a dict, got {type(out).__name__}")
        return {**out, SKIPPED_KEY: np.asarray(int(skipped), np.int32)}


class EvalReader(_Reader):
    """``map_with_index`` function of an evaluation pass over ``length >= len(source)`` padded
    positions: element i is ``source[i mod n]`` with ``valid = i < n``; under "skip" a bad one is
    replaced, marked invalid and counted (padding is replaced but not counted)."""

    def __init__(self, source: Any, policy: str):
        super().__init__(source, policy, _split_of(source, "validation"))

    def __call__(self, position: int, _: Any) -> tuple[Mapping, bool, bool]:
        example, skipped = self.read(position % self.n, f"at example {position % self.n}")
        return example, position < self.n and not skipped, position < self.n and skipped


def pop_skipped(batch: dict) -> int:
    """Drops a batch's ``SKIPPED_KEY`` column (present under "skip") and returns its sum: the
    examples of the batch that were replaced."""
    column = batch.pop(SKIPPED_KEY, None)
    return 0 if column is None else int(np.sum(column))


def read_example(source: Any, index: int, *, policy: str, split: str | None = None):
    """``source[index]`` under ``policy`` for callers that read sources by index (full-size
    evaluation): the example, or None under "skip" when it is bad (logged once; the caller leaves
    it out and counts it). "error" raises BadExampleError; other exceptions propagate."""
    check_policy(policy)
    split = split or _split_of(source, "validation")
    try:
        return source[index]
    except BadExample as err:
        if policy == "error":
            raise BadExampleError(err.path, err.reason, split, f"at example {index}") from None
        _log_once(split, err)
        return None
