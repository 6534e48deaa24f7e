"""The ViT family: timm VisionTransformer backbones (supervised, MAE, MoCo-v3)."""
