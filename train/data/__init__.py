"""Input data for the trainer: procedural datasets (``synthetic``), the grain pipeline
(``pipeline``: sources by name, sharded checkpointable train iterator, padded eval batches) and the
real-dataset adapters (``sources``: ADE20K, Cityscapes, VOC, Pascal Context, COCO, ImageNet,
CIFAR-10, MINC, plain folders), which register themselves with the pipeline on import."""

# Registers the real-dataset adapters with the pipeline's source registry whenever this package
# is imported (``from train.data import pipeline`` included). Last, so pipeline can import first.
from train.data import sources as _sources  # noqa: E402,F401
