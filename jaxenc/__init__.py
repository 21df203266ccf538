"""jaxenc: PyTorch-Encoding, holocron.nn, vit-pytorch blocks and Synchronized-BatchNorm in JAX/Flax.

Subpackages: ``jaxenc.nn`` (Flax linen layers, NHWC), ``jaxenc.losses`` (pure functions, class axis
last), ``jaxenc.port`` (PyTorch state_dict -> Flax variables), ``jaxenc.kernels`` (Pallas kernels).
"""

__version__ = "0.1.0"

from jaxenc import kernels, losses, nn, port  # noqa: E402,F401

__all__ = ["kernels", "losses", "nn", "port", "__version__"]
