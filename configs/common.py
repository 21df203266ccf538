"""Builders shared by the real-data recipes: upstream's segmentation
recipe (``experiments/segmentation/train.py``) and recognition recipe (``experiments/recognition``).

Not a recipe itself. Each recipe file calls one builder with its upstream hyper-parameters, so the
fields every recipe has (and that ``--config.x=y`` can override) are defined once, here and in
``configs/default.py``. Every recipe runs and evaluates the same way:

    python -m train.main --config configs/<recipe>.py --workdir runs/<recipe> \
        --config.dataset.data_dir=/data
    python -m train.evaluate --config configs/<recipe>.py --checkpoint runs/<recipe>
"""

from __future__ import annotations

import ml_collections

from configs import default

#: Multi-scale evaluation scales of upstream's MultiEvalModule (Cityscapes uses its own list).
SEG_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CITYSCAPES_SCALES = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25)

#: (classes, training images) of each real dataset, as upstream's dataset classes count them; the
#: number of training images sets the steps of an epoch.
DATASETS = {
    "ade20k": (150, 20210),
    "pcontext": (59, 4998),
    "cityscapes": (19, 2975),
    "imagenet2012": (1000, 1_281_167),
    "minc": (23, 48_875),
}


def steps_per_epoch(dataset: str, batch_size: int) -> int:
    """Upstream's epoch with drop_last: floor(training images / batch)."""
    return DATASETS[dataset][1] // batch_size


def _base(name: str, task: str) -> ml_collections.ConfigDict:
    c = default.get_config()
    c.name = name
    c.task = task
    c.seed = 1  # upstream's --seed default
    # The procedural sets' keys do not apply to real datasets.
    del c.dataset["num_train"]
    del c.dataset["num_val"]
    del c.dataset["seed"]
    c.dataset.backend = "auto"  # ade20k: the ADEChallengeData2016 folder if present, else TFDS
    c.input.worker_count = 8  # grain worker processes (upstream --workers 8 per GPU for train_dist)
    c.model.disable_dropout = False
    return c


def upstream_segmentation(
    dataset: str,
    model: str,
    backbone: str,
    *,
    epochs: int,
    lr: float,
    se_loss: bool = False,
    scales=SEG_SCALES,
    base_size: int = 520,
    crop_size: int = 480,
    batch_size: int = 16,
    name: str | None = None,
) -> ml_collections.ConfigDict:
    """Upstream's segmentation recipe: SGD (momentum 0.9, wd 1e-4), poly(0.9) with no warmup, lr given
    for a total batch of 16 and scaled linearly with it, 10x lr on the head and aux head, SyncBN, aux
    loss 0.2 (+ SE loss 0.2 for EncNet), ``epochs`` x floor(num_train / batch) steps (drop_last),
    augmentation = ``_sync_transform`` (long side in [0.5, 2.0] x base_size, flip, pad, crop),
    ImageNet-pretrained backbone from the model store, multi-scale + flip evaluation. The recipe's
    name defaults to ``<dataset>_<model>_<backbone>``."""
    c = _base(name or f"{dataset}_{model}_{backbone}", "segmentation")
    c.dataset.name = dataset
    c.dataset.num_classes = DATASETS[dataset][0]
    # The training crop, the validation centre crop and the evaluation window.
    c.dataset.image_size = crop_size

    c.input.global_batch_size = batch_size
    c.input.eval_batch_size = batch_size
    c.input.augment = "upstream"
    c.input.base_size = base_size
    c.input.mask_pad = -1  # masks arrive with -1 = ignore (VOC: 0 = background reproduces upstream)
    c.input.interpolation = "bilinear"
    del c.input["scale_range"]

    c.model.name = model
    c.model.backbone = backbone
    kwargs = {"aux": True, "backbone_kwargs": {}}
    if model in ("encnet", "atten"):
        kwargs["se_loss"] = se_loss
    c.model.kwargs = ml_collections.ConfigDict(kwargs)
    c.model.norm = "sync_bn"
    c.model.backbone_pretrained = backbone  # the model store's ImageNet weights (local cache)

    c.loss.aux_weight = 0.2
    c.loss.se_weight = 0.2

    c.optim.name = "sgd"
    c.optim.lr = lr
    c.optim.lr_batch_reference = 16
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.head_lr_mult = 10.0
    c.optim.schedule = "poly"
    c.optim.poly_power = 0.9
    c.optim.warmup_steps = 0

    epoch = steps_per_epoch(dataset, batch_size)
    c.train.num_steps = epochs * epoch
    c.train.log_every = 50
    c.train.eval_every = 10 * epoch  # train_dist.py validates every 10 epochs (single scale)
    c.train.checkpoint_every = epoch
    c.train.best_metric = "mIoU"
    c.train.sample_predictions = 8

    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "multi_scale"
    c.eval.scales = tuple(scales)
    c.eval.flip = True
    c.eval.base_size = base_size
    c.eval.crop_size = crop_size
    c.eval.split = "validation"
    c.eval.num_images = 0
    c.eval.save_predictions = 8
    c.eval.batch_size = 8
    return c


def upstream_recognition(
    name: str,
    dataset: str,
    model: str,
    *,
    epochs: int,
    lr: float,
    lr_batch_reference: int,
    batch_size: int,
    crop_size: int = 224,
    augment: str = "imagenet",
    base_size: int | None = None,
) -> ml_collections.ConfigDict:
    """Upstream's recognition recipe skeleton (train_dist.py): SGD momentum 0.9 (not Nesterov), wd 1e-4,
    cosine, no warmup, CE; recipes add their regularisation (label smoothing, mixup, RandAugment...)."""
    c = _base(name, "recognition")
    c.dataset.name = dataset
    c.dataset.num_classes = DATASETS[dataset][0]
    c.dataset.image_size = crop_size

    c.input.global_batch_size = batch_size
    c.input.eval_batch_size = batch_size
    c.input.augment = augment
    if base_size is not None:
        c.input.base_size = base_size
    c.input.rand_augment = (0, 0)
    c.input.color_jitter = 0.4
    c.input.lighting = 0.1
    c.input.etrans = True
    del c.input["scale_range"]

    c.model.name = model
    c.model.backbone = ml_collections.FieldReference(None, field_type=str)
    c.model.kwargs = ml_collections.ConfigDict({})
    c.model.norm = "sync_bn"

    c.optim.name = "sgd"
    c.optim.lr = lr
    c.optim.lr_batch_reference = lr_batch_reference
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.head_lr_mult = 1.0
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0

    epoch = steps_per_epoch(dataset, batch_size)
    c.train.num_steps = epochs * epoch
    c.train.log_every = 100
    c.train.eval_every = 10 * epoch  # upstream validates when epoch % 10 == 0
    c.train.checkpoint_every = epoch
    c.train.best_metric = "top1"
    c.train.sample_predictions = 0
    return c
