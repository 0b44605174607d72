"""The hacker's countermeasures: tricks applied when training on protected data.

Selected by text, ``NAME[:key=value[,key=value]]`` joined by ``+`` — e.g. ``jpeg:quality=10``,
``grayscale+cutout:size=8``, ``adv:eps=4,steps=5`` — and parsed by :func:`parse_countermeasures` into
objects of three kinds:

========== =========================================================================================
kind       where it acts
========== =========================================================================================
input      once, on the training images (uint8 in, uint8 out, labels untouched): ``jpeg``,
           ``grayscale`` (also on the test images), ``blur``
batch      on every training batch inside :func:`uge.training.train`, after crop and flip:
           ``cutout``, ``mixup``, ``cutmix`` (soft targets), ``ueraser``
task       around the training task: ``adv`` (PGD adversarial training)
model      on the hacker's network, knowing the authorized ones: ``copy-input`` (keyed protection),
           ``probe`` (only the linear head learns)
========== =========================================================================================

Adaptive input transforms estimate the perturbation from the published set's own statistics (the hacker
knows the method, not the key; :mod:`uge.countermeasures.adaptive`): ``pca`` (excess colour or patch
directions against clean images from elsewhere), ``classmean`` and ``orthogonal`` (the orthogonal
projection attack).

:func:`describe_countermeasures` lists every parameter with its range and default. Two UGE-specific
hackers are not countermeasures but settings of the evaluation: a start from θ0 plus relative noise
(:func:`perturb_init`; hacker spec ``ARCH:MODE:theta0+SIGMA``) and the authorized network trained with
another recipe (the ``recipe`` argument of :func:`uge.evaluate.evaluate_published` / ``uge evaluate
--epochs --lr --batch-size --no-flip --no-crop``, plus ``authorized_countermeasures`` for augmentation).

Example::

    from uge.countermeasures import parse_countermeasures, transform_data, make_batch_augment, wrap_task
    cms = parse_countermeasures("jpeg:quality=10+mixup:alpha=1")
    data = transform_data(cms, train_set)
    train(model, data, recipe, task=wrap_task(cms, SupervisedTask()),
          batch_augment=make_batch_augment(cms, data.num_classes))
"""
from . import adaptive, adversarial, augment, inputs  # noqa: F401  (register the built-in countermeasures)
from .init import perturb_init
from .registry import (KINDS, SYNTAX, BatchAugment, Countermeasure, InputTransform, ModelAdapter, Param,
                       TaskWrapper, adapt_model, canonical_countermeasures, countermeasure_slug,
                       describe_countermeasures, format_countermeasures, get_countermeasure, list_countermeasures,
                       make_batch_augment, parse_countermeasures, register_countermeasure, soft_targets,
                       transform_data, wrap_task)

__all__ = [
    "KINDS", "SYNTAX", "BatchAugment", "Countermeasure", "InputTransform", "ModelAdapter", "Param",
    "TaskWrapper", "adapt_model", "canonical_countermeasures", "countermeasure_slug", "describe_countermeasures",
    "format_countermeasures", "get_countermeasure", "list_countermeasures", "make_batch_augment",
    "parse_countermeasures", "perturb_init", "register_countermeasure", "soft_targets", "transform_data", "wrap_task",
]
