"""Cutting an upstream's NDJSON body into lines that are safe on one line of SSE or NDJSON."""

import jsonfmt
from upstreams.errors import UpstreamBroken

MAX_LINE = 8 * 1024 * 1024  # Ollama's own Go client allows 8 MB per line


class LineSplitter:
    """Cuts a byte stream into NDJSON lines; chunk boundaries mean nothing.

    Every line it returns is safe on one line of SSE or NDJSON: a raw CR, any other
    control character or U+2028/U+2029 an upstream put in a line is escaped (see
    jsonfmt.one_line).  The check runs once per chunk that completes lines, on all of
    its bytes (a U+2028 may arrive split across chunks); only a chunk holding such a
    byte pays for a look at each of its lines.
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\n" not in chunk:
            self.pending += chunk
            if len(self.pending) > MAX_LINE:
                raise UpstreamBroken(f"Ollama sent a line longer than {MAX_LINE} bytes")
            return []
        data = self.pending + chunk
        parts = data.split(b"\n")
        self.pending = parts.pop()
        if not jsonfmt.has_breakers(data):  # the hot path
            return [p for p in parts if p and not p.isspace()]
        return [jsonfmt.one_line(p.rstrip(b"\r")) for p in parts if p and not p.isspace()]

    def rest(self) -> list[bytes]:
        rest, self.pending = self.pending.strip(), b""
        return [jsonfmt.one_line(rest)] if rest else []
