"""EncNet, ResNet-50s backbone, ADE20K (150 classes): upstream's recipe (experiments/segmentation; model-zoo result).

train.py defaults, 180 epochs at lr 0.004 (the maintainers' ADE runs; train_dist.py uses 120 epochs at
lr 0.01), aux + SE losses. Published numbers (store ``encnet_resnet50s_ade``): README, Recipes.
"""

from configs import common


def get_config():
    return common.upstream_segmentation(
        "ade20k", "encnet", "resnet50s", epochs=180, lr=0.004, se_loss=True
    )
