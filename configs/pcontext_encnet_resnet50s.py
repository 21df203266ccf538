"""EncNet, ResNet-50s backbone, Pascal Context (59 classes, background ignored): upstream's recipe.

train.py defaults for pcontext, 80 epochs at lr 0.001, aux + SE losses; 4,998 training images (VOC2010
train split). Published numbers (store ``encnet_resnet50s_pcontext``): README, Recipes.
"""

from configs import common


def get_config():
    return common.upstream_segmentation(
        "pcontext", "encnet", "resnet50s", epochs=80, lr=0.001, se_loss=True
    )
