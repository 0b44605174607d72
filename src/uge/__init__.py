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

# Public names, imported on first use (PEP 562): ``import uge`` and ``uge --help`` do not load torch.
_WHERE = {
    "AuthorizedSpec": "config", "ProtectConfig": "config", "Recipe": "config",
    "ImageDataset": "data", "load_dataset": "data", "load_splits": "data", "save_npz": "data",
    "ConfigError": "errors", "DataError": "errors", "UGEError": "errors", "VerificationError": "errors",
    "HackerSpec": "config", "evaluate_published": "evaluate", "evaluate_set": "evaluate", "format_table": "evaluate",
    "Generator": "protectors.uge", "create_model": "models", "list_models": "models",
    "Protection": "result", "protect": "protectors.uge",
    "build_protector": "protectors", "list_protectors": "protectors",
    "Published": "published", "publish": "published", "read_published": "published", "verify": "published",
    "AdversarialTask": "training", "DistillTask": "training", "SupervisedTask": "training", "accuracy": "training",
    "train": "training",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'uge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "AdversarialTask", "AuthorizedSpec", "ConfigError", "DataError", "DistillTask", "Generator", "HackerSpec",
    "ImageDataset", "ProtectConfig", "Protection", "Published", "Recipe", "SupervisedTask", "UGEError",
    "VerificationError",
    "accuracy", "build_protector", "create_model", "evaluate_published", "evaluate_set", "format_table",
    "list_models", "list_protectors",
    "load_dataset", "load_splits", "protect", "publish", "read_published", "save_npz", "train", "verify",
]
