"""``python -m thi`` (see thi/cli.py)."""
import sys

from thi.cli import main

sys.exit(main())
