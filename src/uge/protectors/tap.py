"""Targeted adversarial poisoning (TAP): Fowl et al., "Adversarial Examples Make Strong Poisons",
NeurIPS 2021."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..models import list_models
from ..params import budget, param
from ..pgd import cell_means, dct_band, pgd, uniform_start
from ..result import Protection
from ..training import Recipe, accuracy, autocast, train
from ..training import augment as crop_flip
from ..utils import resolve_device
from .base import NoiseBand, PretrainedSource, Protector, add_noise, band_cell, image_result, register_protector
from .noise import ISS_GRADS, content_cross, delta_moment, power_matcher, set_chunks, soft_iss, soft_jpeg


def block_means(data: ImageDataset) -> ImageDataset:
    """``data`` with each image's 8×8 blocks replaced by their means, rounded to 8 bits: what the blanket removal
    (``blockdct`` with every AC coefficient zeroed) leaves of a clean set."""
    return _filtered(data, lambda x: cell_means(x, 8))


def _filtered(data: ImageDataset, view: Callable[[torch.Tensor], torch.Tensor]) -> ImageDataset:
    """``data`` through ``view`` (float (N, C, H, W) on the 8-bit scale in and out), rounded to 8 bits."""
    x = view(data.tensors()[0].float()).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ImageDataset(x, data.labels, list(data.classes))


def low_pass(x: torch.Tensor, band: int) -> torch.Tensor:
    """``x`` (N, C, H, W) with every 8×8-block DCT coefficient (v, u), v + u > ``band``, of JPEG's grid zeroed (the
    remainder that 8 does not tile kept): what the 1 % block-DCT comparison leaves of a set whose noise adds power at
    the fine frequencies."""
    out = x.clone()
    h, w = x.shape[-2] // 8 * 8, x.shape[-1] // 8 * 8
    out[..., :h, :w] = dct_band(x, band)[..., :h, :w]
    return out


def low_passed(data: ImageDataset, band: int) -> ImageDataset:
    """``data`` through :func:`low_pass`, rounded to 8 bits."""
    return _filtered(data, lambda x: low_pass(x, band))


VIEWS = ("draw", "vote", "sum")


def _unit_mean(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` scaled to a mean magnitude of 1 per image (an all-zero image's stays zero)."""
    scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True)
    return grad / scale.clamp_min(torch.finfo(grad.dtype).tiny)


def _quality(low: int, high: int | None) -> int:
    """One view's JPEG quality: ``low``, or with ``high`` drawn uniformly from low..high (torch's RNG)."""
    return low if high is None else int(torch.randint(low, high + 1, ()))


@register_protector
@dataclass
class TargetedAdversarialPoisoning(NoiseBand, PretrainedSource, Protector):
    """Class-targeted adversarial examples of a clean-trained source network, published with the true labels.

    Each image x of class y gets δ (‖δ‖∞ ≤ ρ) that makes the source network predict the class
    t = (y + ``shift``) mod K — a fixed permutation of the classes — by ``steps`` PGD steps *minimizing*
    CE(f(x + δ), t). The perturbations carry features of the wrong class that networks trained on the data
    pick up instead of the image content. Paper (CIFAR-10, ResNet-18 source): ρ = 8/255, 250 steps,
    differentiable augmentation in every step. Here ``augment`` applies the training loop's random crop and
    flip (differentiable in the image) to x + δ at every step; the step size defaults to 2.5ρ/steps
    (Madry et al.'s rule), as the paper's own is not restated here. ``init`` and ``probe``
    (:class:`PretrainedSource`): the source is a linear probe trained on fixed pretrained features; ``iss``: the
    expectation over transformations includes ISS, the attack that undoes TAP, ``jpeg`` colour JPEG, ``blanket``
    the 8×8 block means that the blanket removal keeps (``source_blanket``: against a source trained on those
    means), ``scratch`` the plain images against a second source from random init, ``scratch_jpeg`` their colour
    JPEG against it, and ``lowpass`` their low block-DCT frequencies against a source trained on such; ``band``
    confines the noise to low block-DCT frequencies and ``matched`` shrinks the content so the published set's
    block-DCT power is the clean set's (ours; not in the paper).

    Example: ``build_protector("tap", arch="cnn", epochs=5, steps=50).protect(train)``.
    """

    name = "tap"
    title = "Targeted adversarial poisoning (Fowl et al., NeurIPS 2021)"
    rho: float = budget(8 / 255)
    arch: str = param("resnetc20", choices=list_models)  # source network, trained on the clean data
    epochs: int = param(10, low=1)  # source training with the default recipe (SGD, crop + flip) at this length
    batch_size: int = param(128, low=2)
    lr: float = param(0.1, low=0, low_open=True)
    steps: int = param(250, low=1)  # paper: 250
    step_size: float | None = param(None, low=0, low_open=True)  # None: 2.5 ρ / steps
    # target class t = (y + shift) mod K
    shift: int = param(1, low=1, note="(and not a multiple of the number of classes)")
    augment: bool = True
    cell: int = band_cell()  # the noise's subspace (NoiseBand; not in the papers)
    luminance: bool = False
    band: int | None = param(None, low=0, high=14)  # only 8×8-block DCT coefficients v + u ≤ band (NoiseBand)
    # shrink every image's content so that the published set's block-DCT power equals the clean set's (the
    # noise's own power measured): the excess-power comparisons find nothing where the noise has less power than
    # natural images (with band), and what they find elsewhere stays visible
    matched: bool = False
    init: str | None = None  # the source's θ0 from a safetensors file instead of a random init
    probe: bool = False  # train only the source's linear head
    # the chance that a PGD step sees x + δ through ISS (grayscale + JPEG at iss_quality, differentiable: soft_iss)
    iss: float = param(0.0, low=0, high=1)
    iss_quality: int = param(10, low=1, high=100)
    iss_grad: str = param("ste", choices=ISS_GRADS)  # JPEG rounding's gradient in the views: straight-through or cubic
    # the chance that a PGD step sees x + δ through colour JPEG at jpeg_quality (differentiable: soft_jpeg)
    jpeg: float = param(0.0, low=0, high=1)
    jpeg_quality: int = param(10, low=1, high=100)
    # set: every ISS (JPEG) view draws its quality uniformly from iss_quality..iss_quality_max (jpeg_quality..
    # jpeg_quality_max) afresh, the family of squeezings rather than one member
    iss_quality_max: int | None = param(None, low=1, high=100)
    jpeg_quality_max: int | None = param(None, low=1, high=100)
    # the chance that a PGD step sees only x + δ's 8×8 block means (what the blanket block-DCT removal keeps)
    blanket: float = param(0.0, low=0, high=1)
    # the blanket steps attack a second source trained on the clean images' 8×8 block means (a model of the hacker
    # who trains after the blanket removal) instead of the one trained on full images; with blanket = 1 the only one
    source_blanket: bool = False
    # the chance that a step sees x + δ plainly and attacks a second full-image source, trained from random init with
    # every layer (not `init`'s features): a model of the hacker without pretrained features (needs init)
    scratch: float = param(0.0, low=0, high=1)
    # the chance that a step sees colour JPEG of x + δ (jpeg_quality..jpeg_quality_max) against that source from random
    # init: the squeezings' fit for the hacker without pretrained features (needs init)
    scratch_jpeg: float = param(0.0, low=0, high=1)
    # the chance that a step sees x + δ with every block-DCT coefficient v + u > lowpass_band zeroed (what the 1 %
    # block-DCT comparison leaves of a noise with power at the fine frequencies), against a source trained from init
    # on the clean images so filtered (a model of the hacker who trains after that comparison)
    lowpass: float = param(0.0, low=0, high=1)
    lowpass_band: int = param(3, low=0, high=13)
    # how the steps use the views: "draw" one view per step (chances iss, jpeg, blanket, scratch, scratch_jpeg, lowpass,
    # else plain), "vote": every step takes each view's gradient and moves each pixel by the sign of their
    # chance-weighted signs, or "sum": by the sign of their chance-weighted sum, each view's gradient scaled to a mean
    # magnitude of 1 per image (expectation over the views with the sources' scales evened out: where one view's
    # gradient is large it outweighs the others, which a vote of signs never lets it do)
    views: str = param("draw", choices=VIEWS)

    def _other_chances(self) -> tuple[float, ...]:
        """The chances of the views besides the plain one, in :meth:`step_views`'s order."""
        return (self.iss, self.jpeg, self.blanket, self.scratch, self.scratch_jpeg, self.lowpass)

    def cross_checks(self):
        if not self.iss and self.iss_quality != 10:  # not silently ignored
            return [f"iss_quality is used only with iss > 0, got iss_quality={self.iss_quality} and iss=0"]
        jpeg = self.jpeg + self.scratch_jpeg  # the views that use jpeg_quality
        if not jpeg and self.jpeg_quality != 10:
            return [f"jpeg_quality is used only with jpeg or scratch_jpeg > 0, got jpeg_quality={self.jpeg_quality} "
                    "and neither"]
        for view, used, low, high in (("iss", self.iss, self.iss_quality, self.iss_quality_max),
                                      ("jpeg", jpeg, self.jpeg_quality, self.jpeg_quality_max)):
            if high is not None and not used:
                return [f"{view}_quality_max is used only with {view} > 0, got {view}_quality_max={high} and {view}=0"]
            if high is not None and high < low:
                return [f"{view}_quality_max must be at least {view}_quality ({low}), got {high}"]
        if not (self.iss or jpeg) and self.iss_grad != "ste":
            return [f"iss_grad is used only with iss, jpeg or scratch_jpeg > 0, got iss_grad={self.iss_grad!r} and "
                    "none"]
        others = self._other_chances()
        if sum(others) > 1:
            return ["iss + jpeg + blanket + scratch + scratch_jpeg + lowpass is the chance of a step that is not the "
                    f"plain one, at most 1; got {' + '.join(map(str, others))}"]
        if self.views != "draw" and not any(others):
            return [f"views={self.views!r} needs a view besides the plain one (iss, jpeg, blanket, scratch, "
                    "scratch_jpeg or lowpass > 0)"]
        for name in ("scratch", "scratch_jpeg"):
            if getattr(self, name) and self.init is None:  # the main source is then from random init already
                return [f"{name} needs init (a pretrained main source), got init=None"]
        if self.band is not None and self.cell != 1:
            return [f"band needs cell = 1 (a band of each 8x8 block's frequencies), got cell={self.cell}"]
        if not self.lowpass and self.lowpass_band != 3:  # not silently ignored
            return [f"lowpass_band is used only with lowpass > 0, got lowpass_band={self.lowpass_band} and lowpass=0"]
        if self.source_blanket and not self.blanket:  # its source would never be attacked
            return ["source_blanket needs blanket > 0 (the steps that attack its source), got blanket=0"]
        return []

    def targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return (labels + self.shift) % num_classes

    def step_views(self) -> list[tuple[float, Callable[[torch.Tensor], torch.Tensor], str]]:
        """(chance, the view of x + δ, the source it attacks: a :meth:`source_kinds` name) of each view a PGD step may
        take: the plain images, what ISS leaves of them, what colour JPEG leaves of them, their 8×8 block means, the
        plain images and their colour JPEG against the source from random init, their low-passed block DCT."""
        plain = 1.0
        for chance in self._other_chances():  # subtracted one by one, as the published sets were made
            plain -= chance

        def jpeg(u):
            return soft_jpeg(u, _quality(self.jpeg_quality, self.jpeg_quality_max), self.iss_grad)
        return [(plain, lambda u: u, "full"),
                (self.iss, lambda u: soft_iss(u, _quality(self.iss_quality, self.iss_quality_max), self.iss_grad),
                 "full"),
                (self.jpeg, jpeg, "full"),
                (self.blanket, self._source_view("blanket"), "blanket" if self.source_blanket else "full"),
                (self.scratch, lambda u: u, "scratch"),
                (self.scratch_jpeg, jpeg, "scratch"),
                (self.lowpass, self._source_view("lowpass"), "lowpass")]

    def squeeze(self, x_u: torch.Tensor) -> tuple[torch.Tensor, str]:
        """(x + δ for one PGD step, or with chance ``iss`` (torch's RNG) what ISS leaves of it, with chance ``jpeg``
        what colour JPEG leaves of it, with chance ``blanket`` its 8×8 block means; the source that step attacks)."""
        if not any(self._other_chances()):
            return x_u, "full"
        r, edge = torch.rand(()), 0.0
        for chance, see, source in self.step_views()[1:]:
            edge += chance
            if r < edge:
                return see(x_u), source
        return x_u, "full"

    def source_kinds(self) -> list[str]:
        """The sources the PGD steps attack: "full" (on full images, from ``init`` with ``probe`` as set), unless
        every step sees block means and has its own; "blanket" (on the block means) with ``source_blanket``;
        "scratch" (full images, from random init) with ``scratch`` or ``scratch_jpeg``; "lowpass" (the low-passed
        images, from ``init``) with ``lowpass``."""
        return ([] if self.source_blanket and self.blanket == 1 else ["full"]) + (
            ["blanket"] if self.source_blanket else []) + (["scratch"] if self.scratch or self.scratch_jpeg else []) + (
            ["lowpass"] if self.lowpass else [])

    def source_network(self, data: ImageDataset, *, device="auto", seed: int = 0, progress: bool = False,
                       kind: str = "full") -> nn.Module:
        """The clean-trained source network of :meth:`source_kinds`'s ``kind`` that :meth:`protect` attacks (equal
        seeds: equal networks)."""
        model = self.source_model(data, seed, device, pretrained=kind != "scratch")
        data = self._seen_by(kind, data)
        recipe = Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        return train(model, data, recipe, device=device, seed=seed, progress=progress, desc="TAP source")

    def protect(self, data: ImageDataset, *, device="auto", work_dir: str | Path | None = None,
                progress: bool = True, seed: int = 0) -> Protection:
        if (self.jpeg or self.scratch_jpeg) and data.channels != 3:
            raise ConfigError(f"protector 'tap': jpeg or scratch_jpeg > 0 is a colour JPEG view and needs RGB images, "
                              f"got {data.channels} channel(s); use iss for grayscale images")
        if self.shift % data.num_classes == 0:
            raise ConfigError(f"protector 'tap': parameter shift={self.shift} maps every class to itself for "
                              f"{data.num_classes} classes; use a shift that is not a multiple of it")
        device, start = resolve_device(device), time.perf_counter()
        kinds = self.source_kinds()
        sources = {k: self.source_network(data, device=device, seed=seed, progress=progress,
                                          kind=k).requires_grad_(False) for k in kinds}
        trained = time.perf_counter()
        images, labels = data.tensors(device)
        delta = uniform_start(images.shape, self.rho, seed, device)
        if (subspace := self.subspace()) is not None:
            delta = subspace(delta)
        step = self.step_size or 2.5 * self.rho / self.steps
        view = crop_flip if self.augment else (lambda x: x)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # the augmentation draws
            for i in tqdm(range(0, len(images), self.batch_size), desc="TAP noise", disable=None if progress else True,
                          leave=False):
                x = images[i:i + self.batch_size].float() / 255
                t = self.targets(labels[i:i + len(x)], data.num_classes)
                delta[i:i + len(x)] = pgd(lambda x_u, t=t: self.loss(sources, view, x_u, t), x,
                                          delta[i:i + len(x)], self.rho, self.steps, step, minimize=True,
                                          subspace=subspace)
        published = self._matched(data, delta.cpu()) if self.matched else add_noise(data, delta, self.rho)
        # how often each source predicts the target class on what is published, as it sees it: the attack's success
        target = self.targets(published.labels, data.num_classes)
        success = {("" if k == kinds[0] else f"{k}_") + "source_at_target": round(accuracy(model, ImageDataset(
            self._seen_by(k, published).images, target, data.classes)), 2)
            for k, model in sources.items()}
        return image_result(self, data, published.images, seed, history=[success],
                            seconds={"source": trained - start, "noise": time.perf_counter() - trained})

    def _source_view(self, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What the source of that kind sees of an image (float (N, C, H, W)); None: the image itself."""
        return {"blanket": lambda u: cell_means(u, 8), "lowpass": lambda u: low_pass(u, self.lowpass_band)}.get(kind)

    def _seen_by(self, kind: str, data: ImageDataset) -> ImageDataset:
        """``data`` as the source of that kind sees it (and is trained on), rounded to 8 bits."""
        view = self._source_view(kind)
        return data if view is None else _filtered(data, view)

    def _matched(self, data: ImageDataset, delta: torch.Tensor) -> ImageDataset:
        """``data`` + ``delta`` with each image's content shrunk so that the set's block-DCT power is the clean
        set's (:func:`uge.protectors.noise.power_matcher`), rounded within the budget."""
        def delta_of(start: int, k: int) -> torch.Tensor:
            return delta[start:start + k]

        content = power_matcher(data, delta_moment(delta), delta_of, self.rho, cross=content_cross(data, delta))
        images = torch.cat([x.permute(0, 2, 3, 1) for x in set_chunks(data, (delta_of, content, self.rho))])
        return ImageDataset(images.numpy(), data.labels.copy(), list(data.classes))

    def loss(self, sources: dict[str, nn.Module], view, x_u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One PGD step's loss: the cross-entropy towards ``t`` of the source for the step's view of x + δ; with
        ``views = "vote"`` a surrogate whose gradient is the chance-weighted sum of every view's gradient sign, with
        ``"sum"`` of every view's gradient scaled to a mean magnitude of 1 per image."""
        def ce(seen: torch.Tensor, source: str) -> torch.Tensor:  # against the source for that view
            # bf16 on a GPU, as in training: the step uses the gradient's sign ("sum": a per-image scaled sum)
            with autocast(seen.device):
                logits = sources[source](view(seen))
            return F.cross_entropy(logits.float(), t)

        if self.views == "draw":
            return ce(*self.squeeze(x_u))
        vote = torch.zeros_like(x_u)
        for chance, see, source in self.step_views():
            if chance > 1e-9:  # (1 − the other views' chances may round to a hair above 0)
                grad = torch.autograd.grad(ce(see(x_u), source), x_u)[0]
                vote += chance * (grad.sign() if self.views == "vote" else _unit_mean(grad))
        return (x_u * vote).sum()  # its gradient with respect to δ is the vote
