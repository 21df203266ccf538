"""EncNet, ResNet-50s backbone, ADE20K (150 classes): upstream's recipe (experiments/segmentation; model-zoo result).

    python -m train.main --config configs/ade20k_encnet_resnet50s.py --workdir runs/ade_encnet50 \
        --config.dataset.data_dir=/data
    python -m train.evaluate --config configs/ade20k_encnet_resnet50s.py --checkpoint runs/ade_encnet50

train.py defaults, 180 epochs at lr 0.004 (the maintainers' ADE runs; train_dist.py uses 120 epochs at
lr 0.01), aux + SE losses. Published numbers (store ``encnet_resnet50s_ade``): README, Recipes.
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
