"""Feature spaces for L_fd: CLIP (the paper's) and a trained-encoder offline fallback."""
from .base import FEATURE_SPACES, FeatureSpace, build_feature_space, register_feature_space
from .clip import ClipSpace
from .encoder import EncoderSpace

__all__ = ["FEATURE_SPACES", "ClipSpace", "EncoderSpace", "FeatureSpace", "build_feature_space",
           "register_feature_space"]
