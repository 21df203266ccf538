"""One of two processes (2 CPU devices each) checking SyncBatchNorm across hosts over loopback.

Usage: python sync_bn_multiprocess_worker.py RANK NUM_PROCESSES PORT. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def main(rank: int, num_processes: int, port: int) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=rank,
        initialization_timeout=120,
    )
    from jaxenc.nn import BatchNorm, SyncBatchNorm

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    x = (
        np.random.default_rng(0).normal(size=(4 * jax.device_count(), 3, 3, 5)).astype(np.float32)
        * 2
        + 1
    )
    per_process = x.shape[0] // num_processes
    local = x[
        rank * per_process : (rank + 1) * per_process
    ]  # this process's shard of the global batch
    global_x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), local, x.shape
    )

    sync = SyncBatchNorm(axis_name="data")
    variables = sync.init(jax.random.key(0), local)
    stats = variables["batch_stats"]
    step = jax.jit(
        jax.shard_map(
            lambda s, xs: sync.apply(
                {"params": variables["params"], "batch_stats": s},
                xs,
                train=True,
                mutable=["batch_stats"],
            ),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=(P("data"), P()),
        )
    )
    for _ in range(3):
        y, upd = step(stats, global_x)
        stats = upd["batch_stats"]
    y = multihost_utils.process_allgather(y, tiled=True)

    ref_stats = variables["batch_stats"]
    for _ in range(3):  # the whole batch on this process's first device
        y_ref, upd = BatchNorm().apply(
            {"params": variables["params"], "batch_stats": ref_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        ref_stats = upd["batch_stats"]
    errors = [np.abs(np.asarray(y) - np.asarray(y_ref)).max()]
    # The running statistics are replicated: every process holds the full (identical) copy.
    errors += [
        np.abs(np.asarray(stats[k].addressable_data(0)) - np.asarray(ref_stats[k])).max()
        for k in ("mean", "var")
    ]
    multihost_utils.sync_global_devices("done")
    print(
        json.dumps(
            {
                "rank": rank,
                "process_count": jax.process_count(),
                "global_devices": jax.device_count(),
                "max_error": float(max(errors)),
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
