"""Long-conversation benchmark: a turn's database time and time to first token, for an
appID with 10 stored messages and one with 100,000.

    .venv/bin/python bench/context.py [--turns 30] [--messages 100000]

Starts an embedded PostgreSQL (temporary directory), seeds the two conversations with
INSERT ... SELECT generate_series (then ANALYZE, as autovacuum would), and serves chatterd
(--context-tokens 8192) in front of the Ollama double in this process.  Reported per
conversation, median and 90th percentile over --turns turns:
  begin_turn: the round trip that takes the lease, stores the message and reads the history;
  end_turn:   the round trip that stores the reply and learns the token counts;
  TTFT:       from sending POST /llmchat to the first `data:` event (the double answers at once).
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from tornado.httpserver import HTTPServer  # noqa: E402
from tornado.testing import bind_unused_port  # noqa: E402

import jsonfmt  # noqa: E402
import settings  # noqa: E402
from chatterd import Application  # noqa: E402
from db import conversations, pool as db_pool  # noqa: E402
from upstreams import router  # noqa: E402
from tests.ollama_double import OllamaDouble  # noqa: E402
from tests.support import database_url  # noqa: E402
from tests.test_context import seed_conversation  # noqa: E402


def timed(fn):
    times = []

    async def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - started)
    wrapper.times = times
    return wrapper


async def first_token(port: int, app_id: str, content: str) -> float:
    body = jsonfmt.dumpb({"appID": app_id, "model": "llama3.2", "stream": True,
                          "messages": [{"role": "user", "content": content}]})
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    seen = b""
    while b"data: " not in seen:
        data = await reader.read(65536)
        assert data, seen
        seen += data
    ttft = time.perf_counter() - started
    while not seen.endswith(b"0\r\n\r\n"):  # the whole chunked body: the turn is stored
        data = await reader.read(65536)
        if not data:
            break
        seen += data
    writer.close()
    return ttft


def summary(values: list[float]) -> str:
    ms = sorted(1000 * v for v in values)
    return f"median {statistics.median(ms):6.2f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:6.2f} ms"


async def main(dsn: str, turns: int, messages: int) -> None:
    con = await asyncpg.connect(dsn, server_settings={"search_path": "chatterd"})
    await con.execute("TRUNCATE chatts, messages, turns, leases, conversation_sizes")
    started = time.perf_counter()
    await seed_conversation(con, "long", messages)
    print(f"seeded 'long': {messages} messages in {time.perf_counter() - started:.1f} s")
    for i in range(2 * turns):  # a fresh 10-message conversation for every short turn
        await seed_conversation(con, f"short-{i}", 10)
    await con.close()

    conversations.begin_turn = timed(conversations.begin_turn)
    conversations.end_turn = timed(conversations.end_turn)
    double = OllamaDouble()
    double.listen()
    config = settings.defaults(upstreams=double.url, db_pool_size=4, context_tokens=8192,
                               weather_url="")
    pool = await db_pool.create_pool(dsn, config)
    app = Application(pool, router.from_settings(config), config)
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    for k, app_id in enumerate(("short", "long", "short", "long")):  # the first pass warms up
        conversations.begin_turn.times.clear()
        conversations.end_turn.times.clear()
        ttfts = [await first_token(port, f"short-{k // 2 * turns + i}" if app_id == "short"
                                   else app_id, f"question {i} about ships?")
                 for i in range(turns)]
        sent = double.chat_requests()[-1].body["messages"]
        print(f"{app_id:>5} ({len(sent)} messages sent): begin_turn "
              f"{summary(conversations.begin_turn.times)}; end_turn "
              f"{summary(conversations.end_turn.times)}; TTFT {summary(ttfts)}")
    server.stop()
    app.upstreams.close()
    app.turns.close()
    await pool.close()
    await double.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(main(database_url(), args.turns, args.messages))
