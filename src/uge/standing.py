"""The default protection's measured standing, which ``uge protect`` prints: written by scripts/readme_results.py
from the committed records of battery-cpu (do not edit by hand)."""

STANDING = {
    'method': 'grating',
    'run': 'results/battery-cpu',
    'network': 'resnetc20',
    'key_holder': 61.7,
    'clean_key_holder': 61.7,
    'clean': 56.9,
    'plain': 20.1,
    'worst': 48.8,
    'by': 'knownbasis:bases=10,dct=0',
    'fraction': 0.83,
    'attacks': 8,
    'lowest_other': 0.79,
    'protections': 10,
}
