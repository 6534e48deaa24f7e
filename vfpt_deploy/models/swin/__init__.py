"""The Swin family: timm SwinTransformer (v1) backbones."""
