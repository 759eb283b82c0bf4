"""Atomic file writes: a crash never leaves a half-written file behind.

A write goes to a hidden temp file (``.tmp-*``) in the target's folder and is renamed over the
target when complete. A process killed mid-write leaves that temp file behind; the next start of a
run removes them (``utils.run_dir.clean_temp_files``). A full disk is reported with the file and
the space the write needed (``DiskFullError``), never torch's bare ``unexpected pos``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch

from utils.errors import InputFileError, ProjectError

TEMP_PREFIX = ".tmp-"
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(ProjectError, OSError):
    """No space left while writing ``path``; says how much the write needed and what was free."""


class CheckpointReadError(ProjectError, RuntimeError):
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


# numpy's tofile() (np.save into a real file) reports a short fwrite without an errno.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def _is_disk_full(err: BaseException | None) -> bool:
    """True when ``err`` or an exception in its chain is ENOSPC/EDQUOT (torch wraps it in a
    RuntimeError whose own message is only ``unexpected pos``) or a short write (numpy's
    ``OSError: 64800 requested and 57312 written``: the disk filled during the write)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        if isinstance(err, OSError) and _SHORT_WRITE.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _disk_full_error(path: str, folder: str, write: Callable[[IO], None] | int, err: BaseException,
                     kept: str = "the previous version of the file, if any, is unchanged",
                     what: str = "the file") -> DiskFullError:
    """``write``: the write (run again into a counting sink to measure it) or its size in bytes."""
    if isinstance(write, int):
        size = write
    else:
        sink = _CountingSink()
        try:
            write(sink)
            size = sink.size
        except Exception:  # noqa: BLE001 - the size is a courtesy; the error must still name the file
            size = -1
    needed = f"{_human(size)} ({size} bytes)" if size >= 0 else "an unknown amount"
    try:
        free = _human(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    return DiskFullError(errno.ENOSPC,
                         f"No space left on device writing {path}: {what} needs {needed}, {free} free "
                         f"in {folder} ({type(err).__name__}: {err}). Free space (or point output_dir/--out "
                         f"elsewhere) and rerun; {kept}")


@contextlib.contextmanager
def disk_full_named(path: str | os.PathLike, size: int,
                    kept: str = "the lines written before are kept; a rerun resumes from them") -> Iterator[None]:
    """Around a non-atomic write of ``size`` bytes to ``path`` (an append to a log): a full
    disk or short write becomes a ``DiskFullError`` naming the file, not a bare ``Errno 28``."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        if not _is_disk_full(err):
            raise
        path = os.fspath(path)
        raise _disk_full_error(path, os.path.dirname(os.path.abspath(path)), size, err, kept, "the append") from err


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


# ---------------------------------------------------------------------- reading input files
ENCODING_FIX = ("re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8) or restore the "
                "original file")


def read_text(path: str | os.PathLike, fix: str = ENCODING_FIX) -> str:
    """A UTF-8 text file's content; bytes that are not UTF-8 raise ``InputFileError`` naming the
    file, the offset and line of the first bad byte, and ``fix``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputFileError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}, line {line}: "
            f"{err.reason}); {fix}") from err


def read_json(path: str | os.PathLike, fix: str = "restore or regenerate it") -> Any:
    """A JSON file's content; undecodable text or invalid JSON raise ``InputFileError`` naming
    the file and ``fix``."""
    path = os.fspath(path)
    text = read_text(path, fix=f"{ENCODING_FIX}; or {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{path}: not valid JSON ({err}); {fix}") from err


def check_utf8(text: str) -> str | None:
    """None when ``text`` can be written as UTF-8, else a description of the first character
    that cannot (a lone surrogate such as ``\\udcff``, which JSON escapes can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"holds {text[err.start]!r} at character {err.start}, which is not a Unicode character ({err.reason})"
    return None


# ---------------------------------------------------------------------- atomic writes
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(path, lambda f: f.write(text), mode="w")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks (checkpoints and downloads are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    _atomic(path, lambda f: np.save(f, array))


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    _atomic(path, lambda f: np.savez(f, **arrays))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    # A file object: torch's zip writer rejects some temp names.
    _atomic(path, lambda f: torch.save(obj, f))


def torch_load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``torch.load(path, map_location="cpu")`` whose errors name the file and the fix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, **kwargs)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        size = os.path.getsize(path)
        raise CheckpointReadError(
            f"cannot read checkpoint {path} ({_human(size)}): {type(err).__name__}: {err}. The file is "
            "truncated or corrupt (e.g. copied while being written) or not a torch checkpoint; restore or "
            "re-copy it, or delete it (a run then restarts training from scratch)") from err
