"""CLIP feature space (the paper's choice): OpenCLIP image encoder and "A photo of a <class>" prompts.

No weights are ever downloaded on purpose: pass a local checkpoint file as ``pretrained``.  A pretrained
tag (e.g. ``"openai"``) is only passed through to OpenCLIP as given; it works where the hub cache holds it.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ConfigError
from .base import FeatureSpace, register_feature_space, to_rgb

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PROMPT = "A photo of a {}"  # Algorithm 1, line 4
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

_NEED_WEIGHTS = (
    "the 'clip' feature space needs pretrained CLIP weights: download an OpenCLIP checkpoint for {model} "
    "elsewhere and pass its local file as pretrained=/path/to/checkpoint.pt (with model_name={model}), "
    "or use the 'encoder' feature space (offline fallback)")


def class_prompts(classes: Sequence[str], template: str = DEFAULT_PROMPT) -> list[str]:
    """One prompt per class; underscores in class names become spaces ("sweet_pepper" -> "sweet pepper")."""
    return [template.format(str(c).replace("_", " ").strip()) for c in classes]


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class ClipSpace(FeatureSpace):
    """Frozen OpenCLIP model: resize + CLIP normalization inside, features from ``encode_image``.

    Args:
        model: an OpenCLIP model (``encode_image``, ``encode_text``, ``visual.image_size``).
        tokenizer: the matching tokenizer, ``tokenizer(list[str]) -> LongTensor``.
        classes: class names; the text features are encoded once, here.
        name: description for logs and manifests.
        device: where the space lives.
        prompt: template with one ``{}`` for the class name.
        mean, std: image normalization; default the model's own (``visual.image_mean``) or CLIP's.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, classes: Sequence[str], *,
                 name: str = "clip:custom", device="cpu", prompt: str = DEFAULT_PROMPT,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        import open_clip

        if len(classes) < 2:
            raise ConfigError(f"need at least 2 classes, got {len(classes)}")
        self.name = name
        self.model = model.to(device)
        self.classes = [str(c) for c in classes]
        self.prompts = class_prompts(self.classes, prompt)
        self.image_size = _pair(model.visual.image_size)
        if mean is None:
            mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        if std is None:
            std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1),
                             persistent=False)
        self._freeze()
        with torch.no_grad():
            tokens = tokenizer(self.prompts).to(device)
            text = torch.cat([self.model.encode_text(tokens[i:i + 256]) for i in range(0, len(tokens), 256)])
            text = F.normalize(text.float(), dim=-1)
        self.register_buffer("text_features", text, persistent=False)

    @classmethod
    def from_pretrained(cls, classes: Sequence[str], *, model_name: str = DEFAULT_MODEL,
                        pretrained: str | None = None, device="cpu", cache_dir: str | None = None,
                        prompt: str = DEFAULT_PROMPT) -> "ClipSpace":
        """Build ``model_name`` with weights from ``pretrained`` (a local file, or a tag already cached)."""
        import open_clip

        if not pretrained:
            raise ConfigError(_NEED_WEIGHTS.format(model=model_name))
        pretrained = os.path.expanduser(str(pretrained))
        looks_like_path = os.sep in pretrained or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)
        if looks_like_path and not os.path.isfile(pretrained):
            raise ConfigError(f"CLIP checkpoint file not found: {pretrained}; " + _NEED_WEIGHTS.format(model=model_name))
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except Exception as e:  # open_clip raises RuntimeError/ValueError/OSError/unpickling errors
            raise ConfigError(f"could not load CLIP {model_name!r} with pretrained={pretrained!r} "
                              f"({type(e).__name__}: {e}); " + _NEED_WEIGHTS.format(model=model_name)) from e
        return cls(model, tokenizer, classes, name=f"clip:{model_name}:{pretrained}", device=device, prompt=prompt)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        x = to_rgb(x)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=False)
        x = (x - self.mean) / self.std
        dtype = next(self.model.visual.parameters()).dtype
        return F.normalize(self.model.encode_image(x.to(dtype)).float(), dim=-1)

    def class_features(self) -> torch.Tensor:
        return self.text_features


@register_feature_space("clip")
def build_clip(classes, train_set=None, device="cpu", *, model_name: str = DEFAULT_MODEL,
               pretrained: str | None = None, cache_dir: str | None = None,
               prompt: str = DEFAULT_PROMPT) -> ClipSpace:
    """Options: ``model_name`` (OpenCLIP architecture), ``pretrained`` (local checkpoint file or cached tag)."""
    return ClipSpace.from_pretrained(classes, model_name=model_name, pretrained=pretrained, device=device,
                                     cache_dir=cache_dir, prompt=prompt)
