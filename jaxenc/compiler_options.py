"""XLA compiler options for jaxenc's programs, chosen per backend.

Pass them to ``jax.jit(fn, compiler_options=compiler_options())`` (the trainer, ``train.evaluate``
and the benchmarks do). On GPU and TPU they are empty: XLA's defaults are what cuDNN / the TPU
compiler want.

XLA:CPU (jax 0.10 to 0.12) hands dots, reductions, elementwise fusions and convolutions to the
YNNPACK library. For the convolutions of ResNet-style networks XLA's Eigen convolution is faster,
so :data:`CPU_CONV_NETS` keeps YNNPACK for everything except convolutions. Measured on 2 CPU cores
(jax 0.10.2, float32, SGD train step at batch 4, 224 x 224, medians of 8 interleaved steps): ResNet-50
1.02 s -> 0.93 s, ResNeSt-50 1.43 s -> 1.31 s; a 3x3 conv 64 -> 64 channels at 56 x 56, forward
10.3 ms -> 6.0 ms. The numbers are the same function up to float32 summation order. The price is
memory: YNNPACK's convolutions take their BatchNorm / ReLU producers in, Eigen's need them
materialised (deeplab_resnest50 train step, batch 2, 256 x 256: temporaries 1.37 GB -> 2.11 GB).

``remat=True`` (the program uses ``jax.checkpoint``: a model built with ``remat="block"``) asks for
memory over speed: :data:`CPU_KEEP_REMAT` instead. XLA:CPU expands ``jax.checkpoint``'s
optimisation barriers early (the ``cse_barrier_expander`` pass), after which common-subexpression
elimination merges the recomputation with the forward pass and the memory saving is lost
(deeplab_resnest50 as above: temporaries 0.61x of the plain step's instead of 0.32x); the option
keeps the barriers, as GPU and TPU do.

An option this jaxlib does not know (they are experimental flags) is dropped with a warning, so a
newer jax still compiles.
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
