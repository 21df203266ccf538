"""EncNet, ResNet-50s backbone, ADE20K (150 classes): upstream's recipe (experiments/segmentation; model-zoo result).

    python -m train.main --config configs/ade20k_encnet_resnet50s.py --workdir runs/ade_encnet50 \
        --config.dataset.data_dir=/data
    python -m train.evaluate --config configs/ade20k_encnet_resnet50s.py --checkpoint runs/ade_encnet50

train.py defaults: batch 16, crop 480 / base 520, SGD lr 0.004 (10x on the heads), poly, 180 epochs
(the maintainers' ADE runs; train_dist.py uses 120 epochs at lr 0.01), aux + SE losses (0.2 each).
Published (multi-scale + flip): pixAcc 80.1, mIoU 41.5 (store weights ``encnet_resnet50s_ade``).
"""

from configs import common


def get_config():
    return common.upstream_segmentation(
        name="ade20k_encnet_resnet50s",
        dataset="ade20k",
        num_classes=150,
        num_train=20210,
        model="encnet",
        backbone="resnet50s",
        epochs=180,
        lr=0.004,
        se_loss=True,
    )
