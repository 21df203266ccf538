"""Fine-tuning starts: ``params``/``batch_stats`` from a checkpoint of this trainer or a native ``.msgpack``.

A thin wrapper of :func:`jaxenc.models.load_weights`, the one weight-loading path (which also reads
model-store names and upstream PyTorch files).
"""

from __future__ import annotations

import os
from typing import Any

from jaxenc.models.weights import load_weights

__all__ = ["load_params_for_finetune"]


def load_params_for_finetune(
    path: str | os.PathLike,
    target_variables: Any,
    *,
    strict: bool = True,
    use_ema: bool = False,
) -> Any:
    """Load weights for fine-tuning into the structure of ``target_variables``:
    ``jaxenc.models.load_weights(path, target_variables, strict=strict, use_ema=use_ema)``.

    Args:
      path: a checkpoint written by :class:`train.checkpoint.Checkpointer` (a step directory, a
        manager directory, or a workdir: its best checkpoint if any, else the latest; only the
        state's ``params`` and ``batch_stats`` are read) or a native jaxenc ``.msgpack``. A PyTorch
        file needs its flax module: use :func:`jaxenc.models.load_weights` with ``model=``.
      target_variables: the model's variables (arrays or ``jax.eval_shape`` output); the result has
        their structure, dtypes and shardings.
      strict: True: any missing, unexpected or mis-shaped leaf raises ValueError listing them all.
        False: missing and mis-shaped leaves keep the target's value (e.g. a new classifier head),
        unexpected ones are dropped, and a warning lists them.
      use_ema: read the state's ``ema_params`` instead of ``params`` (Checkpointer format only).
    """
    return load_weights(path, target_variables, strict=strict, use_ema=use_ema)
