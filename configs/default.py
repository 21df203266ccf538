"""Default recipe: a small EncNet on the built-in procedural shapes segmentation set (CPU, minutes).

    python -m train.main --config configs/default.py --workdir runs/default

EncNet (K=32 codewords, SE loss, aux FCN head) on a narrow dilated ResNet-18-style backbone, 64x64
images, AdamW + cosine, SyncBN, 2500 steps of batch 16; results and the SGD comparison: README,
Training. AdamW because from scratch on this small set it converges far faster than upstream's
SGD + poly + 10x head lr (which the real-data recipes keep). ``--config.optim.lr=0.02`` overrides a
field; unknown keys are rejected.
"""

from __future__ import annotations

import ml_collections

from jaxenc.constants import IMAGENET_MEAN, IMAGENET_STD


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "default"
    c.seed = 0
    c.task = "segmentation"

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "shapes_seg"
    c.dataset.image_size = 64
    c.dataset.num_classes = 6
    c.dataset.num_train = 32768
    c.dataset.num_val = 256
    c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
    # The built-in procedural sets draw their images from this seed; config.seed shuffles them.
    c.dataset.seed = 0

    c.input = ml_collections.ConfigDict()
    c.input.global_batch_size = 16
    c.input.eval_batch_size = 64
    c.input.worker_count = 0
    # A file the input cannot read (truncated or not an image, mask labels outside the classes):
    # "error" stops with one line naming it, "skip" replaces it with the next readable example
    # and counts it (summary.json, metrics.jsonl). May change on resume.
    c.input.bad_examples = "error"
    c.input.flip = True
    # Random rescale by a factor in (lo, hi), then pad/crop back; (1.0, 1.0) = none. The procedural set
    # needs no augmentation (32768 distinct images); real-data recipes use upstream's (0.5, 2.0).
    c.input.scale_range = (1.0, 1.0)
    c.input.mean = IMAGENET_MEAN
    c.input.std = IMAGENET_STD

    c.model = ml_collections.ConfigDict()
    c.model.name = "encnet"
    c.model.backbone = "resnet18"
    c.model.kwargs = ml_collections.ConfigDict(
        {
            "aux": True,
            "se_loss": True,
            "lateral": False,
            "backbone_kwargs": {"layers": (1, 1, 1, 1), "stage_planes": (32, 64, 128, 256)},
        }
    )
    c.model.norm = "sync_bn"
    c.model.dtype = "float32"
    # "block": every residual block (and the segmentation heads) rematerialised, i.e. recomputed in the
    # backward pass: less activation memory for about one more forward pass of compute.
    c.model.remat = "none"
    # Whole-model weights (a .pth/.zip/.msgpack of this exact model) or ImageNet backbone weights (a
    # model-store name such as "resnest50", or a file) placed under params/pretrained.
    c.model.pretrained = ml_collections.FieldReference(None, field_type=str)
    c.model.backbone_pretrained = ml_collections.FieldReference(None, field_type=str)
    c.model.disable_dropout = False

    c.loss = ml_collections.ConfigDict()
    c.loss.aux_weight = 0.2
    c.loss.se_weight = 0.2
    c.loss.label_smoothing = 0.0
    c.loss.mixup_alpha = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 0.005
    c.optim.lr_batch_reference = ml_collections.FieldReference(None, field_type=int)
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 1e-4
    c.optim.no_bn_wd = False
    c.optim.head_lr_mult = 1.0
    c.optim.backbone_prefix = "pretrained"
    c.optim.schedule = "cosine"
    c.optim.poly_power = 0.9
    c.optim.warmup_steps = 50
    c.optim.step_boundaries = ()
    c.optim.step_gamma = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_grad_norm = ml_collections.FieldReference(None, field_type=float)
    c.optim.grad_accum_steps = 1
    c.optim.ema_decay = ml_collections.FieldReference(None, field_type=float)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2500
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.best_metric = "mIoU"
    c.train.sample_predictions = 8
    c.train.allow_config_change = False
    # JAX's persistent compilation cache (train/compile_cache.py): "user" (~/.cache/jaxenc/xla or
    # $JAXENC_CACHE_DIR), "workdir" (<workdir>/xla_cache), "off", or a directory.
    c.train.compile_cache = "user"
    c.train.finetune_from = ml_collections.FieldReference(None, field_type=str)

    # python -m train.evaluate: upstream's protocol at this recipe's size (the base and the window follow
    # dataset.image_size, so configs derived from this one stay consistent). Flip only: trained without
    # scale augmentation, the model loses at other scales (README, Training).
    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "multi_scale"
    c.eval.scales = (1.0,)
    c.eval.flip = True
    c.eval.base_size = c.dataset.get_ref("image_size")
    c.eval.crop_size = c.dataset.get_ref("image_size")
    c.eval.split = "validation"
    c.eval.num_images = 0
    c.eval.save_predictions = 8
    c.eval.batch_size = 16

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False
    c.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    c.distributed.num_processes = ml_collections.FieldReference(None, field_type=int)
    c.distributed.process_id = ml_collections.FieldReference(None, field_type=int)
    return c
