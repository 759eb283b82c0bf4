"""Interactive person search: a web page and JSON API over a trained run (``python -m thi.app``).

A thin layer over THI's step functions (``thi.pipeline``, ``thi.rerank``, ``thi.scoring``) and
the run directory: ``engine`` (query kinds, sessions, one THI step per answer), ``attributes``
(the 15 VQA questions as form fields), ``loader`` (the engine from a run), ``paths`` (image
paths against ``--root``), ``access`` (Host, origin, token and body-size checks), ``server``
(FastAPI routes) and ``page.html``.
"""
from __future__ import annotations

from .engine import BadRequest, NotFound, SearchEngine, Session

__all__ = ["BadRequest", "NotFound", "SearchEngine", "Session", "create_app"]


def create_app(engine: SearchEngine, **access):
    """The FastAPI application over ``engine`` (imports FastAPI only when called); ``access``:
    ``host``, ``token``, ``allow_hosts`` or ``policy`` (see ``server.create_app``)."""
    from .server import create_app as _create

    return _create(engine, **access)
