"""The OpenAI-compatible upstream: OpenAIClient and OpenAICall, UpstreamClient and UpstreamCall
with another body parser (upstreams/openai/translate.py does the translating)."""

from __future__ import annotations

import time
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit, unquote

import jsonfmt
from settings import Settings
from upstreams.client import LinesCallback, UpstreamCall, UpstreamClient
from upstreams.errors import UpstreamBroken, UpstreamError, UpstreamHTTPError
from upstreams.openai.translate import (ChunkTranslator, gather, gathered_body,
                                        ollama_to_openai_request)

# -- the client ------------------------------------------------------------------------------

def parse_openai_url(url: str) -> tuple[str, str, str]:
    """`openai+http(s)://[:KEY@]host[:port]/v1` -> (base URL without the key, display, key)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.removeprefix("openai+")
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an openai+http(s) URL: {display_url(url)!r}")
    key = unquote(parts.password or parts.username or "") if "@" in parts.netloc else ""
    host = parts.netloc.rsplit("@", 1)[-1]
    base = urlunsplit((scheme, host, parts.path.rstrip("/"), "", ""))
    return base, "openai+" + base, key


def display_url(url: str) -> str:
    """*url* without any credentials, for logs, /readyz, /metrics and errors."""
    parts = urlsplit(url.strip())
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIClient(UpstreamClient):
    """Talks to one OpenAI-compatible server; its calls speak Ollama to the handlers."""

    dialect = "openai"

    def __init__(self, url: str, config: Settings, **kwargs: Any) -> None:
        self.base, self.name, key = parse_openai_url(url)
        self.label = f"upstream {self.name}"
        self.extra_headers = {"Authorization": f"Bearer {key}"} if key else {}
        super().__init__(url, config, **kwargs)

    def base_url(self, url: str) -> str:  # type: ignore[override]
        return self.base

    def post(self, path: str, body: bytes, on_lines: Optional[LinesCallback],
             headers: Optional[dict[str, str]] = None, parsed: Optional[dict] = None) -> "OpenAICall":
        if parsed is None:
            parsed = jsonfmt.loads(body)
        request = ollama_to_openai_request(path, parsed)
        return OpenAICall(self, "/chat/completions", jsonfmt.dumpb(request), on_lines,
                          model=str(parsed.get("model") or ""), generate=path == "/api/generate",
                          headers=headers)

    async def models(self, timeout: float = 2.0) -> list[str]:
        call = UpstreamCall(self, "/models", None, None, timeout=timeout)
        await call.finished()
        listing = jsonfmt.loads(bytes(call.body))
        names: list[str] = []
        for entry in listing.get("data") or []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                names.append(entry["id"])
                names.extend(a for a in entry.get("aliases") or [] if isinstance(a, str))
        return names

    async def version(self, timeout: float = 2.0) -> str:
        await self.models(timeout)
        return "openai"


class OpenAICall(UpstreamCall):
    """One streamed /chat/completions request, delivered as Ollama lines."""

    def __init__(self, client: OpenAIClient, path: str, body: bytes,
                 on_lines: Optional[LinesCallback], *, model: str, generate: bool,
                 headers: Optional[dict[str, str]] = None) -> None:
        self.translator = ChunkTranslator(model, generate, client.label)
        self._gathered: Optional[dict] = {} if on_lines is None else None
        self._raw_type = "application/json"
        super().__init__(client, path, body, on_lines, headers=headers)

    @property  # type: ignore[override]
    def content_type(self) -> str:
        if self.status == 200:
            return "application/x-ndjson" if self._gathered is None else "application/json"
        return self._raw_type

    @content_type.setter
    def content_type(self, value: str) -> None:
        self._raw_type = value

    def _on_chunk(self, chunk: bytes) -> Any:
        self._last_activity = time.monotonic()
        if self.status != 200:
            if len(self.body) < 64 * 1024:
                self.body += chunk
            return None
        try:
            lines = self.translator.feed(self._splitter.feed(chunk))
        except UpstreamBroken as e:
            self.abort(e)
            return None
        if not lines:
            return None
        if self._gathered is not None:
            try:
                gather(lines, self._gathered)
            except UpstreamError as e:
                self.abort(UpstreamHTTPError(e.message, status=502))
            return None
        return self._deliver(lines)

    async def _at_end(self) -> None:
        lines = self.translator.feed(self._splitter.rest())
        lines += self.translator.end()  # raises when the stream was cut short
        if self._gathered is not None:
            gather(lines, self._gathered)
            if "final" not in self._gathered:
                raise UpstreamBroken(f"{self.client.label} ended without an answer")
            self.body = bytearray(gathered_body(self._gathered))
        elif lines:
            pending = self._deliver(lines)
            if pending is not None:
                await pending
