"""The web layer: FastAPI routes over a ``SearchEngine`` (no search logic here).

    GET  /                      the page (page.html)
    GET  /api/info              gallery size, dataset, query kinds, the 15 attribute fields
    GET  /api/example/{i}       test query i of the dataset (text and identity), for demos
    GET  /api/image/{g}         gallery image g
    POST /api/search            multipart form: kind, text, attr_<key> (or attributes as JSON),
                                image (file), image_weight, target_pid, top_k
                                -> session id and the ranked results
    POST /api/feedback          JSON {session, gallery_index, answer: yes|no|mllm}
                                -> the refined text and the new ranking
    GET  /api/session/{id}      the session as JSON (``python -m thi --queries FILE`` reads it)

Bad input gets 400 (or 404 for an unknown session, image or example; 413 for an image over
the size limit; 422 for a malformed JSON body) with a message in ``detail``; an MLLM that cannot
be reached gets 503.
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel

from .attributes import FIELDS
from .engine import KINDS, BadRequest, NotFound, SearchEngine

from PIL import Image, UnidentifiedImageError
from utils.mllm import MLLMError

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_TOP_K = 100
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


class Feedback(BaseModel):
    session: str
    gallery_index: Optional[int] = None
    answer: str


def _decode_image(data: bytes, name: str):
    if not data:
        raise BadRequest(f"the uploaded file {name!r} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"the uploaded image is {len(data)} bytes; at most "
                                 f"{MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"the uploaded file {name!r} is not an image PIL can read "
                         f"(JPEG, PNG, ...): {exc}") from None


def _int_field(form, name: str, low: int, high: int) -> Optional[int]:
    value = str(form.get(name) or "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}], got {number}")
    return number


def create_app(engine: SearchEngine) -> FastAPI:
    """The FastAPI application serving ``engine``."""
    app = FastAPI(title="ICL interactive person search", docs_url="/api/docs",
                  redoc_url=None, openapi_url="/api/openapi.json")
    app.state.engine = engine

    @app.exception_handler(BadRequest)
    async def _bad(_, exc: BadRequest):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(NotFound)
    async def _missing(_, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(MLLMError)
    async def _mllm(_, exc: MLLMError):
        return JSONResponse({"detail": f"the MLLM failed: {exc}"}, status_code=503)

    def view(session, step: Optional[dict] = None, k: Optional[int] = None) -> dict:
        with session.lock:
            rows = engine.results(session, k)
            target = engine.target_view(session)
            for row in rows:
                row["image_url"] = f"/api/image/{row['gallery_index']}"
            return {"session": session.id, "kind": session.kind, "query_text": session.text,
                    "refined_text": session.refined or None, "round": len(session.rounds),
                    "image_weight": session.image_weight, "target": target,
                    "gallery_size": engine.num_gallery, "results": rows, "step": step,
                    "history": [dict(r) for r in session.rounds]}

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    @app.get("/api/info")
    def info():
        return {**engine.info, "gallery_size": engine.num_gallery, "kinds": list(KINDS),
                "lam": engine.lam, "image_weight": engine.default_image_weight,
                "top_k": engine.top_k, "examples": len(engine.examples),
                "has_mllm": engine.client is not None, "has_identities": engine.g_pids is not None,
                "image_queries": engine.score_images is not None,
                "attributes": [{"key": f.key, "question": f.question,
                                "placeholder": f.placeholder} for f in FIELDS]}

    @app.get("/api/example/{index}")
    def example(index: int):
        if not 0 <= index < len(engine.examples):
            raise NotFound(f"test query {index} is out of range [0, {len(engine.examples)})")
        text, pid = engine.examples[index]
        return {"index": index, "text": text, "pid": pid}

    @app.get("/api/image/{index}")
    def image(index: int):
        g = engine.check_index(index)
        path = engine.image_paths[g]
        if not os.path.isfile(path):
            raise NotFound(f"gallery image {g} ({path}) is not on this machine")
        return FileResponse(path)

    @app.post("/api/search")
    async def search(request: Request):
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith(("multipart/form-data",
                                        "application/x-www-form-urlencoded")):
            raise BadRequest("send the query as a form (multipart/form-data), e.g. "
                             "curl -F kind=text -F text='a woman in a red coat' URL/api/search")
        form = await request.form()
        kind = str(form.get("kind") or "").strip()
        upload = form.get("image")
        pil = None
        if upload is not None and not isinstance(upload, str):
            data = await upload.read()
            if data or kind in ("image", "text_image"):
                pil = _decode_image(data, upload.filename or "image")
        if not kind:  # infer it: what was sent
            text_given = bool(str(form.get("text") or "").strip())
            kind = ("text_image" if text_given else "image") if pil is not None else "text"
        attributes = {}
        if form.get("attributes"):
            try:
                attributes = json.loads(str(form.get("attributes")))
            except ValueError as exc:
                raise BadRequest(f"attributes must be a JSON object: {exc}") from None
            if not isinstance(attributes, dict):
                raise BadRequest("attributes must be a JSON object {field: answer}")
        for key in form.keys():
            if key.startswith("attr_"):
                attributes[key[len("attr_"):]] = str(form.get(key) or "")
        weight = str(form.get("image_weight") or "").strip() or None
        target = _int_field(form, "target_pid", -2**62, 2**62)
        top_k = _int_field(form, "top_k", 1, MAX_TOP_K)
        session = await run_in_threadpool(
            engine.search, kind, text=str(form.get("text") or ""), attributes=attributes,
            image=pil, image_weight=weight, target_pid=target)
        return view(session, k=top_k)

    @app.post("/api/feedback")
    async def feedback(body: Feedback):
        step = await run_in_threadpool(engine.feedback, body.session, body.answer,
                                       body.gallery_index)
        return view(engine.sessions.get(body.session), step)

    @app.get("/api/session/{session_id}")
    def export(session_id: str):
        session = engine.sessions.get(session_id)
        with session.lock:
            return engine.export(session)

    return app
