"""DeepLabV3, ResNeSt-50 backbone, Pascal Context (59 classes): upstream's recipe (experiments/segmentation; model-zoo result).

train.py defaults for pcontext with --aux, 80 epochs at lr 0.001. Published numbers (store
``deeplab_resnest50_pcontext``): README, Recipes.
"""

from configs import common


def get_config():
    return common.upstream_segmentation("pcontext", "deeplab", "resnest50", epochs=80, lr=0.001)
