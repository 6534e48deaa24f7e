"""Exporters: folded VFPT models to ONNX, ONNX to TensorRT engines."""
