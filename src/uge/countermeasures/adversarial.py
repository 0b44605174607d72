"""Adversarial training as a countermeasure: ``adv:eps=E,steps=S,step=A`` (E and A in 8-bit levels)."""
from __future__ import annotations

from typing import ClassVar

from ..training import AdversarialTask
from .registry import Param, TaskWrapper, register_countermeasure


@register_countermeasure
class Adversarial(TaskWrapper):
    """PGD L∞ adversarial training (Madry et al. 2018) around the hacker's task; see
    :class:`uge.training.AdversarialTask`. ``eps`` and ``step`` are in 8-bit levels (eps=8 is 8/255);
    the default step is Madry et al.'s 2.5·eps/steps."""

    name = "adv"
    summary = "PGD L-inf adversarial training (eps and step in 8-bit levels, i.e. /255)."
    params: ClassVar[dict[str, Param]] = {
        "eps": Param(float, 8.0, 0, 64, low_open=True, help="L-inf radius in 8-bit levels (8 or 8/255)", levels=True),
        "steps": Param(int, 5, 1, 100, help="PGD steps per training step"),
        "step": Param(float, None, 0, 64, low_open=True, help="PGD step size in levels; auto = 2.5*eps/steps",
                      levels=True),
    }

    def resolve(self, values: dict) -> dict:
        if values["step"] is None:
            values["step"] = round(2.5 * values["eps"] / values["steps"], 6)
        return values

    def wrap(self, task) -> AdversarialTask:
        return AdversarialTask(task, eps=self.eps / 255, steps=self.steps, step=self.step / 255)
