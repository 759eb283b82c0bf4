"""The web layer: FastAPI routes over a ``SearchEngine`` (no search logic here).

    GET  /                      the page (page.html)
    GET  /api/info              gallery size, dataset, query kinds, the 15 attribute fields
    GET  /api/example/{i}       test query i of the dataset (text and identity), for demos
    GET  /api/image/{g}         gallery image g
    POST /api/search            a multipart form (kind, text, attr_<key> or attributes as JSON,
                                image as a file, image_weight, target_pid, top_k) or the same
                                fields as a JSON object (no image)
                                -> session id and the ranked results
    POST /api/feedback          JSON {session, gallery_index, answer: yes|no|mllm|undo, top_k}
                                -> the refined text and the new ranking
    GET  /api/results/{id}      the session's ranking again (?top_k=N: "show more")
    GET  /api/session/{id}      the session as JSON (``python -m thi --queries FILE`` reads it)
    GET  /api/docs              this list as a page (no external assets)

Bad input gets 400 (or 404 for an unknown session, image or example; 413 for an image or a
body over its limit; 422 for a malformed JSON body) with a message in ``detail``; an MLLM that
cannot be reached gets 503. ``access.Guard`` checks the Host, the origin of state-changing
requests, the token and the body size before any route runs.
"""
from __future__ import annotations

import html
import io
import json
import os
import re
import warnings
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .access import MAX_IMAGE_BYTES, TOKEN_COOKIE, AccessPolicy, Guard, plan_access
from .attributes import FIELDS
from .engine import KINDS, BadRequest, NotFound, SearchEngine

from PIL import Image
from utils.errors import InputFileError
from utils.images import to_rgb
from utils.mllm import MLLMError

# A person photo needs a few megapixels; 24 MP is a 6000x4000 camera frame. Decoding costs
# about 4 bytes per pixel (twice with the RGB conversion), so this caps one upload near 200 MB.
MAX_IMAGE_PIXELS = 24_000_000
MAX_TOP_K = 500
HISTORY_SHOWN = 20        # rounds a response carries (the export keeps all, at most --rounds)
MAX_ATTRIBUTES_CHARS = 8192
SEARCH_FIELDS = ("kind", "text", "attributes", "image_weight", "target_pid", "top_k")
INTEGER = re.compile(r"-?[0-9]{1,19}")
INDEX = re.compile(r"[0-9]{1,12}")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" '
           'height="16" rx="3" fill="#1f3a5f"/><circle cx="7" cy="7" r="4" fill="none" '
           'stroke="#fff" stroke-width="2"/><path d="M10 10l4 4" stroke="#fff" '
           'stroke-width="2"/></svg>')


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session: StrictStr = Field(max_length=64)
    gallery_index: Optional[StrictInt] = None
    answer: StrictStr = Field(max_length=16)
    top_k: Optional[StrictInt] = None


def _decode_image(data: bytes, name: str):
    """A PIL RGB image from upload bytes; the pixel count is checked from the header first."""
    if not data:
        raise BadRequest(f"the uploaded file {name[:100]!r} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"the uploaded image is {len(data)} bytes; at most "
                                 f"{MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():  # the size is checked right below, against our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
    except Image.DecompressionBombError:  # PIL's own refusal, above twice its limit
        raise HTTPException(413, f"the uploaded image has more than "
                                 f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (a person photo "
                                 f"needs a few)") from None
    except Exception:  # PIL raises many kinds on garbage; none of their texts helps a user
        raise BadRequest(f"the uploaded file {name[:100]!r} is not an image PIL can read "
                         f"(JPEG, PNG, ...)") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise HTTPException(413, f"the uploaded image is {width}x{height} = "
                                 f"{width * height / 1e6:.1f} megapixels; at most "
                                 f"{MAX_IMAGE_PIXELS / 1e6:.0f} (a person photo needs a few)")
    try:
        image.load()
    except Exception:
        raise BadRequest(f"the uploaded file {name[:100]!r} is a damaged or unsupported image "
                         f"(JPEG, PNG, ...)") from None
    try:  # the dataset loader's conversion: a 16-bit upload is scaled, not clipped to white
        return to_rgb(image, repr(name[:100]))
    except InputFileError as err:
        raise BadRequest(f"the uploaded file: {err}") from None


def _integer(name: str, value, low: int, high: int) -> Optional[int]:
    """An integer field: a JSON integer (not a bool) or a form string of ASCII digits."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and INTEGER.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {str(value)[:40]!r}")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _text(name: str, value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be text (a plain form field or a JSON string), got "
                         f"{'a file' if hasattr(value, 'filename') else type(value).__name__}")
    return value


def _attributes(value) -> dict:
    """``attributes``: a JSON object (or its text) mapping field names to short answers."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        if len(value) > MAX_ATTRIBUTES_CHARS:
            raise BadRequest(f"attributes is {len(value)} characters; at most "
                             f"{MAX_ATTRIBUTES_CHARS}")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"attributes must be a JSON object: {str(exc)[:80]}") from None
    if not isinstance(value, dict):
        raise BadRequest("attributes must be a JSON object {field: answer}")
    bad = [k for k, v in value.items() if not isinstance(v, str)]
    if bad:
        raise BadRequest(f"attributes must map each field to a text answer; "
                         f"{str(bad[0])[:40]!r} is not text")
    return dict(value)


async def _search_fields(request: Request) -> dict:
    """The search's fields from a form (the page, curl -F) or a JSON object (scripts)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the JSON body must be an object {kind, text, ...}")
        if "image" in body:
            raise BadRequest("send an image as a file: a multipart form with the field 'image' "
                             "(curl -F image=@photo.jpg); JSON carries text and attributes")
        unknown = sorted(set(body) - set(SEARCH_FIELDS))
        if unknown:
            raise BadRequest(f"unknown field {unknown[0][:40]!r}; valid: "
                             f"{', '.join(SEARCH_FIELDS)}")
        return {**body, "attributes": _attributes(body.get("attributes")), "image": None}
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise BadRequest("send the query as a form (multipart/form-data) or a JSON object, e.g. "
                         "curl -F kind=text -F text='a woman in a red coat' URL/api/search")
    form = await request.form(max_files=1, max_fields=64, max_part_size=64 * 1024)
    fields = {k: form.get(k) for k in SEARCH_FIELDS if k != "attributes"}
    attributes = _attributes(_text("attributes", form.get("attributes")))
    for key in form.keys():
        if key.startswith("attr_"):
            attributes[key[len("attr_"):]] = _text(key, form.get(key))
    fields["attributes"] = attributes
    upload = form.get("image")
    if isinstance(upload, str):
        raise BadRequest("image must be a file (curl -F image=@photo.jpg), not text")
    fields["image"] = upload
    return fields


def _validation_message(exc: RequestValidationError) -> str:
    """Pydantic's errors as one line, without echoing the (possibly huge) input."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def _bad(_, exc: BadRequest):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(NotFound)
    async def _missing(_, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(MLLMError)
    async def _mllm(_, exc: MLLMError):
        return JSONResponse({"detail": f"the MLLM failed: {exc}"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)


def _view(engine: SearchEngine, session, step: Optional[dict] = None,
          k: Optional[int] = None) -> dict:
    """What a response carries: the ranking, the target, the latest rounds (bounded)."""
    with session.lock:
        rows = engine.results(session, k)
        for row in rows:
            row["image_url"] = f"/api/image/{row['gallery_index']}"
        return {"session": session.id, "kind": session.kind, "query_text": session.text,
                "refined_text": session.refined or None, "round": len(session.rounds),
                "max_rounds": engine.max_rounds, "image_weight": session.image_weight,
                "target": engine.target_view(session), "gallery_size": engine.num_gallery,
                "anchors": engine.anchors_view(session), "rejected": len(session.rejected),
                "results": rows, "step": step,
                "history": [dict(r) for r in session.rounds[-HISTORY_SHOWN:]]}


def _index(value: str, what: str) -> int:
    if not INDEX.fullmatch(value):
        raise BadRequest(f"{what} must be a non-negative integer (digits only), got "
                         f"{value[:20]!r}")
    return int(value)


def _public_info(engine: SearchEngine) -> dict:
    info = dict(engine.info)
    info["run"] = engine.run_name
    source = str(info.get("gallery_source", ""))
    run = str(engine.info.get("run", ""))
    if os.path.isabs(source) and run and source.startswith(run + os.sep):
        # the checkpoint's evaluation inside the run: show it from the run's name
        info["gallery_source"] = os.path.join(engine.run_name or "", os.path.relpath(source, run))
    elif os.path.isabs(source):
        info["gallery_source"] = os.path.basename(source)
    return {**info, "gallery_size": engine.num_gallery, "kinds": list(KINDS),
            "lam": engine.lam, "image_weight": engine.default_image_weight,
            "top_k": engine.top_k, "max_top_k": MAX_TOP_K, "max_rounds": engine.max_rounds,
            "examples": len(engine.examples), "has_mllm": engine.client is not None,
            "has_identities": engine.g_pids is not None,
            "image_queries": engine.score_images is not None,
            "max_image_pixels": MAX_IMAGE_PIXELS, "max_image_bytes": MAX_IMAGE_BYTES,
            "attributes": [{"key": f.key, "question": f.question,
                            "placeholder": f.placeholder} for f in FIELDS]}


def _page_routes(app: FastAPI, engine: SearchEngine, policy: AccessPolicy) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(token: Optional[str] = None):
        with open(PAGE, encoding="utf-8") as f:
            response = HTMLResponse(f.read())
        if policy.token is not None and token:  # the Guard checked it: keep it as a cookie
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(FAVICON, media_type="image/svg+xml")

    @app.get("/api/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs():
        """The routes as a plain page: no script, no CDN (the page must work offline)."""
        rows = []
        for path, methods in app.openapi()["paths"].items():
            for method, op in methods.items():
                text = op.get("description") or op.get("summary") or ""
                rows.append(f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                            f"<td><pre>{html.escape(text)}</pre></td></tr>")
        head = html.escape(__doc__.split("\n\n")[0])
        return (f"<!doctype html><meta charset='utf-8'><title>API</title><h1>JSON API</h1>"
                f"<p>{head}</p><p>Machine-readable: <a href='/api/openapi.json'>"
                f"/api/openapi.json</a></p><table border=1 cellpadding=4>{''.join(rows)}</table>")

    @app.get("/api/info")
    def info():
        """The server's settings: gallery size, dataset, query kinds, attribute fields."""
        return _public_info(engine)

    @app.get("/api/example/{index}")
    def example(index: str):
        """Test query ``index`` of the dataset: its text and identity."""
        i = _index(index, "the example index")
        if not i < len(engine.examples):
            raise NotFound(f"test query {i} is out of range [0, {len(engine.examples)})")
        text, pid = engine.examples[i]
        return {"index": i, "text": text, "pid": pid}

    @app.get("/api/image/{index}")
    def image(index: str):
        """Gallery image ``index``."""
        g = engine.check_index(_index(index, "the gallery index"))
        path = engine.image_paths[g]
        if not os.path.isfile(path):
            raise NotFound(f"gallery image {g} ({engine.shown_path(g)}) is not under the data "
                           f"root on this machine (pass --root)")
        return FileResponse(path)


def _api_routes(app: FastAPI, engine: SearchEngine) -> None:
    @app.post("/api/search")
    async def search(request: Request):
        """A new search: a form (kind, text, attr_<field> or attributes, image file,
        image_weight, target_pid, top_k) or the same fields as JSON (no image)."""
        f = await _search_fields(request)
        kind = _text("kind", f.get("kind")).strip()
        text = _text("text", f.get("text"))
        upload, pil = f["image"], None
        if upload is not None:
            data = await upload.read(MAX_IMAGE_BYTES + 1)
            if data or kind in ("image", "text_image"):
                pil = await run_in_threadpool(_decode_image, data, upload.filename or "image")
        if not kind:  # infer it: what was sent
            kind = ("text_image" if text.strip() else "image") if pil is not None else "text"
        weight = f.get("image_weight")
        if isinstance(weight, bool) or hasattr(weight, "filename"):
            raise BadRequest("image_weight must be a number in [0, 1]")
        if isinstance(weight, str):
            weight = weight.strip() or None
        target = _integer("target_pid", f.get("target_pid"), -2**62, 2**62)
        top_k = _integer("top_k", f.get("top_k"), 1, MAX_TOP_K)
        session = await run_in_threadpool(
            engine.search, kind, text=text, attributes=f["attributes"], image=pil,
            image_weight=weight, target_pid=target)
        return _view(engine, session, k=top_k)

    @app.post("/api/feedback")
    async def feedback(body: Feedback):
        """One answer on a candidate: yes, no, mllm (the MLLM judges) or undo (a "no")."""
        top_k = _integer("top_k", body.top_k, 1, MAX_TOP_K)
        step = await run_in_threadpool(engine.feedback, body.session, body.answer,
                                       body.gallery_index)
        return _view(engine, engine.sessions.get(body.session), step, top_k)

    @app.get("/api/results/{session_id}")
    def results(session_id: str, top_k: Optional[str] = None):
        """The session's current ranking (``top_k`` rows: "show more")."""
        k = _integer("top_k", top_k, 1, MAX_TOP_K)
        return _view(engine, engine.sessions.get(session_id), k=k)

    @app.get("/api/session/{session_id}")
    def export(session_id: str):
        """The session as JSON; ``python -m thi --queries FILE`` replays its query."""
        session = engine.sessions.get(session_id)
        with session.lock:
            return engine.export(session)


def create_app(engine: SearchEngine, *, host: str = "127.0.0.1", token: Optional[str] = None,
               allow_hosts=(), policy: Optional[AccessPolicy] = None) -> FastAPI:
    """The FastAPI application serving ``engine`` as a server bound to ``host`` would
    (``access.plan_access``: accepted Host names, token); ``policy`` overrides that plan."""
    policy = policy or plan_access(host, token, allow_hosts)
    app = FastAPI(title="ICL interactive person search", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.engine, app.state.access = engine, policy
    app.add_middleware(Guard, policy=policy)
    _install_handlers(app)
    _page_routes(app, engine, policy)
    _api_routes(app, engine)
    return app
