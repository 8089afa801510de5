"""bench/scale.py's upstream, a process of its own (so each bench process holds one socket per
stream): POST /api/chat answers `tokens` NDJSON lines, one per `interval` seconds (both read
from the request's options), each carrying the CLOCK_MONOTONIC time it was written.

    python bench/scale_upstream.py      # prints its port, serves until terminated

It runs without the cyclic garbage collector, as the bench's clients do (see scale.py).
"""

import asyncio
import gc
import time

import uvloop

from procstat import raise_nofile

LINE = (b'{"model":"bench","created_at":"2026-11-25T00:00:00Z",'
        b'"message":{"role":"assistant","content":"@%d "},"done":false}\n')
DONE = (b'{"model":"bench","created_at":"2026-11-25T00:00:00Z","message":{"role":"assistant",'
        b'"content":""},"done":true,"done_reason":"stop","eval_count":%d}\n')
STAMP = b'"content":"@'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def upstream(reader, writer):
    """One POST /api/chat: `tokens` lines, one per `interval` seconds, each stamped when written."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                     .split(b":")[1])
        body = await reader.readexactly(length)
        opts = body[body.index(b'"options"'):]
        tokens = int(opts.split(b'"tokens":')[1].split(b",")[0].split(b"}")[0])
        interval = float(opts.split(b'"interval":')[1].split(b",")[0].split(b"}")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        start = time.monotonic()
        for k in range(tokens):
            delay = start + k * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(chunk(LINE % time.monotonic_ns()))
            if writer.transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()
        writer.write(chunk(DONE % tokens) + b"0\r\n\r\n")
        await writer.drain()
    except (ConnectionError, RuntimeError, asyncio.IncompleteReadError):
        pass  # chatterd ended the request (a client that left, a deadline): the usual end
    finally:
        writer.close()


async def serve_upstream() -> None:
    raise_nofile()
    server = await asyncio.start_server(upstream, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()  # until terminated


if __name__ == "__main__":
    gc.disable()
    uvloop.install()
    asyncio.run(serve_upstream())
