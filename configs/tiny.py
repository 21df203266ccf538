"""Smoke-test recipe: the default EncNet recipe shrunk to seconds (32 px, 8-channel stages, 12 steps).

    python -m train.main --config configs/tiny.py --workdir /tmp/tiny

Checks an installation end to end (input pipeline, train step, evaluation, checkpoints, metrics
files, prediction PNG) and is what the trainer's tests run. Not a recipe that learns much.
"""

from __future__ import annotations

from configs import default


def get_config():
    c = default.get_config()
    c.name = "tiny"
    c.dataset.image_size = 32
    c.dataset.num_train = 64
    c.dataset.num_val = 12
    c.input.global_batch_size = 8
    c.input.eval_batch_size = 8
    c.model.kwargs.backbone_kwargs = {"layers": (1, 1, 1, 1), "stage_planes": (8, 16, 32, 64)}
    c.train.num_steps = 12
    c.optim.warmup_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 6
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 3
    c.train.sample_predictions = 4
    return c
