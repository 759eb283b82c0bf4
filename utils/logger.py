"""Logging to the console and to a run's log file."""
from __future__ import annotations

import logging
import os
import sys


def setup_logger(name: str, log_file: str | os.PathLike | None = None, rank: int = 0,
                 level: int = logging.INFO, console: bool = True) -> logging.Logger:
    """A logger writing to stdout (rank 0 only, unless ``console`` is False) and, when given,
    to ``log_file`` (appended). Handlers it had before are closed and replaced."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    if console:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(fmt)
        logger.addHandler(stream)
    if log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger
