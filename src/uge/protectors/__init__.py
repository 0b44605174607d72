"""Protectors: UGE and the unlearnable-example baselines of the paper's Table 3, one call shape, by name.

=========  ==========================================================================  ==============
name       method                                                                      budget
=========  ==========================================================================  ==============
uge        Ungeneralizable Examples (Ye & Wang, CVPR 2024)                             L∞ ρ = 0.04
fd         UGE's L_fd alone ("Ours (L_fd)", Table 3)                                   L∞ 8/255
random     uniform random noise (control)                                              L∞ 8/255
patch      class-wise tiled ±ρ patches (positive control of the selectivity bench)     L∞ 8/255
keyed      a tiled shortcut along a colour direction the authorized network is blind to   L∞ ρ = 0.04
em         error-minimizing noise (Huang et al., ICLR 2021)                            L∞ 8/255
tap        targeted adversarial poisoning (Fowl et al., NeurIPS 2021)                  L∞ 8/255
rem        robust error-minimizing noise (Fu et al., ICLR 2022)                        L∞ 8/255
ntga       neural tangent generalization attack (Yuan & Wu, ICML 2021)                 L∞ 8/255
cuda       class-wise convolution filters (Sadasivan et al., CVPR 2023)                none (PSNR/SSIM)
=========  ==========================================================================  ==============

    from uge.protectors import build_protector
    result = build_protector("em", arch="cnn").protect(train, seed=0)
    uge.publish(result, train, "em-set")
"""
from . import cuda, em, keyed, noise, ntga, rem, tap, uge  # noqa: F401  (register the protectors)
from .base import Protector, build_protector, list_protectors, protector_class, register_protector

__all__ = ["Protector", "build_protector", "list_protectors", "protector_class", "register_protector"]
