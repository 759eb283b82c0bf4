"""Backend for any OpenAI-compatible chat server (``vllm serve``, SGLang, LMDeploy, hosted APIs).

Images travel as base64 PNG data URLs, already resized to the fixed pixel budget, so every
server sees the same pixels as the offline backends. Requests run on a bounded thread pool;
connection errors, time-outs, 429 and 5xx are retried with exponential back-off. Each answer is
cached as soon as it arrives. The client's identity includes what the server's ``/v1/models``
reports about the served name (see ``identity_info``), so a different model or adapter served
under the same name and port never gets the old answers. Every error names server and model.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from .base import DEFAULT_PIXELS, BaseClient, MLLMError, Request
from .images import prepare_image

from .identity import folder_digest

log = logging.getLogger(__name__)


def _field(entry, name: str):
    """A field of a /models entry that the SDK's Model type does not declare (vLLM's ``root``,
    ``parent``)."""
    value = getattr(entry, name, None)
    if value is None:
        value = (getattr(entry, "model_extra", None) or {}).get(name)
    return value


def image_data_url(image, min_pixels: int = DEFAULT_PIXELS, max_pixels: int = DEFAULT_PIXELS) -> str:
    """``image`` (path or PIL) resized to the pixel budget, as a ``data:image/png;base64`` URL."""
    buf = io.BytesIO()
    prepare_image(image, min_pixels, max_pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIClient(BaseClient):
    """Client of an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``api_key_env`` names the environment variable holding the key ("EMPTY" when unset, which
    local servers accept); ``backoff`` is the first retry delay in seconds (doubled each time).
    """

    backend = "openai"
    DEFAULT_MAX_BATCH = None  # answers are stored one by one as they arrive (_answered)

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 3,
                 cache_dir=None, min_pixels: int = DEFAULT_PIXELS,
                 max_pixels: int = DEFAULT_PIXELS, extra_body: "dict | None" = None,
                 backoff: float = 0.5, max_batch: "int | None | str" = "auto",
                 retry_unusable: bool = True):
        super().__init__(cache_dir=cache_dir, min_pixels=min_pixels, max_pixels=max_pixels,
                         max_batch=max_batch, retry_unusable=retry_unusable)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        try:
            import openai
        except ImportError as exc:
            raise MLLMError("the 'openai' backend needs the 'openai' package "
                            "(pip install -r requirements.txt)") from exc
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.extra_body = dict(extra_body or {})
        self.stats["retries"] = 0
        self._server_info: "dict | None" = None
        self._listed: "list[str] | None" = None
        # The SDK's own retries are off: ours cover the same errors and are counted in stats.
        self._client = openai.OpenAI(base_url=self.base_url,
                                     api_key=os.environ.get(api_key_env) or "EMPTY",
                                     timeout=self.timeout, max_retries=0)

    def describe(self) -> str:
        return f"server {self.base_url} (model {self.model!r})"

    def identity_info(self) -> dict:
        """Backend, URL, served name and what the server reports about that name on
        ``/v1/models`` (``id``, ``root``: the folder it loaded, ``parent``: the base model of a
        LoRA), plus content digests of ``root`` and of the parent's ``root`` when they are
        folders on this machine. Asked once per client; a server that cannot be reached is an
        error (answers of an unknown model must not be reused)."""
        if self._server_info is None:
            self._server_info = self._query_models()
        info = {"backend": self.backend, "base_url": self.base_url, "model": self.model,
                **self._server_info}
        if self.extra_body:  # sampling extras change answers
            info["extra_body"] = json.dumps(self.extra_body, sort_keys=True)
        return info

    def _query_models(self) -> dict:
        """What ``/v1/models`` says about ``self.model`` (see :meth:`identity_info`)."""
        try:
            page = self._with_retries(lambda: self._client.models.list())
            entries = list(getattr(page, "data", None) or [])
        except MLLMError as exc:
            if isinstance(exc.__cause__, self._openai.APIStatusError):
                # Some OpenAI-compatible servers have no model list: the served name is all
                # we know; say so in the identity and the log.
                log.warning("%s: GET /models answered HTTP %s; the answer cache and results "
                            "folders will know this model only by its served name",
                            self.describe(), exc.__cause__.status_code)
                return {"server_model": f"unlisted (HTTP {exc.__cause__.status_code})"}
            raise
        except Exception as exc:  # an answer that is not a model list at all
            raise MLLMError(f"{self.describe()}: GET /models returned something that is not "
                            f"an OpenAI model list ({type(exc).__name__}: {exc})") from exc
        by_id = {getattr(e, "id", None): e for e in entries}
        self._listed = sorted(str(k) for k in by_id if k)
        if self.model not in by_id:
            # Some servers (transformers serve) answer for names they do not list; if this one
            # does not, the chat request fails with a 404 that lists the served names.
            log.warning("%s: the server's /models does not list %r (it lists: %s)",
                        self.describe(), self.model, ", ".join(self._listed) or "nothing")
            info = {"server_model": "unlisted"}
            if os.path.isdir(self.model):  # transformers serve takes a local folder as name
                info["model_digest"] = folder_digest(self.model)
            return info
        entry = by_id[self.model]
        info = {"server_model": {"id": self.model, "root": _field(entry, "root"),
                                 "parent": _field(entry, "parent")}}
        root = info["server_model"]["root"]
        if isinstance(root, str) and os.path.isdir(root):
            info["root_digest"] = folder_digest(root)
        parent = by_id.get(info["server_model"]["parent"])
        parent_root = _field(parent, "root") if parent is not None else None
        if isinstance(parent_root, str) and os.path.isdir(parent_root):
            info["parent_root_digest"] = folder_digest(parent_root)
        return info

    def _messages(self, request: Request) -> list[dict]:
        content: list[dict] = []
        if request.image is not None:  # image part first, as Qwen2-VL's chat template expects
            url = image_data_url(request.image, self.min_pixels, self.max_pixels)
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": request.text})
        return [{"role": "system", "content": request.system},
                {"role": "user", "content": content}]

    def _retryable(self, exc: Exception) -> bool:
        o = self._openai
        if isinstance(exc, (o.APIConnectionError, o.RateLimitError, o.InternalServerError)):
            return True  # APITimeoutError is an APIConnectionError
        return isinstance(exc, o.APIStatusError) and exc.status_code >= 500

    def _fail(self, exc: Exception, attempts: int) -> MLLMError:
        o = self._openai
        where = self.describe()
        if isinstance(exc, o.APITimeoutError):
            return MLLMError(f"request to {where} timed out after {self.timeout}s "
                             f"({attempts} attempts); raise timeout= or lower the concurrency "
                             f"(--concurrency)")
        if isinstance(exc, o.APIConnectionError):
            return MLLMError(
                f"cannot reach the OpenAI-compatible {where} ({attempts} attempts: {exc}). Is it "
                f"running? To serve a base model under the name {self.model!r}: `vllm serve "
                f"BASE_MODEL_DIR --served-model-name {self.model} --port 8000`; to serve a LoRA "
                f"under that name: `vllm serve BASE_MODEL_DIR --enable-lora --lora-modules "
                f"{self.model}=ADAPTER_DIR --port 8000` (docs/THI.md); then pass "
                f"--base-url http://127.0.0.1:8000/v1 --served-model {self.model}")
        if isinstance(exc, o.APIStatusError):
            hint = ""
            if exc.status_code == 404:
                listed = (f" (its /models lists: {', '.join(self._listed) or 'nothing'})"
                          if self._listed is not None else "")
                hint = (f"; is model {self.model!r} served there{listed}? Pass a served name "
                        f"to --served-model")
            return MLLMError(f"{where} answered HTTP {exc.status_code} after {attempts} "
                             f"attempts: {exc.message}{hint}")
        return MLLMError(f"request to {where} failed: {exc!r}")

    def _with_retries(self, call):
        """``call()`` with our retry policy; SDK errors become MLLMErrors naming the server
        and model, and so does a response the SDK cannot read (not JSON, not UTF-8)."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except self._openai.OpenAIError as exc:
                if isinstance(exc, self._openai.APIResponseValidationError):
                    raise MLLMError(f"{self.describe()} answered with status "
                                    f"{exc.status_code} but not an OpenAI response: "
                                    f"{exc.message}; is this an OpenAI-compatible endpoint "
                                    f"(--base-url ending in /v1)?") from exc
                if attempt >= self.retries or not self._retryable(exc):
                    raise self._fail(exc, attempt + 1) from exc
                self.stats["retries"] += 1
                time.sleep(self.backoff * 2 ** attempt)
            except (ValueError, UnicodeError, TypeError, KeyError, AttributeError) as exc:
                # json/unicode decoding of a body that is not JSON, or JSON of another shape
                raise MLLMError(f"{self.describe()} sent a response that is not an OpenAI "
                                f"chat completion ({type(exc).__name__}: {exc}); is --base-url "
                                f"an OpenAI-compatible endpoint (ending in /v1)?") from exc

    def _ask(self, request: Request, temperature: float, max_tokens: int) -> str:
        messages = self._messages(request)
        resp = self._with_retries(lambda: self._client.chat.completions.create(
            model=self.model, messages=messages, temperature=temperature,
            max_tokens=max_tokens, extra_body=self.extra_body or None))
        choices = getattr(resp, "choices", None)
        if not choices:
            raise MLLMError(f"{self.describe()} returned no choices"
                            + ("" if not isinstance(resp, str) else
                               f" but text that is not JSON: {resp[:120]!r}"))
        content = getattr(getattr(choices[0], "message", None), "content", None)
        if content is not None and not isinstance(content, str):
            raise MLLMError(f"{self.describe()} returned a non-text answer: {content!r:.120}")
        return content or ""

    def _generate(self, requests: list[Request], temperature: float, max_tokens: int) -> list[str]:
        answers: dict[int, str] = {}

        def one(i: int) -> str:
            text = self._ask(requests[i], temperature, max_tokens)
            self._answered(i, text)  # into the cache now: a kill loses only requests in flight
            return text

        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(requests))),
                                  thread_name_prefix="mllm-openai")
        try:
            futures = [pool.submit(one, i) for i in range(len(requests))]
            error = None
            for i, fut in enumerate(futures):
                try:
                    answers[i] = fut.result()
                except Exception as exc:
                    error = error or exc
                    for f in futures:
                        f.cancel()  # do not start new requests once one has failed for good
        finally:
            pool.shutdown(wait=True)
        if error is not None:
            if isinstance(error, MLLMError):
                raise MLLMError(str(error), partial=answers) from error
            raise MLLMError(f"request to {self.describe()} failed: {error!r}",
                            partial=answers) from error
        return [answers[i] for i in range(len(requests))]

    def close(self) -> None:
        self._client.close()
