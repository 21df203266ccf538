"""XLA compiler options for jaxenc's programs, chosen per backend.

Pass them to ``jax.jit(fn, compiler_options=compiler_options())`` (the trainer, ``train.evaluate``
and the benchmarks do). Empty on GPU and TPU. On XLA:CPU :data:`CPU_CONV_NETS` gives convolutions to
Eigen instead of YNNPACK (faster for ResNet-style nets, same function up to summation order, more
temporaries); with ``remat=True`` :data:`CPU_KEEP_REMAT` instead keeps ``jax.checkpoint``'s barriers
(disables ``cse_barrier_expander``, whose CSE would undo the recomputation), as GPU and TPU do.
Measurements: README, Speed and memory. An option this jaxlib does not know is dropped with a
warning, so a newer jax still compiles.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

__all__ = ["CPU_CONV_NETS", "CPU_KEEP_REMAT", "compiler_options", "supported_options"]

# fmt: off
CPU_CONV_NETS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
}
# fmt: on
CPU_KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(backend: str | None = None, *, remat: bool = False) -> dict:
    """The options for a jaxenc network's programs on ``backend`` (default: JAX's default backend).

    ``remat``: the program differentiates through ``jax.checkpoint`` (a model built with
    ``remat="block"``): memory over speed. Returns a new dict, empty off CPU.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}
    return supported_options(dict(CPU_KEEP_REMAT if remat else CPU_CONV_NETS), backend)


def supported_options(options: dict, backend: str | None = None) -> dict:
    """``options`` without the entries this jaxlib's ``backend`` compiler rejects (each one warned)."""
    backend = backend or jax.default_backend()
    return {k: v for k, v in options.items() if _accepted(k, v, backend)}


@functools.cache
def _accepted(key: str, value, backend: str) -> bool:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices(backend)[0])
    probe = jax.jit(lambda x: x + 1).lower(
        jax.ShapeDtypeStruct((1,), jnp.float32, sharding=sharding)
    )
    try:
        probe.compile(compiler_options={key: value})
    except Exception as err:  # noqa: BLE001 - XLA raises a bare runtime error for unknown options
        warnings.warn(
            f"jaxenc.compiler_options: this jaxlib rejects {key}={value!r} ({err}); compiling without it",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
