"""An upstream body in HTTP's chunked transfer coding, decoded a buffer at a time.

Tornado awaits three reads per chunk; an LLM server writes one chunk per token, so the
relay decodes whatever arrived (any number of chunks, or part of one) in one pass instead
(upstreams/http.py's BufferedChunkConnection feeds it).  Chunk extensions are ignored and
trailers are not expected, as in Tornado.

    decoder = ChunkDecoder(max_body_size)
    data = decoder.feed(received)   # the body bytes in it (b"" if none); HTTPInputError if bad
    decoder.ended, decoder.stray    # the last chunk was read; bytes came after it
"""

import re

from tornado.httputil import HTTPInputError

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")


class ChunkDecoder:
    __slots__ = ("buf", "left", "crlf", "total", "max_size", "ended", "stray")

    def __init__(self, max_size: int) -> None:
        self.buf = b""      # received, not yet decoded (part of a size line or a CRLF)
        self.left = 0       # data bytes still due in the current chunk
        self.crlf = False   # the current chunk's data is in; its CRLF is due
        self.total = 0
        self.max_size = max_size
        self.ended = False
        self.stray = False  # bytes after the body's end: they belong to no response

    def feed(self, data: bytes) -> bytes:
        """The body bytes *data* completes or carries, in order (b"" when none).  Raises
        HTTPInputError when the framing is wrong or the body grows past max_size."""
        buf = self.buf + data if self.buf else data
        left, crlf = self.left, self.crlf
        out = []
        pos = 0
        end = len(buf)
        while pos < end:
            if left:
                take = min(left, end - pos)
                out.append(buf[pos:pos + take])
                pos += take
                left -= take
                crlf = left == 0
                continue
            if crlf:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise HTTPInputError("improperly terminated chunk")
                pos += 2
                crlf = False
                continue
            eol = buf.find(b"\r\n", pos, pos + 64)
            if eol < 0:
                if end - pos >= 64:
                    raise HTTPInputError("invalid chunk size")
                break
            size = buf[pos:eol].split(b";", 1)[0].strip()  # chunk extensions ignored
            if not _CHUNK_SIZE.fullmatch(size):
                raise HTTPInputError("invalid chunk size")
            chunk_len = int(size, 16)
            if chunk_len == 0:  # the last chunk: no trailers expected, as Tornado
                if end - eol - 2 < 2:
                    break
                if buf[eol + 2:eol + 4] != b"\r\n":
                    raise HTTPInputError("improperly terminated chunked request")
                self.ended = True
                self.stray = end > eol + 4
                pos = end
                break
            self.total += chunk_len
            if self.total > self.max_size:
                raise HTTPInputError("chunked body too large")
            left = chunk_len
            pos = eol + 2
        self.buf = buf[pos:] if pos < end else b""
        self.left, self.crlf = left, crlf
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)
