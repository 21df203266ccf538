"""The Pallas paths never hold the tensors they exist to avoid, forward + backward, at realistic sizes.

Measured from XLA's buffer assignment of the compiled program (``memory_analysis``), as docs/DESIGN.md
(Kernels) states. Without a GPU the Pallas path compiles in interpret mode: the program is the same wrapper
(padding, dilated cotangents, (B, N, K) assignment gradients, per-slice partial sums, kernel
outputs) with each kernel turned into a loop whose per-step block copies only add temporaries, so
these numbers bound the GPU program's from above. The XLA twins' bounds are in test_encoding.py
and test_conv.py.

Sizes: EncNet's head (B=8, 64x64 positions, K=32 codewords, D=512: the residual tensor is 2 GiB)
and a RedNet stem-size involution (B=8, 56x56, C=64, G=4, K=7: the unfolded tensor is 300 MiB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxenc.kernels import encoding, involution


def fwd_bwd_temp_bytes(fn, *shapes) -> int:
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    loss = lambda *a: jnp.sum(fn(*a) ** 2)  # noqa: E731 (a non-trivial cotangent)
    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_encoding_pallas_forward_backward_memory():
    b, n, k, d = 8, 64 * 64, 32, 512
    residuals = b * n * k * d * 4
    temp = fwd_bwd_temp_bytes(
        lambda x, c, s: encoding(x, c, s, impl="pallas", interpret=True), (b, n, d), (k, d), (k,)
    )
    # Measured 236 MiB on jax 0.10.2 and 0.12.0.1 (padded slabs, dX, dSL and the interpreter's
    # block copies) vs 2 GiB; 300 MiB on 0.12 before the backward's optimization_barrier.
    assert temp < residuals / 8, (
        f"forward+backward temporaries {temp / 2**20:.0f} MiB vs {residuals / 2**20:.0f} MiB"
    )


@pytest.mark.slow
def test_involution_pallas_forward_backward_memory():
    b, h, w, c, g, k = 8, 56, 56, 64, 4, 7
    unfolded = b * c * k * k * h * w * 4
    temp = fwd_bwd_temp_bytes(
        lambda x, wt: involution(x, wt, kernel_size=k, padding=3, impl="pallas", interpret=True),
        (b, h, w, c),
        (b, h, w, g, k, k),
    )
    # Measured 126 MiB vs 300 MiB; storing the unfolded tensor in bfloat16 alone would exceed half.
    assert temp < unfolded / 2, (
        f"forward+backward temporaries {temp / 2**20:.0f} MiB vs {unfolded / 2**20:.0f} MiB"
    )
