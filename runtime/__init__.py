"""Torch-free inference on exported VFPT artifacts (onnxruntime), with the model's own preprocessing.

Runs on edge devices: imports numpy, PIL and onnxruntime only -- never torch or timm.
"""
from .preprocess import IMAGE_EXTENSIONS, Preprocess, find_images, load_image

__all__ = ["IMAGE_EXTENSIONS", "Preprocess", "find_images", "load_image"]
