"""EncNet, ResNet-50s backbone, Pascal Context (59 classes, background ignored): upstream's recipe.

    python -m train.main --config configs/pcontext_encnet_resnet50s.py --workdir runs/pc_encnet50 \
        --config.dataset.data_dir=/data
    python -m train.evaluate --config configs/pcontext_encnet_resnet50s.py --checkpoint runs/pc_encnet50

train.py defaults for pcontext: batch 16, crop 480 / base 520, SGD lr 0.001 (10x on the heads), poly,
80 epochs, aux + SE losses. Published (multi-scale + flip): pixAcc 79.2, mIoU 51.0 (store
``encnet_resnet50s_pcontext``). 4,998 training images (VOC2010 train split).
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
