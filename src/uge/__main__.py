"""``python -m uge``: the same command line as the ``uge`` script."""
import sys

from .cli import main

sys.exit(main())
