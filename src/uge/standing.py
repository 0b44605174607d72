"""The default protection's measured standing, which ``uge protect`` prints: written by scripts/readme_results.py
from the committed records of battery-cpu (do not edit by hand)."""

STANDING = {
    'method': 'grating',
    'run': 'results/battery-cpu',
    'network': 'resnetc20',
    'key_holder': 61.7,
    'clean_key_holder': 61.7,
    'clean': 56.9,
    'plain': 23.5,
    'worst': 41.2,
    'by': 'blockdct:k=192,ratio=0.95,zero=1',
    'fraction': 0.67,
    'attacks': 8,
}
