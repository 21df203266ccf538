"""DeepLabV3, ResNeSt-50 backbone, Cityscapes (19 train ids): upstream's train.py settings for citys.

Upstream's defaults, crop 480 / base 520 (Cityscapes work elsewhere usually trains at base 1024 /
crop 768: override ``--config.input.base_size`` and ``--config.dataset.image_size``), 240 epochs,
evaluation at scales 0.75..2.25. Upstream publishes no Cityscapes number for this code (issue #290).
"""

from configs import common


def get_config():
    return common.upstream_segmentation(
        "cityscapes", "deeplab", "resnest50", epochs=240, lr=0.004, scales=common.CITYSCAPES_SCALES
    )
