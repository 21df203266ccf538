"""DeepLabV3, ResNeSt-50 backbone, Pascal Context (59 classes): upstream's recipe (experiments/segmentation; model-zoo result).

    python -m train.main --config configs/pcontext_deeplab_resnest50.py --workdir runs/pc_deeplab_s50 \
        --config.dataset.data_dir=/data
    python -m train.evaluate --config configs/pcontext_deeplab_resnest50.py --checkpoint runs/pc_deeplab_s50

train.py defaults for pcontext with --aux, 80 epochs at lr 0.001. Published numbers (store
``deeplab_resnest50_pcontext``): README, Recipes.
"""

from configs import common


def get_config():
    return common.upstream_segmentation(
        name="pcontext_deeplab_resnest50",
        dataset="pcontext",
        num_classes=59,
        num_train=4998,
        model="deeplab",
        backbone="resnest50",
        epochs=80,
        lr=0.001,
    )
