"""Procedurally generated, seeded shape datasets, served as random-access sources.

``ShapesSegmentation`` (1-3 occluding shapes, per-pixel mask 0 = background, 1..5 = shape classes)
and ``ShapesRecognition`` (one shape, label 0..4), on a cluttered textured background. Element ``i``
is a pure function of ``(seed, dataset, split, i)`` (numpy generator seeded with
``SeedSequence(seed, spawn_key=(dataset_tag, split_id, i))``), so content does not depend on the
worker count or read order, and the validation split is a disjoint seed stream (held-out data).
Sources pickle cheaply (arguments and a coordinate grid), so grain workers can rebuild them.
Colours and textures are random and independent of the class, so a network must use the outline.
"""

from __future__ import annotations

import operator

import numpy as np

from jaxenc.validation import check_int

SPLITS = ("train", "validation")
SHAPE_NAMES = ("disk", "square", "triangle", "ring", "cross")
TEXTURES = ("solid", "stripes", "checker", "noise")

# Distinct per dataset, so the two datasets built with one seed are not pixel-correlated.
_DATASET_TAGS = {"segmentation": 1, "recognition": 2}
_MIN_IMAGE_SIZE = 16


def _check_common(split, num_examples, image_size, seed, cls_name):
    if split not in SPLITS:
        raise ValueError(f"{cls_name}: split must be one of {SPLITS}, got {split!r}")
    for name, value, minimum in (
        ("num_examples", num_examples, 1),
        ("image_size", image_size, _MIN_IMAGE_SIZE),
        ("seed", seed, 0),
    ):
        check_int(value, name, cls_name, minimum=minimum)


class _ShapesBase:
    """Shared rendering for the shape datasets; subclasses define ``_TAG``, ``CLASS_NAMES`` and ``_example``."""

    _TAG = ""
    CLASS_NAMES: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.CLASS_NAMES)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The names of classes ``0..num_classes-1`` (the source contract of train.data.pipeline)."""
        return self.CLASS_NAMES

    def __init__(
        self, split: str = "train", *, num_examples: int, image_size: int = 64, seed: int = 0
    ):
        _check_common(split, num_examples, image_size, seed, type(self).__name__)
        self.split = split
        self.num_examples = int(num_examples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        size = self.image_size
        # Integer pixel coordinates, float32 so every per-image op stays float32.
        self._yy, self._xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self._scale = size / 64.0

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed})"
        )

    def __getitem__(self, index):
        """Example ``index`` (negative indices count from the end) as a dict of numpy arrays."""
        i = operator.index(index)
        if i < 0:
            i += self.num_examples
        if not 0 <= i < self.num_examples:
            raise IndexError(
                f"{type(self).__name__}: index {index} out of range for {self.num_examples} examples"
            )
        rng = np.random.default_rng(
            np.random.SeedSequence(
                self.seed, spawn_key=(_DATASET_TAGS[self._TAG], SPLITS.index(self.split), i)
            )
        )
        return self._example(rng)

    def _example(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    # -- rendering ---------------------------------------------------------------------------

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """(S, S, 3) float32 in ~[0, 255]: colour gradient + wave + clutter lines and blobs."""
        yy, xx, size = self._yy, self._xx, self.image_size
        c0, c1 = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
        angle = rng.uniform(0.0, 2 * np.pi)
        proj = xx * np.cos(angle) + yy * np.sin(angle)
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        img = c0 + (c1 - c0) * t[..., None]
        # A low-frequency wave so the background is not a plain linear ramp.
        amp = rng.uniform(0.0, 30.0)
        freq = rng.uniform(0.5, 3.0) * 2 * np.pi / size
        wave_angle, phase = rng.uniform(0.0, 2 * np.pi, 2)
        wave = np.sin(freq * (xx * np.cos(wave_angle) + yy * np.sin(wave_angle)) + phase)
        img += (amp * wave)[..., None] * rng.uniform(-1.0, 1.0, 3).astype(np.float32)
        self._clutter(rng, img)
        return img

    def _clutter(self, rng: np.random.Generator, img: np.ndarray) -> None:
        """Paints thin lines and small blobs in place; they are background (class 0) by design."""
        yy, xx, size = self._yy, self._xx, self.image_size
        thin = max(self._scale, 0.5)
        n_lines = int(rng.integers(0, 6))
        if n_lines:
            ends = rng.uniform(-0.1 * size, 1.1 * size, (n_lines, 4)).astype(np.float32)
            half_width = rng.uniform(0.4, 1.0, n_lines) * thin
            colours = rng.uniform(0.0, 255.0, (n_lines, 3)).astype(np.float32)
            x0, y0 = ends[:, 0, None, None], ends[:, 1, None, None]
            dx, dy = ends[:, 2, None, None] - x0, ends[:, 3, None, None] - y0
            # Distance from every pixel to every segment at once: (n_lines, S, S).
            t = np.clip(
                ((xx - x0) * dx + (yy - y0) * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0
            )
            dist2 = (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2
            for k in range(n_lines):
                img[dist2[k] <= half_width[k] ** 2] = colours[k]
        n_blobs = int(rng.integers(0, 7))
        if n_blobs:
            centres = rng.uniform(0.0, size, (n_blobs, 2)).astype(np.float32)
            radii = (rng.uniform(1.0, 3.0, (n_blobs, 2)) * self._scale).astype(np.float32)
            colours = rng.uniform(0.0, 255.0, (n_blobs, 3)).astype(np.float32)
            d2 = ((yy - centres[:, 0, None, None]) / radii[:, 0, None, None]) ** 2 + (
                (xx - centres[:, 1, None, None]) / radii[:, 1, None, None]
            ) ** 2
            for k in range(n_blobs):
                img[d2[k] <= 1.0] = colours[k]

    def _draw_shape(
        self,
        rng: np.random.Generator,
        img: np.ndarray,
        kind: int,
        radius: float,
        cy: float,
        cx: float,
    ) -> np.ndarray:
        """Paints shape ``kind`` (index into SHAPE_NAMES) in place; returns its (S, S) bool cover."""
        theta = rng.uniform(0.0, 2 * np.pi)
        cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        dy, dx = self._yy - np.float32(cy), self._xx - np.float32(cx)
        u, v = cos * dx + sin * dy, cos * dy - sin * dx  # shape-frame coordinates (rotation)
        cover = _shape_cover(kind, u, v, np.float32(radius))

        # Colour: the most contrasting of a few random candidates against the background at the
        # centre, so the shape is visible yet its colour carries no class information.
        iy = int(np.clip(round(cy), 0, self.image_size - 1))
        ix = int(np.clip(round(cx), 0, self.image_size - 1))
        candidates = rng.uniform(0.0, 255.0, (4, 3)).astype(np.float32)
        colour_a = candidates[np.argmax(np.sum((candidates - img[iy, ix]) ** 2, axis=1))]
        colour_b = rng.uniform(0.0, 255.0, 3).astype(np.float32)
        texture = _texture(rng, TEXTURES[int(rng.integers(0, len(TEXTURES)))], u, v, self._scale)
        if texture is None:
            img[cover] = colour_a
        else:
            fill = colour_a + (colour_b - colour_a) * texture[..., None]
            img[cover] = fill[cover]
        return cover

    def _finish(self, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
        """Adds pixel noise and quantises to uint8 (S, S, 3)."""
        sigma = np.float32(rng.uniform(2.0, 10.0))
        img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_cover(kind: int, u: np.ndarray, v: np.ndarray, r: np.float32) -> np.ndarray:
    """Bool (S, S) cover of shape ``kind`` with size ``r`` in its own frame (u, v)."""
    name = SHAPE_NAMES[kind]
    if name == "disk":
        return u * u + v * v <= r * r
    if name == "square":  # half side 0.8 r: area close to the other shapes'
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if name == "triangle":  # equilateral, circumradius r, so the apothem is r / 2
        cover = np.ones(u.shape, bool)
        for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):
            cover &= u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)) <= 0.5 * r
        return cover
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    # cross: two bars of half-width 0.3 r and half-length r
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3 * r) & (av <= r)) | ((av <= 0.3 * r) & (au <= r))


def _texture(rng: np.random.Generator, name: str, u: np.ndarray, v: np.ndarray, scale: float):
    """(S, S) float32 blend weights in [0, 1] between the two shape colours, or None for solid."""
    if name == "solid":
        return None
    if name == "stripes":
        period = rng.uniform(3.0, 8.0) * max(scale, 0.5)
        phi = rng.uniform(0.0, np.pi)
        along = u * np.float32(np.cos(phi)) + v * np.float32(np.sin(phi))
        return (np.sin(along * np.float32(2 * np.pi / period)) > 0).astype(np.float32)
    if name == "checker":
        period = np.float32(rng.uniform(2.5, 6.0) * max(scale, 0.5))
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    # noise: blocky random weights, 1-2 px cells
    size = u.shape[0]
    cell = int(rng.integers(1, 3))
    coarse = rng.random((size // cell + 1, size // cell + 1), dtype=np.float32)
    return np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:size, :size]


class ShapesSegmentation(_ShapesBase):
    """Semantic segmentation of 1-3 random shapes on a cluttered background.

    ``ShapesSegmentation(split="train"|"validation", *, num_examples, image_size=64, seed=0)``.
    ``ds[i]`` -> ``{"image": uint8 (S, S, 3), "mask": int32 (S, S)}`` with mask values in
    ``0..5`` (``CLASS_NAMES``; 0 = background, which includes the clutter). Shapes have radius
    ``U(8, 22) * S / 64`` px, a random centre (up to half a radius may leave the frame), rotation,
    colour and texture; later shapes occlude earlier ones.
    """

    _TAG = "segmentation"
    CLASS_NAMES = ("background",) + SHAPE_NAMES
    NUM_CLASSES = len(CLASS_NAMES)
    # Colours for visualising masks (row = class id).
    PALETTE = np.array(
        [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]],
        dtype=np.uint8,
    )

    def _example(self, rng):
        size = self.image_size
        img = self._background(rng)
        mask = np.zeros((size, size), np.int32)
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, len(SHAPE_NAMES)))
            radius = rng.uniform(8.0, 22.0) * self._scale
            cy, cx = rng.uniform(0.5 * radius, size - 0.5 * radius, 2)
            cover = self._draw_shape(rng, img, kind, radius, cy, cx)
            mask[cover] = kind + 1
        return {"image": self._finish(rng, img), "mask": mask}


class ShapesRecognition(_ShapesBase):
    """Classification of a single random shape on a cluttered background.

    ``ShapesRecognition(split="train"|"validation", *, num_examples, image_size=64, seed=0)``
    (32 and 64 are the intended sizes; any size >= 16 works). ``ds[i]`` ->
    ``{"image": uint8 (S, S, 3), "label": int32 ()}`` with label in ``0..4`` (``CLASS_NAMES``).
    The shape has radius ``U(0.2, 0.36) * S`` and its centre keeps it mostly inside the frame.
    """

    _TAG = "recognition"
    CLASS_NAMES = SHAPE_NAMES
    NUM_CLASSES = len(CLASS_NAMES)

    def _example(self, rng):
        size = self.image_size
        img = self._background(rng)
        label = int(rng.integers(0, len(SHAPE_NAMES)))
        radius = rng.uniform(0.2, 0.36) * size
        cy, cx = rng.uniform(0.8 * radius, size - 0.8 * radius, 2)
        self._draw_shape(rng, img, label, radius, cy, cx)
        return {"image": self._finish(rng, img), "label": np.asarray(label, np.int32)}
