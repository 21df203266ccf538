"""Backbones, segmentation models and DeepTEN (PyTorch-Encoding's model zoo), and the model registry."""
from jaxenc.models.registry import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "register_model"]
