"""ONNX export through jax2onnx, and :func:`load_onnx`, an onnxruntime session as a callable.

jax2onnx (Apache-2.0, maintained, converts jaxprs op by op, so no TensorFlow is involved) is not a
hard dependency: its 0.17.1 metadata pins ``orbax-checkpoint<0.11.37``, which jaxenc's
``orbax-checkpoint>=0.12.8`` excludes, although jax2onnx imports orbax only in its ``sandbox/``
examples. ``.ci/setup`` therefore installs the ``onnx`` extra (the dependencies jax2onnx really
imports) and then ``pip install --no-deps jax2onnx==0.17.1``. Both imports are lazy: without them
only the ONNX functions fail, with a message naming the install commands.

Grouped convolutions are traced as one ``lax.conv_general_dilated`` (ONNX ``Conv`` with ``group``)
instead of jaxenc's CPU forms, which onnxruntime would run as many small ops.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxenc.export.forward import inference_function
from jaxenc.export.signature import input_spec, parse_dynamic

__all__ = ["INSTALL_HINT", "OnnxModel", "export_onnx", "load_onnx", "onnx_converter"]

#: How to install the ONNX pieces (what ``.ci/setup`` does).
INSTALL_HINT = (
    "pip install 'jaxenc[onnx]' && pip install --no-deps jax2onnx==0.17.1 "
    "(jax2onnx's metadata pins an older orbax-checkpoint that it does not import; see .ci/setup)"
)

_OUTPUT_KIND = "jaxenc.outputs"  # metadata key: "array" (one output) or "tuple"


def onnx_converter():
    """``jax2onnx.to_onnx``; ImportError naming the install commands when it is missing."""
    try:
        from jax2onnx import to_onnx
    except ImportError as err:
        raise ImportError(
            f"jaxenc.export: ONNX export needs jax2onnx ({err}); {INSTALL_HINT}"
        ) from None
    return to_onnx


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            f"jaxenc.export: running ONNX needs onnxruntime ({err}); {INSTALL_HINT}"
        ) from None
    return onnxruntime


@contextlib.contextmanager
def _quiet(name: str = "onnx_ir"):
    """onnx_ir logs every pass at INFO; keep its warnings and errors only."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model,
    variables: Any,
    *,
    image_size: int | Sequence[int],
    batch_size: int = 1,
    dynamic: str | Sequence[str] | None = None,
    outputs: str = "all",
    opset: int = 23,
) -> bytes:
    """A serialized ONNX ``ModelProto`` of ``model``'s eval-mode forward with ``variables``.

    Input ``image`` (B, H, W, 3) float32 normalised images, B symbolic (``B``) with
    ``dynamic="batch"``, H and W symbolic (``H``, ``W``, free: any size the network's shape logic
    holds for) with ``dynamic`` naming ``size``; the graph's outputs in the order of
    :func:`jaxenc.export.forward.inference_function` (metadata ``jaxenc.outputs``: "array" for one
    output, "tuple" for a segmentation model's tuple). Raises ValueError for a model whose compute
    dtype is not float32, or whose shape logic does not trace with free symbolic sizes.
    """
    axes = parse_dynamic(dynamic)
    if getattr(model, "dtype", None) is not None and np.dtype(model.dtype) != np.float32:
        raise ValueError(
            f"jaxenc.export: ONNX export is float32 only (the model computes in "
            f"{np.dtype(model.dtype).name}; onnxruntime's CPU provider has no bfloat16 Conv); use "
            "format 'stablehlo' for bfloat16"
        )
    to_onnx = onnx_converter()
    from jaxenc.nn.grouped_conv import grouped_conv_impl

    spec = input_spec(image_size, batch_size=batch_size, dynamic=dynamic, size_multiple=1)
    # jax2onnx takes named free dimensions (not expressions such as 32*h).
    names = ("B" if "batch" in axes else None, *(("H", "W") if "size" in axes else (None, None)))
    dims = tuple(n or int(d) for n, d in zip(names, spec.shape[:3])) + (3,)
    fn = inference_function(model, variables, outputs)
    try:
        with grouped_conv_impl("xla"), _quiet():
            proto = to_onnx(
                fn,
                [dims],
                model_name=type(model).__name__,
                opset=opset,
                return_mode="proto",
                input_names=["image"],
            )
    except (ValueError, jax.errors.InconclusiveDimensionOperation) as err:
        if "size" not in axes:
            raise
        raise ValueError(
            f"jaxenc.export: {type(model).__name__} does not convert to ONNX with free symbolic "
            f"height and width ({err}); use dynamic='batch', or format 'stablehlo' (sizes that "
            "are multiples of 32)"
        ) from None
    meta = proto.metadata_props.add()
    meta.key, meta.value = _OUTPUT_KIND, "tuple" if _returns_tuple(model, outputs) else "array"
    return proto.SerializeToString()


def _returns_tuple(model, outputs: str) -> bool:
    from jaxenc.models.segmentation import BaseNet

    return isinstance(model, BaseNet) and outputs == "all"


class OnnxModel:
    """An ONNX file in an onnxruntime CPU session, as a callable: ``model(x)`` with x (B, H, W, 3)
    float images returns numpy arrays: one array, or a tuple when the export returned a tuple.
    ``session`` is the ``onnxruntime.InferenceSession``; ``input_shape`` the accepted shape."""

    def __init__(self, data: bytes, providers: Sequence[str] | None = None):
        ort = _onnxruntime()
        self.session = ort.InferenceSession(
            data, providers=list(providers or ["CPUExecutionProvider"])
        )
        (inp,) = self.session.get_inputs()
        self._input = inp.name
        self.input_shape = tuple(inp.shape)
        meta = self.session.get_modelmeta().custom_metadata_map
        self._tuple = meta.get(_OUTPUT_KIND, "tuple") == "tuple"

    def __call__(self, x):
        x = np.asarray(x, np.float32)
        expected = self.input_shape
        fits = x.ndim == len(expected) and all(
            not isinstance(e, int) or e == s for e, s in zip(expected, x.shape)
        )
        if not fits:
            shown = "(" + ", ".join(str(e) for e in expected) + ")"
            raise ValueError(
                f"jaxenc.export: the ONNX model takes input {shown} float32 (NHWC), got shape {x.shape}"
            )
        out = self.session.run(None, {self._input: x})
        return tuple(out) if self._tuple else out[0]


def load_onnx(
    source: str | os.PathLike | bytes, providers: Sequence[str] | None = None
) -> OnnxModel:
    """The ONNX model at path ``source`` (or its bytes) as an :class:`OnnxModel`."""
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    return OnnxModel(data, providers)
