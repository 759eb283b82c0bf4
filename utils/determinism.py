"""Thread pinning and a machine description, for numbers that are quoted or tested.

CPU results are bit-identical run to run for a fixed seed and thread count, but torch's
intra-op thread count changes how float sums are split, so 1 vs 2 threads drift apart over a
training run (demo: R5/R10 moved by 7-10 points). Whatever quotes or asserts a learned number
pins the count with ``pin_threads`` and reports it with ``machine_description``.

The default is one thread: the same numbers on any machine whatever its core count, and on a
shared or small machine the tiny models lose little (their kernels are too small to split well).
"""
from __future__ import annotations

import contextlib
import os
import platform
import random
from typing import Iterator

# numpy and torch are imported inside the functions on purpose: their thread pools read
# OMP/MKL/OPENBLAS_NUM_THREADS when first imported, and an entry point that imports this module
# first must be able to pin those before either library starts.

DEFAULT_THREADS = 1


def pin_threads(threads: int = DEFAULT_THREADS) -> int:
    """Pin torch's intra-op threads (and the BLAS/OpenMP variables, for libraries initialised
    later) to ``threads``; returns the previous torch thread count."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


@contextlib.contextmanager
def pinned_threads(threads: int = DEFAULT_THREADS) -> Iterator[int]:
    """``pin_threads`` for a block; the previous count and environment are restored after it."""
    import torch

    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    previous = pin_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def machine_description() -> str:
    """CPU model and logical CPU count, e.g. 'AMD EPYC 7B13, 2 logical CPUs'."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the trainer: ``seed + rank``)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global generator's state (saved in last.pth: a resume continues the same draws)."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
