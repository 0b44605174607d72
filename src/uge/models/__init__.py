"""Networks: the classifier zoo (a registry) and the perturbation generator."""
from .registry import Classifier, create_model, known_model, list_models, register_model
from . import zoo  # noqa: F401  (registers the zoo)
from .generator import Generator

__all__ = ["Classifier", "Generator", "create_model", "known_model", "list_models", "register_model"]
