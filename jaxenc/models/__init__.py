"""Backbones, segmentation models and DeepTEN (PyTorch-Encoding's model zoo), the model registry
and the pretrained-weight store."""

from jaxenc.models import deepten, heads, resnet, segmentation, wideresnet, xception  # noqa: F401  (importing registers the models)
from jaxenc.models.deepten import DeepTen
from jaxenc.models.initialize import init_variables
from jaxenc.models.registry import get_model, list_models, register_model
from jaxenc.models.resnet import BasicBlock, Bottleneck, ResNet
from jaxenc.models.segmentation import (
    ATTEN,
    FCFPN,
    FCN,
    PSP,
    BaseNet,
    DANet,
    DeepLabV3,
    EncNet,
    UperNet,
    get_segmentation_model,
)
from jaxenc.models.store import (
    PretrainedEntry,
    load_checkpoint,
    load_pretrained,
    pretrained_model_list,
    purge,
    register_pretrained,
    save_checkpoint,
    tree_differences,
)
from jaxenc.models.weights import load_weights, resolve_checkpoint
from jaxenc.models.wideresnet import WideResNet
from jaxenc.models.xception import Xception65, Xception71

__all__ = [
    "init_variables",
    "ATTEN",
    "BaseNet",
    "DANet",
    "DeepLabV3",
    "DeepTen",
    "EncNet",
    "FCFPN",
    "FCN",
    "PSP",
    "UperNet",
    "WideResNet",
    "Xception65",
    "Xception71",
    "get_segmentation_model",
    "BasicBlock",
    "Bottleneck",
    "PretrainedEntry",
    "ResNet",
    "get_model",
    "list_models",
    "load_checkpoint",
    "load_pretrained",
    "load_weights",
    "pretrained_model_list",
    "purge",
    "register_model",
    "register_pretrained",
    "resolve_checkpoint",
    "save_checkpoint",
    "tree_differences",
]
