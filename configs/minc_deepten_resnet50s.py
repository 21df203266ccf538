"""Deep TEN (ResNet-50s + Encoding layer) on MINC-2500, split 1: the recipe PyTorch-Encoding documents.

48,875 training images (2,125 per class x 23). Published top-1 on test-1 (store
``deepten_resnet50_minc``): README, Recipes.
"""

from configs import common

BATCH = 512


def get_config():
    c = common.upstream_recognition(
        "minc_deepten_resnet50s",
        "minc",
        "deepten_resnet50_minc",
        epochs=80,
        lr=0.004,
        lr_batch_reference=BATCH,
        batch_size=BATCH,
        crop_size=224,
        augment="minc",
        base_size=256,
    )
    c.dataset.fold = 1
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.step_boundaries = (60 * common.steps_per_epoch("minc", BATCH),)
    c.optim.step_gamma = 0.1
    return c
