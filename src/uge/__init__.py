"""uge — Ungeneralizable Examples (Ye & Wang, CVPR 2024): publish an image data set that only an
authorized network (a fixed architecture and fixed initial weights θ0) can learn from.

The Python API mirrors the ``uge`` command line::

    from uge import load_splits, ProtectConfig, protect, publish, verify
    train, test = load_splits("digits")
    result = protect(train, ProtectConfig())
    publish(result, train, "protected/")
    verify("protected/", original=train).raise_if_failed()
"""
__version__ = "0.1.0"

from .config import AuthorizedSpec, ProtectConfig  # noqa: E402
from .data import ImageDataset, load_dataset, load_splits, save_npz  # noqa: E402
from .errors import ConfigError, DataError, UGEError, VerificationError  # noqa: E402
from .evaluate import HackerSpec, evaluate_published, evaluate_set, format_table  # noqa: E402
from .models import Generator, create_model, list_models  # noqa: E402
from .protect import Protection, protect  # noqa: E402
from .protectors import build_protector, list_protectors  # noqa: E402
from .publish import Published, publish, read_published, verify  # noqa: E402
from .training import AdversarialTask, DistillTask, Recipe, SupervisedTask, accuracy, train  # noqa: E402

__all__ = [
    "AdversarialTask", "AuthorizedSpec", "ConfigError", "DataError", "DistillTask", "Generator", "HackerSpec",
    "ImageDataset", "ProtectConfig", "Protection", "Published", "Recipe", "SupervisedTask", "UGEError",
    "VerificationError",
    "accuracy", "build_protector", "create_model", "evaluate_published", "evaluate_set", "format_table",
    "list_models", "list_protectors",
    "load_dataset", "load_splits", "protect", "publish", "read_published", "save_npz", "train", "verify",
]
