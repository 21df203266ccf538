"""jaxenc: PyTorch-Encoding, holocron.nn, vit-pytorch blocks and Synchronized-BatchNorm in JAX/Flax.

Subpackages: ``jaxenc.nn`` (Flax linen layers, NHWC), ``jaxenc.losses`` (pure functions, class axis
last), ``jaxenc.port`` (PyTorch state_dict -> Flax variables), ``jaxenc.kernels`` (Pallas kernels).
"""

__version__ = "0.1.0"

import importlib

__all__ = ["kernels", "losses", "nn", "port", "__version__"]
_SUBPACKAGES = ("kernels", "losses", "nn", "port")


# Subpackages load on first use, so that the light modules (jaxenc.validation, jaxenc.constants) can
# be imported (by the input pipeline, say) without building flax and every layer module.
def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"jaxenc.{name}")
    raise AttributeError(f"module 'jaxenc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
