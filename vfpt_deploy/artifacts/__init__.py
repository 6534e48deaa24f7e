"""What the pipeline writes and reads: run.pt checkpoints, the ONNX metadata and engine sidecar schema,
golden sets, the logits gate, file handling. Torch-free to import (the runtime reads these); only
checkpoint.py needs PyTorch."""
