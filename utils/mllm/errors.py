"""The MLLM client's error (its own module: the backends, the image helpers and the base client
all raise it)."""
from __future__ import annotations

from utils.errors import ProjectError


class MLLMError(ProjectError, RuntimeError):
    """An MLLM backend cannot be reached, loaded or used; the message says what and where.

    A backend whose batch failed part-way may attach ``partial`` ({position in the batch:
    answer}) so that :meth:`BaseClient.generate` caches the answers that did arrive.
    """

    def __init__(self, message: str, partial: "dict[int, str] | None" = None):
        super().__init__(message)
        self.partial = dict(partial or {})
