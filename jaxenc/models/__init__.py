"""Backbones, segmentation models and DeepTEN (PyTorch-Encoding's model zoo), the model registry
and the pretrained-weight store."""
from jaxenc.models.registry import get_model, list_models, register_model
from jaxenc.models import resnet  # noqa: E402,F401  (registers the backbones)
from jaxenc.models.resnet import BasicBlock, Bottleneck, ResNet
from jaxenc.models.store import (
    PretrainedEntry,
    load_checkpoint,
    load_pretrained,
    pretrained_model_list,
    purge,
    register_pretrained,
    save_checkpoint,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PretrainedEntry",
    "ResNet",
    "get_model",
    "list_models",
    "load_checkpoint",
    "load_pretrained",
    "pretrained_model_list",
    "purge",
    "register_model",
    "register_pretrained",
    "save_checkpoint",
]
