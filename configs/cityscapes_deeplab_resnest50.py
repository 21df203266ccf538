"""DeepLabV3, ResNeSt-50 backbone, Cityscapes (19 train ids): upstream's train.py settings for citys.

    python -m train.main --config configs/cityscapes_deeplab_resnest50.py --workdir runs/citys_deeplab_s50 \
        --config.dataset.data_dir=/data
    python -m train.evaluate --config configs/cityscapes_deeplab_resnest50.py --checkpoint runs/citys_deeplab_s50

Upstream's defaults, crop 480 / base 520 (Cityscapes work elsewhere usually trains at base 1024 /
crop 768: override ``--config.input.base_size`` and ``--config.dataset.image_size``), 240 epochs,
evaluation at scales 0.75..2.25. Upstream publishes no Cityscapes number for this code (issue #290).
"""

from configs import common


def get_config():
    return common.upstream_segmentation(
        name="cityscapes_deeplab_resnest50",
        dataset="cityscapes",
        num_classes=19,
        num_train=2975,
        model="deeplab",
        backbone="resnest50",
        epochs=240,
        lr=0.004,
        scales=common.CITYSCAPES_SCALES,
    )
