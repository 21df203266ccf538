"""ResNeSt-50 on ImageNet-2012: the published recipe (experiments/recognition; model-zoo top-1).

lr 0.1 per 256 examples (linear scaling), --no-bn-wd, --last-gamma, label smoothing, mixup,
RandAugment(2, 12). Published top-1 (weights trained in MXNet; store ``resnest50``): README, Recipes.
"""

from configs import common

BATCH = 2048


def get_config():
    c = common.upstream_recognition(
        "imagenet_resnest50",
        "imagenet2012",
        "resnest50",
        epochs=270,
        lr=0.1,
        lr_batch_reference=256,
        batch_size=BATCH,
        crop_size=224,
    )
    c.input.rand_augment = (2, 12)
    c.model.kwargs = {"last_gamma": True}
    c.loss.label_smoothing = 0.1
    c.loss.mixup_alpha = 0.2
    c.optim.no_bn_wd = True
    c.optim.warmup_steps = 5 * common.steps_per_epoch("imagenet2012", BATCH)
    return c
