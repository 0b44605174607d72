"""UGE's one optimisation loop, shared by its two parametrizations (a generator G(x), a per-sample δ).

A parametrization is a small strategy (:class:`Parametrization`): the state it checkpoints, one unit of work (a
generator epoch, a δ batch) and what happens before each round (δ's on-trajectory rounds). :func:`optimize` runs
the units of every round in order, seeds each unit from its own streams (:mod:`uge.seeds`: a numpy generator and
torch's global seed) and saves the strategy's state after every unit, atomically, in the work folder; a rerun
resumes after the last unit saved and publishes the same bytes as a run never stopped. Under torchrun every
rank runs every unit (a parametrization shards its own batches) and rank 0 saves.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ... import distributed
from ...seeds import derive, sequence
from ...utils import atomic_file

log = logging.getLogger("uge")


class Parametrization:
    """One parametrization of the perturbation, as :func:`optimize` drives it.

    ``name`` names its checkpoint (``<name>.pt``) and its progress bar; ``stream`` is the seed stream of a unit
    (:data:`uge.seeds.STREAMS` and :data:`uge.seeds.SEQUENCES`), indexed by :meth:`seed_index`; ``unit`` says
    what a unit is, in words; ``rounds`` is the number of passes over the units.
    """

    name: str
    stream: str
    unit: str
    rounds: int = 1

    def units(self) -> int:
        """Units in each round."""
        raise NotImplementedError

    def seed_index(self, r: int, u: int) -> tuple[int, ...]:
        """The index of unit ``u`` of round ``r`` in ``stream``."""
        raise NotImplementedError

    def label(self, r: int) -> str:
        return self.name

    def begin_round(self, r: int) -> None:
        """Called before round ``r``, also for a round a resumed run has finished already (so that what the
        round added to the objective is added again; what it trained is read back from the work folder)."""

    def reset_round(self, r: int) -> None:
        """Called before a round that starts afresh after the first (a resumed round keeps what was saved)."""

    def step(self, r: int, u: int, rng: np.random.Generator) -> dict | None:
        """Run unit ``u`` of round ``r`` with ``rng`` (torch's global seed is set too); returns the numbers to
        show on the progress bar, or None."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint holds (tensors, lists, numbers: ``torch.load(weights_only=True)`` reads it)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def optimize(p: Parametrization, checkpoint: Path, seed: int, device, progress: bool = True) -> None:
    """Run every unit of every round of ``p`` that ``checkpoint`` does not hold yet, saving after each one.

    Unit ``u`` of round ``r`` draws from ``numpy.random.default_rng(sequence(seed, p.stream, *index))`` (given to
    :meth:`Parametrization.step`) and from torch's global generator seeded with ``derive(seed, p.stream, *index)``,
    ``index = p.seed_index(r, u)``: the draws of a unit do not depend on whether the run was interrupted before it.
    """
    start_round, done = 0, 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        p.load_state_dict(state)
        # a generator checkpoint written before this loop named its position "epoch" and had one round
        start_round, done = state.get("round", 0), state["done"] if "done" in state else state["epoch"]
        log.info("%s resumed after %s %d of %d%s", p.name, p.unit, done, p.units(),
                 f" in round {start_round + 1} of {p.rounds}" if p.rounds > 1 else "")
    for r in range(p.rounds):
        p.begin_round(r)
        if r < start_round:
            continue
        if r > start_round:
            done = 0
            p.reset_round(r)
        n = p.units()
        bar = tqdm(range(done, n), desc=p.label(r), disable=None if progress and distributed.is_main() else True,
                   leave=False, initial=done, total=n)
        for u in bar:
            index = p.seed_index(r, u)
            rng = np.random.default_rng(sequence(seed, p.stream, *index))
            torch.manual_seed(derive(seed, p.stream, *index))
            shown = p.step(r, u, rng)
            if shown:
                bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            distributed.on_main(_save, checkpoint, {**p.state_dict(), "round": r, "done": u + 1})


def _save(checkpoint: Path, state: dict) -> None:
    with atomic_file(checkpoint) as tmp:  # a kill mid-save must not corrupt the resume point
        torch.save(state, tmp)
