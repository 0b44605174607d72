"""Ungeneralizable Examples (Ye & Wang, CVPR 2024): the ``uge`` protector and its L_fd-only variant ``fd``.

Algorithm 1, one part per module:

    workdir     the work folder of one run (checkpoints to resume from) and the authorized networks'
                trajectories θ0..θT, read from it or recorded into it
    losses      L_gm (Eq. 6), L_fd (Eqs. 7–9) and L_ud (Eq. 11) as functions of networks, logits and features
    features/   L_fd's feature spaces: CLIP (the paper's) and the trained-encoder offline fallback
    objective   L_all (Eq. 4) and the frozen pieces it is built from (UGEObjective, CleanGradientCache)
    loop        the one resumable optimisation loop (seeds per unit, checkpoint after each) that both
                parametrizations run, each a small strategy (loop.Parametrization)
    generator   the generator G (supplement Table 4), its training on L_all, and the images it protects
    delta       the per-sample parametrization: δ of every image optimised directly on L_all (PGD)
    protector   protect() and the registered protectors ``uge`` (UGEProtector) and ``fd`` (FDProtector)

What the baselines use too stays outside: the PGD loop (uge.pgd), the training loop with trajectory
recording and the distillation loss (uge.training), and the settings, :class:`~uge.config.ProtectConfig`,
which live in the torch-free config layer (uge.config) because the command line's parser reads their fields
without importing torch.
"""
from .generator import Generator, generate, recalibrate_batchnorm
from .objective import CleanGradientCache, UGEObjective, _objective  # noqa: F401  (_objective: tests build it)
from .protector import TITLE, FDProtector, UGEProtector, protect
from .workdir import _Workdir  # noqa: F401  (tests open a work folder)

__all__ = ["TITLE", "CleanGradientCache", "FDProtector", "Generator", "UGEObjective", "UGEProtector", "generate",
           "protect", "recalibrate_batchnorm"]
