"""Torch-free inference on exported VFPT artifacts (onnxruntime), with the model's own preprocessing.

Runs on edge devices: imports numpy, PIL and onnxruntime only -- never torch or timm.
"""
from .onnx_runner import OnnxPredictor, RuntimeSetupError, make_session, open_predictor
from .predictor import Prediction, Predictor
from .preprocess import IMAGE_EXTENSIONS, ImageError, Preprocess, find_images, load_image

__all__ = ["IMAGE_EXTENSIONS", "ImageError", "OnnxPredictor", "Prediction", "Predictor", "Preprocess",
           "RuntimeSetupError", "find_images", "load_image", "make_session", "open_predictor"]
