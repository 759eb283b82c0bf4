"""The openai backend against fake OpenAI-compatible servers on 127.0.0.1 (stdlib http.server).

No sleeps: concurrency is proven with a barrier, the time-out with a server that holds the
request until an Event is set.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from utils.mllm import MLLMError, Request, build_client
from utils.mllm.openai_backend import OpenAIClient


class FakeServer:
    """A chat-completions server whose behaviour per request is a function of the request body.

    ``respond(body) -> (status, answer_text_or_error_message)``; ``respond`` may also return
    ``(status, bytes)`` to send a raw body. ``models``: what GET /v1/models lists (vLLM's
    fields: id, root, parent); change it to re-serve another model under the same name.
    """

    def __init__(self, respond, models=None):
        self.respond = respond
        self.models = models if models is not None else [
            {"id": "tiny-qwen2vl", "root": "/models/tiny-qwen2vl", "parent": None}]
        self.model_queries = 0
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                if not self.path.rstrip("/").endswith("/models"):
                    self.send_error(404)
                    return
                with server.lock:
                    server.model_queries += 1
                data = json.dumps({"object": "list", "data": [
                    {"object": "model", "created": 0, "owned_by": "fake", **m}
                    for m in server.models]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, text = server.respond(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                if isinstance(text, bytes):
                    data = text
                elif status == 200:
                    payload = {"id": "x", "object": "chat.completion", "created": 0,
                               "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                         "total_tokens": 2}}
                else:
                    payload = {"error": {"message": text, "type": "fake", "code": status}}
                if not isinstance(text, bytes):
                    data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (time-out test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(respond, models=None):
        s = FakeServer(respond, models)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def user_text(body) -> str:
    return [p for p in body["messages"][1]["content"] if p["type"] == "text"][0]["text"]


def client(url, model="tiny-qwen2vl", **kw) -> OpenAIClient:
    kw.setdefault("backoff", 0.0)
    return build_client("openai", base_url=url, model=model, **kw)


def test_answers_in_order_with_bounded_concurrency(serve):
    barrier = threading.Barrier(4, timeout=20)

    def respond(body):
        text = user_text(body)
        if int(text.split()[-1]) < 4:
            barrier.wait()  # passes only if 4 requests are in flight at once
        return 200, text.upper()

    s = serve(respond)
    c = client(s.url, concurrency=4)
    reqs = [Request(f"question {i}") for i in range(23)]
    out = c.generate(reqs, temperature=0.01, max_tokens=7)
    assert out == [f"QUESTION {i}" for i in range(23)]
    assert s.max_in_flight == 4  # the barrier forces 4; the pool never exceeds 4
    assert c.stats["calls"] == 1 and c.stats["cache_misses"] == 23
    body = s.bodies[0]
    assert body["model"] == "tiny-qwen2vl" and body["max_tokens"] == 7
    assert body["temperature"] == pytest.approx(0.01)
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}


def test_image_sent_first_as_png_data_url_at_pixel_budget(serve, tmp_path):
    s = serve(lambda body: (200, "Yes"))
    path = tmp_path / "p.jpg"
    Image.new("RGB", (128, 384), (200, 30, 30)).save(path)
    c = client(s.url, extra_body={"top_k": 1})
    assert c.generate([Request("Can this text ...", image=path, system="sys")]) == ["Yes"]
    body = s.bodies[0]
    assert body["messages"][0] == {"role": "system", "content": "sys"}
    parts = body["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    # Qwen2-VL's rule at min = max = 50,176 pixels for a 384x128 person crop: 364x112
    assert (im.height, im.width) == (364, 112) and im.format == "PNG"
    assert body["top_k"] == 1  # extra_body reaches the server


def test_stopped_server_names_the_url(serve):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    c = client(url, retries=2)
    with pytest.raises(MLLMError) as info:
        c.generate([Request("hello")])
    msg = str(info.value)
    assert url in msg and "vllm serve" in msg
    assert c.stats["retries"] == 2
    # The hint names our flags, and how to serve the name as a base model and as a LoRA.
    assert "--base-url http://127.0.0.1:8000/v1" in msg and "base_url=" not in msg
    assert "--served-model-name tiny-qwen2vl" in msg
    assert "--lora-modules tiny-qwen2vl=ADAPTER_DIR" in msg and "'tiny-qwen2vl'" in msg


@pytest.mark.parametrize("status", [500, 429, 503])
def test_retries_then_success(serve, status):
    failures = {"left": 2}

    def respond(body):
        if failures["left"] > 0:  # concurrency=1: no race on the counter
            failures["left"] -= 1
            return status, "try later"
        return 200, "No, her eyes are hidden."

    s = serve(respond)
    c = client(s.url, retries=3, concurrency=1)
    assert c.generate([Request("q")]) == ["No, her eyes are hidden."]
    assert len(s.bodies) == 3 and c.stats["retries"] == 2


def test_retries_exhausted_and_client_errors_not_retried(serve):
    s = serve(lambda body: (500, "boom"))
    c = client(s.url, retries=1)
    with pytest.raises(MLLMError, match="HTTP 500"):
        c.generate([Request("q")])
    assert len(s.bodies) == 2

    s404 = serve(lambda body: (404, "model not found"))
    c = client(s404.url, retries=3)
    with pytest.raises(MLLMError) as info:
        c.generate([Request("q")])
    assert "404" in str(info.value) and "tiny-qwen2vl" in str(info.value)
    assert len(s404.bodies) == 1


def test_timeout(serve):
    release = threading.Event()

    def respond(body):
        release.wait(30)
        return 200, "late"

    s = serve(respond)
    c = client(s.url, timeout=0.3, retries=1)
    try:
        with pytest.raises(MLLMError, match="timed out") as info:
            c.generate([Request("q")])
        assert s.url in str(info.value)
        assert c.stats["retries"] == 1
    finally:
        release.set()


def test_partial_batch_is_cached_and_rerun_asks_only_the_rest(serve, tmp_path):
    state = {"broken": True}

    def respond(body):
        text = user_text(body)
        if text == "bad" and state["broken"]:
            return 400, "bad request"
        return 200, text + "!"

    s = serve(respond)
    c = client(s.url, cache_dir=tmp_path, concurrency=2)
    reqs = [Request(t) for t in ["a", "b", "bad", "c"]]
    with pytest.raises(MLLMError, match="HTTP 400"):
        c.generate(reqs)
    n_before = len(s.bodies)
    state["broken"] = False
    c2 = client(s.url, cache_dir=tmp_path, concurrency=2)
    assert c2.generate(reqs) == ["a!", "b!", "bad!", "c!"]
    asked_again = [user_text(b) for b in s.bodies[n_before:]]
    assert "bad" in asked_again and "a" not in asked_again and "b" not in asked_again
    assert c2.stats["cache_hits"] >= 2


def test_identity_and_cache_hit(serve, tmp_path):
    s = serve(lambda body: (200, "ok"))
    c = client(s.url, cache_dir=tmp_path)
    assert c.identity_info() == {
        "backend": "openai", "base_url": s.url, "model": "tiny-qwen2vl",
        "server_model": {"id": "tiny-qwen2vl", "root": "/models/tiny-qwen2vl", "parent": None}}
    c.generate([Request("x")])
    c.generate([Request("y")])
    assert s.model_queries == 1  # asked once per client
    c2 = client(s.url, cache_dir=tmp_path)
    assert c2.generate([Request("x")]) == ["ok"]
    assert c2.stats["calls"] == 0 and c2.stats["cache_hits"] == 1 and len(s.bodies) == 2


def _lora_models(root):
    return [{"id": "qwen2-vl", "root": "/models/Qwen2-VL-7B-Instruct", "parent": None},
            {"id": "icl", "root": str(root), "parent": "qwen2-vl"}]


def test_reserved_adapter_under_same_name_and_port_never_reuses_answers(serve, tmp_path):
    """Before: the cache key was URL + served name, so a re-served adapter got the old answers
    (0 requests). Now the identity holds /v1/models' root/parent and the root's content digest."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights of training run 1")
    (adapter / "trainer_log.jsonl").write_text("{}")
    s = serve(lambda body: (200, "Yes"), models=_lora_models(adapter))
    reqs = [Request(f"q{i}") for i in range(5)]
    cache = tmp_path / "cache"
    first = client(s.url, model="icl", cache_dir=cache)
    first.generate(reqs)
    assert len(s.bodies) == 5
    assert first.identity_info()["server_model"]["parent"] == "qwen2-vl"
    # The same adapter served again (a restart): every answer comes from the cache.
    again = client(s.url, model="icl", cache_dir=cache)
    again.generate(reqs)
    assert len(s.bodies) == 5 and again.stats["cache_hits"] == 5
    # Logs are not part of the adapter: still the same.
    (adapter / "trainer_log.jsonl").write_text('{"step": 2}')
    assert client(s.url, model="icl").identity() == again.identity()
    # Retrained into the same folder, re-served under the same name and port: all asked again.
    (adapter / "adapter_model.safetensors").write_bytes(b"weights of training run 2")
    retrained = client(s.url, model="icl", cache_dir=cache)
    retrained.generate(reqs)
    assert len(s.bodies) == 10 and retrained.stats["cache_hits"] == 0
    # Another adapter folder (a remote path: no digest), same name and port: asked again too.
    s.models = _lora_models("/elsewhere/icl_lora_v2")
    other = client(s.url, model="icl", cache_dir=cache)
    other.generate(reqs)
    assert len(s.bodies) == 15 and other.stats["cache_hits"] == 0
    # And the same adapter on another base model.
    s.models = [{"id": "qwen2.5-vl", "root": "/models/Qwen2.5-VL", "parent": None},
                {"id": "icl", "root": "/elsewhere/icl_lora_v2", "parent": "qwen2.5-vl"}]
    client(s.url, model="icl", cache_dir=cache).generate(reqs)
    assert len(s.bodies) == 20


def test_name_not_served_lists_the_served_names(serve):
    models = _lora_models("/a")
    s = serve(lambda body: (200, "ok") if body["model"] in [m["id"] for m in models]
              else (404, f"The model `{body['model']}` does not exist."), models=models)
    with pytest.raises(MLLMError) as info:
        client(s.url, model="icl_lora").generate([Request("x")])
    msg = str(info.value)
    assert s.url in msg and "'icl_lora'" in msg and "icl, qwen2-vl" in msg
    assert "HTTP 404" in msg and "--served-model" in msg
    # A server that answers for names it does not list (transformers serve) still works.
    lenient = serve(lambda body: (200, "ok"), models=[])
    c = client(lenient.url, model="/models/local_folder")
    assert c.generate([Request("x")]) == ["ok"]
    assert c.identity_info()["server_model"] == "unlisted"


def test_non_json_answer_with_status_200_names_server_and_model(serve):
    """Before: UnicodeDecodeError from deep inside the SDK, server not named."""
    s = serve(lambda body: (200, b"\xff\xfe\x00 not json \x80\x81"))
    with pytest.raises(MLLMError) as info:
        client(s.url).generate([Request("x")])
    msg = str(info.value)
    assert s.url in msg and "'tiny-qwen2vl'" in msg and "OpenAI" in msg
    s2 = serve(lambda body: (200, b'{"unexpected": "shape"}'))
    with pytest.raises(MLLMError) as info:
        client(s2.url).generate([Request("x")])
    assert s2.url in str(info.value) and "'tiny-qwen2vl'" in str(info.value)


def test_every_error_names_server_and_model(serve):
    s = serve(lambda body: (400, "bad request"))
    with pytest.raises(MLLMError) as info:
        client(s.url).generate([Request("x")])
    assert s.url in str(info.value) and "'tiny-qwen2vl'" in str(info.value)


def test_answers_are_cached_as_they_arrive(serve, tmp_path):
    """With one request in flight, the cache holds every earlier answer when the next request
    reaches the server: a kill loses only the requests in flight."""
    seen = []

    def respond(body):
        path = tmp_path / "responses.jsonl"
        seen.append(len(path.read_text().splitlines()) if path.exists() else 0)
        return 200, user_text(body).upper()

    s = serve(respond)
    c = client(s.url, cache_dir=tmp_path, concurrency=1)
    assert c.generate([Request(t) for t in "abcd"]) == ["A", "B", "C", "D"]
    assert seen == [0, 1, 2, 3]


def test_empty_answers_are_not_reused_unless_asked(serve, tmp_path):
    """Before: a server that answered "" had its empty answers cached, and the rerun after the
    fix sent 0 requests."""
    state = {"broken": True}
    s = serve(lambda body: (200, "" if state["broken"] else "fixed"))
    reqs = [Request(f"q{i}") for i in range(4)]
    broken = client(s.url, cache_dir=tmp_path)
    assert broken.generate(reqs) == [""] * 4
    assert broken.stats["unusable"] == 4
    state["broken"] = False
    # --no-retry-unusable: the empty answers of the earlier run are reused, nothing is asked
    lazy = client(s.url, cache_dir=tmp_path, retry_unusable=False)
    assert lazy.generate(reqs) == [""] * 4 and len(s.bodies) == 4
    fixed = client(s.url, cache_dir=tmp_path)
    assert fixed.generate(reqs) == ["fixed"] * 4
    assert len(s.bodies) == 8 and fixed.stats["cache_hits"] == 0
    # An answer the caller cannot parse is not reused either.
    picky = client(s.url, cache_dir=tmp_path / "p")
    picky.generate(reqs, accept=lambda a: a.startswith("Yes"))
    assert picky.stats["unusable"] == 4
    client(s.url, cache_dir=tmp_path / "p").generate(reqs, accept=lambda a: a.startswith("Yes"))
    assert len(s.bodies) == 16
