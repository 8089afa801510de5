"""The Ollama dialect: upstreams.client.UpstreamClient (the transport every upstream shares:
abortable streaming requests, line splitting, slots, timeouts), plus what routing needs."""

from __future__ import annotations

from typing import Any, Optional

import jsonfmt
from settings import Settings
from upstreams.client import LinesCallback, UpstreamCall, UpstreamClient, api_base


def model_key(name: str) -> str:
    """Ollama matches names case-insensitively and treats a missing tag as ':latest'."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


class OllamaUpstream(UpstreamClient):
    """An Ollama server as one of several upstreams: its calls are plain UpstreamCalls."""

    dialect = "ollama"

    def __init__(self, url: str, config: Settings, **kwargs: Any) -> None:
        super().__init__(url, config, **kwargs)
        self.name = api_base(url)

    def post(self, path: str, body: bytes, on_lines: Optional[LinesCallback],
             headers: Optional[dict[str, str]] = None, parsed: Optional[dict] = None) -> UpstreamCall:
        return UpstreamCall(self, path, body, on_lines, headers=headers)

    async def models(self, timeout: float = 2.0) -> list[str]:
        call = UpstreamCall(self, "/api/tags", None, None, timeout=timeout)
        await call.finished()
        listing = jsonfmt.loads(bytes(call.body))
        names = []
        for entry in listing.get("models") or []:
            if isinstance(entry, dict):
                names.extend(entry[k] for k in ("name", "model") if isinstance(entry.get(k), str))
        return names

