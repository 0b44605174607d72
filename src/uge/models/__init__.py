"""Networks: the classifier zoo (a registry). UGE's perturbation generator lives with UGE (uge.protectors.uge)."""
from .registry import Classifier, create_model, known_model, list_models, register_model
from . import zoo  # noqa: F401  (registers the zoo)

__all__ = ["Classifier", "create_model", "known_model", "list_models", "register_model"]
