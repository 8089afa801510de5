"""Relay benchmark: how many SSE events per second chatterd moves, and at what CPU cost.

    .venv/bin/python bench/relay.py [--streams 200] [--tokens 500] [--burst-tokens 50000]

Starts a real chatterd process (embedded PostgreSQL in a temporary directory) in front of a
minimal upstream that answers /api/chat with pre-encoded Ollama NDJSON as fast as the socket
takes it, then drives it with raw-socket clients that count `data:` events.  The upstream and
the clients share this process; chatterd has its own.  Reported per scenario: wall time,
events/s, and events per CPU-second of the chatterd process (its utime+stime), which is the
number that does not depend on what else the machine is doing.
"""

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tornado.testing import bind_unused_port  # noqa: E402

import jsonfmt  # noqa: E402
from procstat import cpu_seconds, status_kib  # noqa: E402  (bench/ is sys.path[0])

LINE = (b'{"model":"bench","created_at":"2026-11-21T16:10:01.123456Z",'
        b'"message":{"role":"assistant","content":"tok "},"done":false}\n')
DONE = (b'{"model":"bench","created_at":"2026-11-21T16:10:02Z","message":{"role":"assistant",'
        b'"content":""},"done":true,"done_reason":"stop","eval_count":%d}\n')


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def upstream(reader, writer):
    """Answer one POST /api/chat: `tokens` lines, written `per_write` lines at a time."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                 .split(b":")[1])
    body = jsonfmt.loads(await reader.readexactly(length))
    tokens, per_write = body["options"]["tokens"], body["options"]["per_write"]
    # It closes the connection after the answer, so it says so: a server that closes without
    # saying it races every keep-alive client (chatterd retries a request that met such a
    # close once; under 1,000 turns at once a retry could meet another).
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                 b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
    block = chunk(LINE * per_write)
    for _ in range(tokens // per_write):
        writer.write(block)
        await writer.drain()
    writer.write(chunk(DONE % tokens) + b"0\r\n\r\n")
    await writer.drain()
    writer.close()


async def client(port: int, app_id: str, tokens: int, per_write: int,
                 pause: "asyncio.Event | None" = None) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = jsonfmt.dumpb({"appID": app_id, "model": "bench", "stream": True,
                          "messages": [{"role": "user", "content": "go"}],
                          "options": {"tokens": tokens, "per_write": per_write}})
    writer.write(b"POST /llmchat HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    events = 0
    tail = b""
    if pause is not None:  # a client that stops reading after the headers
        await reader.readuntil(b"\r\n\r\n")
        await pause.wait()
    while data := await reader.read(1 << 16):
        events += (tail + data).count(b"data: ")
        tail = data[-5:]
    writer.close()
    return events


def rss_mib(pid: int, field: str = "VmHWM") -> float:
    return status_kib(pid, field) / 1024


async def stalled_clients(proc, port, streams, tokens):
    """Clients that stop reading: chatterd must stop reading Ollama, not buffer the reply."""
    before = rss_mib(proc.pid, "VmRSS")
    resume = asyncio.Event()
    readers = [asyncio.ensure_future(client(port, f"stalled-{i}", tokens, 50, resume))
               for i in range(streams)]
    await asyncio.sleep(3)  # measuring: give a buffering relay time to fill up
    during = rss_mib(proc.pid, "VmRSS")
    resume.set()
    events = sum(await asyncio.gather(*readers))
    reply_mib = streams * tokens * len(LINE) / 2**20
    print(f"{'stalled clients':<28} streams={streams:<4} reply total={reply_mib:.0f} MiB  "
          f"RSS {before:.0f} -> {during:.0f} MiB while stalled  "
          f"({(during - before) * 1024 / streams:.0f} KiB per stream)  "
          f"events={events}/{streams * (tokens + 1)} after resuming")


async def scenario(name, proc, port, streams, tokens, per_write):
    cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
    counts = await asyncio.gather(*(client(port, f"{name}-{i}", tokens, per_write)
                                    for i in range(streams)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
    events = sum(counts)
    expected = streams * (tokens + 1)
    print(f"{name:<28} streams={streams:<4} events={events:<7} wall={wall:6.2f}s "
          f"events/s={events / wall:9.0f}  events/CPU-s={events / max(cpu, 1e-9):9.0f}  "
          f"peak RSS={rss_mib(proc.pid):.0f} MiB" + ("" if events == expected else
                                                    f"  MISSING {expected - events}"))


async def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2 sockets per stream here too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--burst-tokens", type=int, default=50000)
    args = parser.parse_args()

    sock, up_port = bind_unused_port()
    # 1,000 turns connect at once: asyncio's default backlog of 100 overflows, and the
    # kernel then resets some of those connections (chatterd answers them 502, as it should).
    server = await asyncio.start_server(upstream, sock=sock, backlog=4096)
    sock2, port = bind_unused_port()
    sock2.close()
    data_dir = tempfile.mkdtemp(prefix="chatterd-bench-")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "chatterd.py"), f"--port={port}", f"--data-dir={data_dir}",
        f"--ollama-url=http://127.0.0.1:{up_port}", stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, cwd=ROOT)
    while b"chatterd listening" not in (line := await proc.stderr.readline()):
        if not line:
            raise SystemExit("chatterd did not start")

    async def discard_log():
        while await proc.stderr.readline():
            pass

    asyncio.ensure_future(discard_log())
    try:
        await scenario("warm-up", proc, port, 4, 100, 1)
        await scenario("one stream, burst", proc, port, 1, args.burst_tokens, 50)
        await scenario("one stream, line per write", proc, port, 1, args.burst_tokens // 5, 1)
        await scenario("concurrent, line per write", proc, port, args.streams, args.tokens, 1)
        await scenario("1000 concurrent streams", proc, port, 1000, 50, 1)
        await stalled_clients(proc, port, 50, 20000)
    finally:
        proc.terminate()
        await proc.wait()
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
