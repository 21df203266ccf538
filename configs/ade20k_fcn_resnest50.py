"""FCN, ResNeSt-50 backbone, ADE20K (150 classes): upstream's recipe (experiments/segmentation; model-zoo result).

    python -m train.main --config configs/ade20k_fcn_resnest50.py --workdir runs/ade_fcn_s50 \
        --config.dataset.data_dir=/data
    python -m train.evaluate --config configs/ade20k_fcn_resnest50.py --checkpoint runs/ade_fcn_s50

train.py defaults with --aux, 180 epochs. Published numbers (store ``fcn_resnest50_ade``): README, Recipes.
"""

from configs import common


def get_config():
    return common.upstream_segmentation(
        name="ade20k_fcn_resnest50",
        dataset="ade20k",
        num_classes=150,
        num_train=20210,
        model="fcn",
        backbone="resnest50",
        epochs=180,
        lr=0.004,
    )
