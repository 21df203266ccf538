"""Constants shared by the models, the evaluation protocol and the input pipeline."""

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]

# Per-channel RGB statistics of ImageNet on [0, 1] images: the normalisation every upstream
# backbone was pretrained with (torchvision's values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
