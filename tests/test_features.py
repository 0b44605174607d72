"""Feature spaces for L_fd: a tiny random OpenCLIP model, the trained-encoder fallback, the registry."""
import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from uge.data.dataset import ImageDataset
from uge.errors import ConfigError
from uge.protectors.uge.features import FEATURE_SPACES, ClipSpace, EncoderSpace, FeatureSpace, build_feature_space

try:  # uge.models imports the zoo, which another engineer may still be writing
    from uge.models.registry import Classifier
except ImportError:  # pragma: no cover - same contract as registry.Classifier
    class Classifier(nn.Module):
        def __init__(self, body, in_channels):
            super().__init__()
            self.register_buffer("mean", torch.full((1, in_channels, 1, 1), 0.5), persistent=False)
            self.register_buffer("std", torch.full((1, in_channels, 1, 1), 0.25), persistent=False)
            self.body = body

        def forward_features(self, x):
            return self.body.forward_features((x - self.mean) / self.std)

        def forward(self, x):
            return self.body.head(self.forward_features(x))

CLASSES = ["airplane", "sweet_pepper", "maple_tree"]


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return ClipSpace(model, open_clip.get_tokenizer("ViT-B-32"), CLASSES, name="clip:tiny")


def test_clip_image_features_unit_norm_and_differentiable(tiny_clip):
    assert isinstance(tiny_clip, FeatureSpace) and tiny_clip.name == "clip:tiny"
    x = torch.rand(4, 3, 24, 24, requires_grad=True)  # resized to 32x32 inside
    f = tiny_clip.image_features(x)
    assert f.shape == (4, 32)
    assert torch.allclose(f.norm(dim=1), torch.ones(4), atol=1e-5)
    f[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in tiny_clip.parameters())
    assert not tiny_clip.training
    tiny_clip.train()
    assert not tiny_clip.training and not tiny_clip.model.training


def test_clip_grayscale_equals_repeated_rgb(tiny_clip):
    g = torch.rand(2, 1, 32, 32)
    f = tiny_clip.image_features(g)
    assert f.shape == (2, 32)
    assert torch.allclose(f, tiny_clip.image_features(g.repeat(1, 3, 1, 1)), atol=1e-6)


def test_clip_class_features_constant_unit_norm(tiny_clip):
    t = tiny_clip.class_features()
    assert t.shape == (len(CLASSES), 32) and not t.requires_grad
    assert torch.allclose(t.norm(dim=1), torch.ones(len(CLASSES)), atol=1e-5)
    tiny_clip.image_features(torch.rand(1, 3, 32, 32))
    assert torch.equal(t, tiny_clip.class_features())
    assert tiny_clip.num_classes == 3 and tiny_clip.dim == 32


def test_clip_prompts(tiny_clip):
    assert tiny_clip.prompts == ["A photo of a airplane", "A photo of a sweet pepper", "A photo of a maple tree"]
    assert all(p.startswith("A photo of a") and "_" not in p for p in tiny_clip.prompts)


def test_clip_missing_checkpoint_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="pretrained CLIP weights"):
        build_feature_space("clip", classes=CLASSES, model_name="ViT-B-32", pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="pretrained CLIP weights"):
        build_feature_space("clip", classes=CLASSES)  # no weights given at all


def test_clip_unknown_architecture_is_config_error(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="pretrained CLIP weights"):
        ClipSpace.from_pretrained(CLASSES, model_name="no-such-arch", pretrained=str(ckpt))


class TinyBody(nn.Module):
    """Deterministic: features = (per-channel mean, per-channel max, 1) of the normalized image."""

    def __init__(self, num_classes=3, in_channels=3):
        super().__init__()
        d = 2 * in_channels + 1
        self.scale = nn.Parameter(torch.ones(1))
        self.head = nn.Linear(d, num_classes)
        self.bn = nn.BatchNorm1d(d)  # must run in eval mode for the prototypes

    def forward_features(self, x):
        f = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3)), torch.ones(len(x), 1)], dim=1)
        return self.bn(f * self.scale)


def _tiny_set(n=10, channels=3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8, channels), dtype=np.uint8)
    labels = np.arange(n) % 3
    return ImageDataset(images, labels, CLASSES)


def test_encoder_class_features_are_normalized_class_means():
    ds = _tiny_set()
    model = Classifier(TinyBody(), 3)
    space = EncoderSpace(model, ds, batch_size=4)  # several batches
    x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        model.eval()
        f = nn.functional.normalize(model.forward_features(x), dim=1)
    expected = torch.stack([nn.functional.normalize(f[ds.labels == c].mean(0), dim=0) for c in range(3)])
    assert torch.allclose(space.class_features(), expected, atol=1e-6)
    assert space.class_features().shape == (3, 7) and not space.class_features().requires_grad
    assert space.name == "encoder:tinybody"


def test_encoder_frozen_eval_differentiable_and_leaves_model_alone():
    ds = _tiny_set()
    model = Classifier(TinyBody(), 3).train()
    space = EncoderSpace(model, ds)
    assert all(not p.requires_grad for p in space.parameters()) and not space.training
    assert all(p.requires_grad for p in model.parameters()) and model.training  # caller's copy untouched
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    f = space.image_features(x)
    assert f.shape == (5, 7)
    assert torch.allclose(f.norm(dim=1), torch.ones(5), atol=1e-5)
    f[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_encoder_grayscale_and_builder_train_fn():
    ds = _tiny_set(channels=1)
    calls = []

    def train_fn(model, train_set):
        calls.append(len(train_set))
        return model

    space = build_feature_space("encoder", classes=CLASSES, train_set=ds, model=Classifier(TinyBody(in_channels=1), 1),
                                train_fn=train_fn)
    assert calls == [10] and isinstance(space, EncoderSpace)
    assert space.image_features(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ConfigError):
        build_feature_space("encoder", classes=CLASSES, train_set=None, model=Classifier(TinyBody(in_channels=1), 1))
    with pytest.raises(ConfigError):
        build_feature_space("encoder", classes=["a", "b", "c"], train_set=ds, model=Classifier(TinyBody(in_channels=1), 1))


def test_the_config_layer_names_exactly_the_registered_feature_spaces():
    """ProtectConfig validates feature_space without torch (a fast start), so it keeps the names; they must be
    the registry's."""
    from uge import config

    assert set(config.FEATURE_SPACES) == set(FEATURE_SPACES)


def test_unknown_kind_is_config_error():
    assert {"clip", "encoder"} <= set(FEATURE_SPACES)
    with pytest.raises(ConfigError, match="clip, encoder"):
        build_feature_space("nope", classes=CLASSES)
