"""Backbones and segmentation models (issue 6)."""
