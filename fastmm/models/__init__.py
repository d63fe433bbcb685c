"""Complete models on fastmm ops: the unified (Janus-style) model, its config and the checkpoint converter."""

from fastmm.models.config import ImageGenConfig, UnifiedConfig, VisionConfig, VQConfig
from fastmm.models.unified import UnifiedModel

__all__ = ["UnifiedConfig", "VisionConfig", "ImageGenConfig", "VQConfig", "UnifiedModel"]
