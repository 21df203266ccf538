"""Artifact files: the output-path check done before a conversion, writing, and :func:`load`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["FORMATS", "check_output_path", "load", "write_artifact"]

#: Export formats and their usual file suffix.
FORMATS = {"stablehlo": ".jax_exported", "onnx": ".onnx"}


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute after checking that a file can be created there (its directory exists
    or can be made, and is writable; ``path`` is not a directory). Run before the long conversion."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise ValueError(f"jaxenc.export: output {p} is a directory; give a file path")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{p.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise ValueError(f"jaxenc.export: cannot write the output {p}: {err}") from None
    return p


def write_artifact(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return p


def load(path: str | os.PathLike, *, providers=None):
    """The artifact at ``path`` as a callable ``f(x)``, x (B, H, W, 3) float images (NHWC, normalised).

    ``.onnx`` files run in onnxruntime (:class:`jaxenc.export.onnx_export.OnnxModel`, numpy outputs;
    ``providers`` default CPU), anything else is read as a ``jax.export`` artifact
    (:class:`jaxenc.export.stablehlo.StableHLOModel`, jax outputs). Either returns what the exported
    function returns (see :mod:`jaxenc.export.forward`); a wrong input shape raises ValueError
    naming the accepted one.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"jaxenc.export.load: {p} does not exist")
    data = p.read_bytes()
    if p.suffix.lower() == ".onnx":
        from jaxenc.export.onnx_export import load_onnx

        return load_onnx(data, providers)
    from jaxenc.export.stablehlo import load_stablehlo

    return load_stablehlo(data)
