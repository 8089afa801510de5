"""The relay's added latency on a real model: time to first token and turn time, straight
to llama.cpp's server and through chatterd, turn by turn.

    .venv/bin/python bench/real_model.py [--turns 100] [--max-tokens 16] [--concurrency 1,4]
                                         [--connections new,kept]

Needs the small model (scripts/setup --model).  Starts three processes: llama.cpp's server
with SmolLM2-135M (tests/small_model.py, OpenAI-compatible), chatterd in front of it
(`--upstreams openai+http://.../v1`, its own embedded PostgreSQL in a temporary directory,
as scripts/run --with-small-model does), and nothing else: this process is the client.

Each turn is one short question (different every time, no history, its answer longer than
--max-tokens) asked both ways, with the same sampling (temperature 0):
  direct:   POST /v1/chat/completions to the model, stream: true; TTFT = request sent ->
            the first SSE chunk with delta.content;
  chatterd: POST /llmchat, stream: true, a new appID per turn (so the model is sent the
            same one message); TTFT = request sent -> the first `data:` event with
            message.content (chatterd has then begun the turn in PostgreSQL, called the
            model, translated its first chunk and relayed it).
The two alternate, and which goes first alternates too, so the model's drift and its
prompt cache favour neither.  Both go through the same raw-socket client, on a new
connection per request (`new`: a connect is counted both ways; chatterd keeps its own
connections to the model open) or on connections kept open between requests (`kept`:
what is left is chatterd's own work).  Added latency = chatterd's minus direct's, paired
per turn.  With --concurrency N, N clients do this at once (the model serves N requests in
parallel).  Turn time = request sent -> the whole response read (for chatterd: the turn
stored).  Each combination of --concurrency and --connections is one run of --turns turns.
"""

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jsonfmt  # noqa: E402
from tests import small_model  # noqa: E402

# Questions whose answers run past --max-tokens, so that both ways stream as many tokens.
QUESTIONS = ("Tell me a long story about a ship.", "Describe the sea in detail.",
             "Explain how bread is made, step by step.", "Write a long poem about rain.",
             "Describe a busy market in detail.", "Tell me a long story about a cat.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, seconds: float, proc: subprocess.Popen, what: str, log: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log, errors="replace") as f:
                tail = f.read()[-2000:]
            raise SystemExit(f"real_model: {what} exited ({proc.returncode}):\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"real_model: {what} did not start within {seconds:g} s (log: {log})")


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


class Timed:
    """One streamed request: when its first content arrived, when it ended, how many
    content events it had."""

    def __init__(self, content_of) -> None:
        self.content_of = content_of  # the text of one SSE `data:` payload, or None
        self.buffer = b""
        self.first = None
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        now = time.perf_counter()
        self.buffer += chunk.replace(b"\r\n", b"\n")
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                if self.content_of(jsonfmt.loads(payload)):
                    self.events += 1
                    if self.first is None:
                        self.first = now


def openai_content(chunk: dict):
    choices = chunk.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content")


def ollama_content(line: dict):
    return (line.get("message") or {}).get("content")


class Client:
    """HTTP/1.1 POSTs to one port on this machine: on a new connection each (kept=False, what
    a client that connects per request sees) or on one connection kept open between them."""

    def __init__(self, port: int, kept: bool) -> None:
        self.port = port
        self.kept = kept
        self.reader: "asyncio.StreamReader | None" = None
        self.writer: "asyncio.StreamWriter | None" = None

    async def post(self, path: str, body: dict, content_of) -> tuple[float, float, int]:
        """(TTFT, turn time, content events) of one streamed request, in seconds.  A kept
        connection is open before the clock starts; one the server closed meanwhile is
        opened again and the request sent again, on a clock started anew."""
        payload = jsonfmt.dumpb(body)
        request = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\nConnection: %s\r\n\r\n%s" % (
                       path.encode(), len(payload), b"keep-alive" if self.kept else b"close",
                       payload))
        for attempt in range(2):
            reused = self.writer is not None
            if self.kept and not reused:
                await self._connect()
            timed = Timed(content_of)
            started = time.perf_counter()
            if not self.kept:
                await self._connect()
            try:
                status, head = await self._exchange(request, timed)
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                self.close()
                if not (reused and attempt == 0):
                    raise
        ended = time.perf_counter()
        if not self.kept or b"connection: close" in head:
            self.close()
        if status != 200 or timed.first is None:
            raise SystemExit(f"real_model: POST {path} on port {self.port} answered {status} "
                             f"with no content")
        return timed.first - started, ended - started, timed.events

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def _exchange(self, request: bytes, timed: Timed) -> tuple[int, bytes]:
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                timed.feed((await reader.readexactly(size + 2))[:-2])
        elif b"content-length:" in head:
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            timed.feed(await reader.readexactly(length))
        else:
            timed.feed(await reader.read())
            head += b"connection: close\r\n"
        return status, head

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Bench:
    def __init__(self, model_port: int, chatterd_port: int, max_tokens: int, kept: bool) -> None:
        self.ports = model_port, chatterd_port
        self.kept = kept
        self.max_tokens = max_tokens
        self.run_id = os.urandom(4).hex()

    def question(self, n: int, way: str) -> str:
        return f"{QUESTIONS[n % len(QUESTIONS)]} ({way} {n})"

    async def direct(self, client: Client, n: int):
        return await client.post("/v1/chat/completions", {
            "model": small_model.MODEL_NAME, "stream": True, "temperature": 0, "seed": 1,
            "max_tokens": self.max_tokens, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": self.question(n, "d")}]}, openai_content)

    async def via_chatterd(self, client: Client, n: int):
        return await client.post("/llmchat", {
            "appID": f"real-model-{self.run_id}-{n}", "model": small_model.MODEL_NAME,
            "stream": True, "options": {"temperature": 0, "seed": 1, "num_predict": self.max_tokens},
            "messages": [{"role": "user", "content": self.question(n, "c")}]}, ollama_content)

    async def run(self, turns: int, concurrency: int, first: int) -> list:
        pairs: list = []
        next_turn = iter(range(first, first + turns))

        async def worker() -> None:
            model, chatterd = (Client(port, self.kept) for port in self.ports)
            try:
                for n in next_turn:
                    if n % 2:
                        via = await self.via_chatterd(chatterd, n)
                        direct = await self.direct(model, n)
                    else:
                        direct = await self.direct(model, n)
                        via = await self.via_chatterd(chatterd, n)
                    pairs.append((direct, via))
            finally:
                model.close()
                chatterd.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return pairs


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p * (len(values) - 1)))]


def report(pairs: list, label: str) -> None:
    ms = 1000.0
    direct_ttft = [d[0] * ms for d, _ in pairs]
    via_ttft = [v[0] * ms for _, v in pairs]
    added = [(v[0] - d[0]) * ms for d, v in pairs]
    direct_turn = [d[1] * ms for d, _ in pairs]
    via_turn = [v[1] * ms for _, v in pairs]
    added_turn = [(v[1] - d[1]) * ms for d, v in pairs]
    tokens = statistics.median([d[2] for d, _ in pairs]), statistics.median([v[2] for _, v in pairs])
    print(f"{len(pairs)} turns, {label}: TTFT added by chatterd p50 "
          f"{pct(added, 0.5):.1f} ms, p99 {pct(added, 0.99):.1f} ms (model's own TTFT p50 "
          f"{pct(direct_ttft, 0.5):.1f}, p99 {pct(direct_ttft, 0.99):.1f} ms; through chatterd p50 "
          f"{pct(via_ttft, 0.5):.1f}, p99 {pct(via_ttft, 0.99):.1f} ms)")
    print(f"{len(pairs)} turns, {label}: turn time direct p50 "
          f"{pct(direct_turn, 0.5):.1f} ms, through chatterd p50 {pct(via_turn, 0.5):.1f} ms, "
          f"added p50 {pct(added_turn, 0.5):.1f} ms, p99 {pct(added_turn, 0.99):.1f} ms "
          f"(content events per reply: {tokens[0]:g} direct, {tokens[1]:g} through chatterd)")


async def measure(args, model_port: int, chatterd_port: int) -> None:
    # The warm-up loads the model and teaches chatterd the model's name (/v1/models).
    await Bench(model_port, chatterd_port, args.max_tokens, False).run(args.warmup, 1, 0)
    first = args.warmup
    for connections in args.connections:
        bench = Bench(model_port, chatterd_port, args.max_tokens, connections == "kept")
        for concurrency in args.concurrency:
            pairs = await bench.run(args.turns, concurrency, first)
            first += args.turns
            report(pairs, f"{concurrency} at a time, {connections} connections")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=100, help="turns per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16, help="reply tokens at most")
    parser.add_argument("--concurrency", default="1,4",
                        help="comma list: clients at once, one run each")
    parser.add_argument("--connections", default="new,kept",
                        help="comma list of new (one per request, both ways) and kept (each "
                             "client keeps one to the model and one to chatterd): one run each")
    parser.add_argument("--warmup", type=int, default=6, help="untimed turns first")
    parser.add_argument("--threads", type=int, default=1, help="the model's CPU threads")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.connections = args.connections.split(",")
    if not set(args.connections) <= {"new", "kept"}:
        raise SystemExit("real_model: --connections takes new, kept or both")
    if not small_model.available():
        raise SystemExit("real_model: the small model is not installed (scripts/setup --model)")

    model_port, chatterd_port = free_port(), free_port()
    work = tempfile.mkdtemp(prefix="chatterd-real-model-")
    data_dir, model_log, chatterd_log = (os.path.join(work, name)
                                         for name in ("pgdata", "model.log", "chatterd.log"))
    procs: list[subprocess.Popen] = []
    try:
        model = subprocess.Popen(
            [sys.executable, "-m", "tests.small_model", f"--port={model_port}",
             f"--threads={args.threads}", f"--parallel={max(args.concurrency)}",
             f"--ctx={1024 * max(args.concurrency)}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(model_log, "wb"))
        procs.append(model)
        wait_until(lambda: answers(f"http://127.0.0.1:{model_port}/health"), 120, model,
                   "the small model", model_log)
        chatterd = subprocess.Popen(
            [sys.executable, str(ROOT / "chatterd.py"), f"--port={chatterd_port}",
             "--address=127.0.0.1", f"--data-dir={data_dir}",
             f"--upstreams=openai+http://127.0.0.1:{model_port}/v1"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(chatterd_log, "wb"))
        procs.append(chatterd)
        wait_until(lambda: answers(f"http://127.0.0.1:{chatterd_port}/readyz"), 120, chatterd,
                   "chatterd", chatterd_log)
        asyncio.run(measure(args, model_port, chatterd_port))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
