"""The project's user-facing errors and the one way an entry point reports them.

An error a user causes by what they hand the project (a config value, a dataset file, a full
disk, a run folder) carries a message that names the file or key and says what to do. Entry
points (``train.py``, ``test.py``, ``python -m thi|rda|repro``) print such a message alone, as
``PROG: error: MESSAGE``, and exit with status 2; a traceback is kept for bugs.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

EXIT_USER_ERROR = 2


class ProjectError(Exception):
    """An error whose message alone tells the user what is wrong and what to do."""


class InputFileError(ProjectError, ValueError):
    """An input file (annotation, config, dataset image, a stage's state) cannot be read or holds
    something the project must not use; the message names the file (and record) and the fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types an entry point reports without a traceback (the run-directory and
    MLLM errors are ProjectErrors too)."""
    return (ProjectError,)


F = TypeVar("F", bound=Callable[..., int])


def cli_errors(prog: str) -> Callable[[F], F]:
    """Decorate an entry point's ``main``: a user error becomes ``PROG: error: MESSAGE`` on
    stderr and exit status 2 instead of a traceback."""

    def wrap(main: F) -> F:
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except user_errors() as err:
                # An OSError (DiskFullError) would print as "[Errno 28] ...": the message alone.
                message = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                print(f"{prog}: error: {message.strip()}", file=sys.stderr)
                return EXIT_USER_ERROR

        return guarded  # type: ignore[return-value]

    return wrap
