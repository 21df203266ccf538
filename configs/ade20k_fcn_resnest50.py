"""FCN, ResNeSt-50 backbone, ADE20K (150 classes): upstream's recipe (experiments/segmentation; model-zoo result).

train.py defaults with --aux, 180 epochs. Published numbers (store ``fcn_resnest50_ade``): README, Recipes.
"""

from configs import common


def get_config():
    return common.upstream_segmentation("ade20k", "fcn", "resnest50", epochs=180, lr=0.004)
