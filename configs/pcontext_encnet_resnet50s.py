"""EncNet, ResNet-50s backbone, Pascal Context (59 classes, background ignored): upstream's recipe.

    python -m train.main --config configs/pcontext_encnet_resnet50s.py --workdir runs/pc_encnet50 \
        --config.dataset.data_dir=/data
    python -m train.evaluate --config configs/pcontext_encnet_resnet50s.py --checkpoint runs/pc_encnet50

train.py defaults for pcontext, 80 epochs at lr 0.001, aux + SE losses; 4,998 training images (VOC2010
train split). Published numbers (store ``encnet_resnet50s_pcontext``): README, Recipes.
"""

from configs import common


def get_config():
    return common.upstream_segmentation(
        name="pcontext_encnet_resnet50s",
        dataset="pcontext",
        num_classes=59,
        num_train=4998,
        model="encnet",
        backbone="resnet50s",
        epochs=80,
        lr=0.001,
        se_loss=True,
    )
