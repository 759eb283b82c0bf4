"""``python -m rda generate|sft ...``: see :mod:`rda.cli`."""
import sys

from .cli import main

sys.exit(main())
