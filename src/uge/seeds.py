"""Every seed a protection run draws, derived from the run's one seed in one place: a named stream per purpose.

A protector is given one ``seed`` (``protect(data, seed=...)``, ``uge protect --seed``, a benchmark's ``seed``);
everything random in the run is drawn from :func:`derive` (an integer seed for ``torch`` or a network's init)
or :func:`sequence` (a seed sequence for ``numpy.random.default_rng``) with the purpose's name, so that a
published set's seeds can be read off its manifest (:func:`table` of the manifest's ``seed``).

The arithmetic of each stream is the one the project used before the streams were named, so sets published
before and after are the same bytes. (Two numpy streams share values: the generator's epoch-1 and epoch-2
draws repeat ``partition`` and ``diagnostics``; kept for that reason.)
"""
from __future__ import annotations

from typing import Callable

VERSION = 1  # bump when a stream's arithmetic changes (published sets then differ)

# name -> (what it seeds, f(seed, *index) -> int)
STREAMS: dict[str, tuple[str, Callable[..., int]]] = {
    "trajectory": ("authorized network k's recorded run, data order j (L_gm, L_ud's θT)",
                   lambda s, k=0, j=0: s + k + 7919 * j),
    "teacher": ("authorized network k trained with the whole recipe (L_ud's 'trained' teacher)", lambda s, k=0: s + k),
    "encoder": ("the offline feature encoder's init and training", lambda s: s + 10_000),
    "hacker": ("L_ud's random hacker network", lambda s: s + 20_000),
    "probe": ("the diagnostics' network from another init", lambda s: s + 30_000),
    "generator": ("the generator's init", lambda s: s),
    "generator_epoch": ("torch draws of generator epoch e", lambda s, e: s + 1_000_003 * (e + 1)),
    "delta_batch": ("torch draws of δ's batch b in round r", lambda s, b, r=0: s + b + 100_003 * r),
    "reference": ("keyed: the reference authorized network's training", lambda s: s + 7919),
    "em_round": ("EM/REM: the source network's training in round r", lambda s, r: s * 100_003 + r),
    "noise": ("a baseline's noise, patterns, filters or PGD start", lambda s: s),
    "repeat": ("a benchmark's repeat r: training seeds and hacker inits", lambda s, r: s + 1000 * r),
    "surrogate": ("NTGA: the finite surrogate network's init (kernel='empirical')", lambda s: s + 40_000),
}

# name -> f(seed, *index) -> a numpy seed sequence
SEQUENCES: dict[str, tuple[str, Callable[..., list[int]]]] = {
    "partition": ("the generator's fixed batch partition", lambda s: [s, 1]),
    "diagnostics": ("the fixed batch the diagnostics are measured on", lambda s: [s, 2]),
    "generator_epoch": ("numpy draws of generator epoch e (checkpoints)", lambda s, e: [s, e]),
    "delta_batch": ("numpy draws of δ's batch b in round r (checkpoints)", lambda s, b, r=0: [s, r, b]),
    "ntga_blocks": ("NTGA: the partition into blocks and each block's held-out subset",
                    lambda s: [s, 0x4E544741]),  # "NTGA" in ASCII: a word no other stream draws
}


def derive(seed: int, stream: str, *index: int) -> int:
    """The integer seed of ``stream`` (a key of :data:`STREAMS`) at ``index`` for a run seeded with ``seed``
    (modulo 2^63, which torch takes: a key's 62-bit seed, :func:`uge.sealing.key_seed`, times a stream's factor
    would not fit; every smaller seed's streams are unchanged)."""
    return STREAMS[stream][1](seed, *index) % 2 ** 63


def sequence(seed: int, stream: str, *index: int) -> list[int]:
    """The numpy seed sequence of ``stream`` (a key of :data:`SEQUENCES`) at ``index``."""
    return SEQUENCES[stream][1](seed, *index)


SECRET = "secret: derived from the sealing key"  # a manifest's seed when the key chose it


def table(seed: int | None) -> dict:
    """What a manifest records: the run's seed, this module's version and the index-free streams' values; for a
    seed derived from the sealing key (``None``), only that it was (the seed would give the perturbation away)."""
    if seed is None:
        return {"seed": SECRET, "version": VERSION}
    fixed = {name: f(seed) for name, (_, f) in STREAMS.items()
             if f.__code__.co_argcount - len(f.__defaults__ or ()) == 1}  # streams with no index to give
    return {"seed": seed, "version": VERSION, "streams": fixed}
