"""Export of jaxenc models for inference outside the training code: StableHLO and ONNX.

Library API (the CLI, ``python -m jaxenc.export``, is :mod:`jaxenc.export.cli`)::

    from jaxenc import export, models
    model = models.get_model("resnest50")
    variables = models.load_weights("resnest50.msgpack", shapes, model=model)
    blob = export.export_stablehlo(model, variables, image_size=224, dynamic="batch")
    onnx_bytes = export.export_onnx(model, variables, image_size=224, dynamic="batch")
    f = export.load("resnest50.jax_exported")   # or a .onnx file: f(x) runs it in onnxruntime
    logits = f(x)                                # x (B, 224, 224, 3) float32, normalised

Inputs are NHWC float32 images already normalised (mean/std); outputs are what
``model.apply(variables, x, train=False)`` returns (:mod:`jaxenc.export.forward`). Symbolic axes:
:mod:`jaxenc.export.signature`. ONNX needs the optional converter (:mod:`jaxenc.export.onnx_export`).
"""

from jaxenc.export.artifacts import FORMATS, check_output_path, load, write_artifact
from jaxenc.export.forward import apply_function, cast_params, inference_function
from jaxenc.export.onnx_export import OnnxModel, export_onnx, load_onnx
from jaxenc.export.resolve import ExportTarget, build_target, load_config_file, target_variables
from jaxenc.export.signature import input_spec, parse_dynamic
from jaxenc.export.stablehlo import StableHLOModel, export_stablehlo, load_stablehlo, read_stablehlo

__all__ = [
    "FORMATS",
    "ExportTarget",
    "OnnxModel",
    "StableHLOModel",
    "apply_function",
    "build_target",
    "cast_params",
    "check_output_path",
    "export_onnx",
    "export_stablehlo",
    "inference_function",
    "input_spec",
    "load",
    "load_config_file",
    "load_onnx",
    "load_stablehlo",
    "parse_dynamic",
    "read_stablehlo",
    "target_variables",
    "write_artifact",
]
