"""Alias of ``python -m repro`` (the paper's tables and figures): ``python scripts/reproduce.py table1 --world mini``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repro.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
