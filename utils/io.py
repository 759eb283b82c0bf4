"""Atomic file writes: a crash never leaves a half-written file behind.

A write goes to a hidden temp file (``.tmp-*``) in the target's folder and is renamed over the
target when complete. A process killed mid-write leaves that temp file behind; the next start of a
run removes them (``utils.run_dir.clean_temp_files``). A full disk is reported with the file and
the space the write needed (``DiskFullError``), never torch's bare ``unexpected pos``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import IO, Any, Callable

import numpy as np

TEMP_PREFIX = ".tmp-"
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(OSError):
    """No space left while writing ``path``; says how much the write needed and what was free."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not a torch file)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _CountingSink:
    """A write-only stream that only counts bytes (measures a write that did not fit)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode("utf-8"))
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


def _is_disk_full(err: BaseException | None) -> bool:
    """True when ``err`` or an exception in its chain is ENOSPC/EDQUOT (torch wraps it in a
    RuntimeError whose own message is only ``unexpected pos``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _disk_full_error(path: str, folder: str, write: Callable[[IO], None], err: BaseException) -> DiskFullError:
    sink = _CountingSink()
    try:
        write(sink)
        needed = f"{_human(sink.size)} ({sink.size} bytes)"
    except Exception:  # noqa: BLE001 - the size is a courtesy; the error must still name the file
        needed = "an unknown amount"
    try:
        free = _human(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    return DiskFullError(errno.ENOSPC,
                         f"No space left on device writing {path}: the file needs {needed}, {free} free "
                         f"in {folder}. Free space (or point output_dir/--out elsewhere) and rerun; "
                         f"the previous version of the file, if any, is unchanged")


def _atomic(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Run ``write(file_object)`` into a temp file next to ``path``, then rename it over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    os.close(fd)
    try:
        try:
            with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
                write(f)
        except BaseException as err:
            if os.path.exists(tmp):
                os.remove(tmp)  # free the space before measuring what was needed
            if _is_disk_full(err):
                raise _disk_full_error(path, folder, write, err) from err
            raise
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    _atomic(path, lambda f: np.save(f, array))


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    _atomic(path, lambda f: np.savez(f, **arrays))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    # A file object: torch's zip writer rejects some temp names.
    _atomic(path, lambda f: torch.save(obj, f))


def torch_load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``torch.load(path, map_location="cpu")`` whose errors name the file and the fix."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, **kwargs)
    except (RuntimeError, EOFError, OSError, ValueError, __import__("pickle").UnpicklingError) as err:
        size = os.path.getsize(path)
        raise CheckpointReadError(
            f"cannot read checkpoint {path} ({_human(size)}): {type(err).__name__}: {err}. The file is "
            "truncated or corrupt (e.g. copied while being written) or not a torch checkpoint; restore or "
            "re-copy it, or delete it (a run then restarts training from scratch)") from err
