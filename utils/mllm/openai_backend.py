"""Backend for any OpenAI-compatible chat server (``vllm serve``, SGLang, LMDeploy, hosted APIs).

Images travel as base64 PNG data URLs, already resized to the fixed pixel budget, so every
server sees the same pixels as the offline backends. Requests run on a bounded thread pool;
connection errors, time-outs, 429 and 5xx are retried with exponential back-off.
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from .base import DEFAULT_PIXELS, BaseClient, MLLMError, Request
from .images import prepare_image


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

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 3,
                 cache_dir=None, min_pixels: int = DEFAULT_PIXELS,
                 max_pixels: int = DEFAULT_PIXELS, extra_body: "dict | None" = None,
                 backoff: float = 0.5, max_batch: "int | None" = None):
        super().__init__(cache_dir=cache_dir, min_pixels=min_pixels, max_pixels=max_pixels,
                         max_batch=max_batch)
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
        # The SDK's own retries are off: ours cover the same errors and are counted in stats.
        self._client = openai.OpenAI(base_url=self.base_url,
                                     api_key=os.environ.get(api_key_env) or "EMPTY",
                                     timeout=self.timeout, max_retries=0)

    def identity(self) -> str:
        ident = f"openai:{self.base_url}|{self.model}"
        if self.extra_body:  # sampling extras change answers
            ident += "|" + json.dumps(self.extra_body, sort_keys=True)
        return ident

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
        if isinstance(exc, o.APITimeoutError):
            return MLLMError(f"request to {self.base_url} timed out after {self.timeout}s "
                             f"({attempts} attempts); raise timeout= or lower concurrency=")
        if isinstance(exc, o.APIConnectionError):
            return MLLMError(
                f"cannot reach the OpenAI-compatible server at {self.base_url} ({attempts} "
                f"attempts: {exc}). Is it running? Start one with e.g. `vllm serve <model_dir> "
                f"--served-model-name {self.model} --port 8000` and pass "
                f"base_url=http://127.0.0.1:8000/v1")
        if isinstance(exc, o.APIStatusError):
            hint = (f"; is model {self.model!r} served there?" if exc.status_code == 404 else "")
            return MLLMError(f"server {self.base_url} answered HTTP {exc.status_code} after "
                             f"{attempts} attempts: {exc.message}{hint}")
        return MLLMError(f"request to {self.base_url} failed: {exc!r}")

    def _ask(self, request: Request, temperature: float, max_tokens: int) -> str:
        messages = self._messages(request)
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=temperature,
                    max_tokens=max_tokens, extra_body=self.extra_body or None)
                break
            except Exception as exc:  # classified below; anything unknown is not retried
                if not isinstance(exc, self._openai.OpenAIError):
                    raise
                if attempt >= self.retries or not self._retryable(exc):
                    raise self._fail(exc, attempt + 1) from exc
                self.stats["retries"] += 1
                time.sleep(self.backoff * 2 ** attempt)
        if not getattr(resp, "choices", None):
            raise MLLMError(f"server {self.base_url} returned no choices for model {self.model!r}")
        return resp.choices[0].message.content or ""

    def _generate(self, requests: list[Request], temperature: float, max_tokens: int) -> list[str]:
        answers: dict[int, str] = {}
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(requests))),
                                  thread_name_prefix="mllm-openai")
        try:
            futures = [pool.submit(self._ask, r, temperature, max_tokens) for r in requests]
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
            raise error
        return [answers[i] for i in range(len(requests))]

    def close(self) -> None:
        self._client.close()
