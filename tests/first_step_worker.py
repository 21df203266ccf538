"""One gradient step of the tiny recipe on however many devices/processes this process sees.

``python tests/first_step_worker.py OUT.npz [dotted.key=value ...]``: builds the trainer's model,
state and first global batch exactly as ``train.trainer.train_and_evaluate`` does, runs
``train.step.make_gradient_step`` once and (process 0) writes the loss parts, every gradient leaf
and every new BN statistic to OUT.npz. Run by tests/test_train_main.py with 1 device, 4 devices
and 2 processes x 2 devices.
"""

from __future__ import annotations

import ast
import sys

import jax
import numpy as np
from flax.traverse_util import flatten_dict
from tiny_config import tiny_config

from train import optim, trainer
from train.data import pipeline
from train.step import make_gradient_step, make_mesh, shard_batch


def main(out: str, *pairs: str) -> None:
    overrides = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    config = tiny_config(**overrides)
    trainer.initialize_distributed(config.distributed)
    mesh = make_mesh()
    model = trainer.build_model(config)
    cfg = trainer._step_config(config, model)
    source = pipeline.get_source(config.dataset, "train")
    batches = pipeline.train_iterator(
        source,
        global_batch_size=config.input.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        transform=trainer._transform(config, True),
        worker_count=0,
    )
    size = config.dataset.image_size
    variables = trainer._init_variables(
        model, config, np.zeros((1, size, size, 3), np.float32), mesh
    )
    tx, _ = optim.make_optimizer(
        config.optim,
        params=variables["params"],
        total_steps=config.train.num_steps,
        global_batch_size=config.input.global_batch_size,
    )
    state = trainer._init_state(variables, config, tx, mesh)
    parts, grads, stats = make_gradient_step(model, cfg, mesh)(
        state, shard_batch(mesh, next(iter(batches)))
    )
    tree = {"loss": dict(parts), "grads": grads, "batch_stats": stats}
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(tree)).items()}
    if jax.process_index() == 0:
        np.savez(out, **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])
