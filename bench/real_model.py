"""The relay's added latency on a real model: time to first token and turn time, straight
to llama.cpp's server and through chatterd, turn by turn.

    .venv/bin/python bench/real_model.py [--turns 100] [--max-tokens 16] [--concurrency 1,4]

Needs the small model (scripts/setup --model).  Starts three processes: llama.cpp's server
with SmolLM2-135M (tests/small_model.py, OpenAI-compatible), chatterd in front of it
(`--upstreams openai+http://.../v1`, its own embedded PostgreSQL in a temporary directory,
as scripts/run --with-small-model does), and nothing else: this process is the client.

Each turn is one short question (different every time, no history) asked both ways, with
the same sampling (temperature 0, --max-tokens tokens at most):
  direct:   POST /v1/chat/completions to the model, stream: true; TTFT = request sent ->
            the first SSE chunk with delta.content;
  chatterd: POST /llmchat, stream: true, a new appID per turn (so the model is sent the
            same one message); TTFT = request sent -> the first `data:` event with
            message.content (chatterd has then begun the turn in PostgreSQL, called the
            model, translated its first chunk and relayed it).
The two alternate, and which goes first alternates too, so the model's drift and its
prompt cache favour neither.  Both use a new connection per request, on the same client.
Added latency = chatterd's minus direct's, paired per turn.  With --concurrency N (a
list: one run each), N clients do this at once (the model serves N requests in parallel).
Turn time = request sent -> the whole response read (for chatterd: the turn stored).
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

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jsonfmt  # noqa: E402
from tests import small_model  # noqa: E402

QUESTIONS = ("Name a colour.", "Say hello.", "Name a fruit.", "Count to three.",
             "Name an animal.", "Say a number.")


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


async def one(client: AsyncHTTPClient, url: str, body: dict, content_of) -> tuple[float, float, int]:
    """(TTFT, turn time, content events) of one streamed request, in seconds."""
    timed = Timed(content_of)
    started = time.perf_counter()
    response = await client.fetch(HTTPRequest(
        url, method="POST", body=jsonfmt.dumps(body), streaming_callback=timed.feed,
        headers={"Content-Type": "application/json"}, request_timeout=120))
    ended = time.perf_counter()
    if response.code != 200 or timed.first is None:
        raise SystemExit(f"real_model: {url} answered {response.code} with no content")
    return timed.first - started, ended - started, timed.events


class Bench:
    def __init__(self, model_port: int, chatterd_port: int, max_tokens: int) -> None:
        self.direct_url = f"http://127.0.0.1:{model_port}/v1/chat/completions"
        self.chatterd_url = f"http://127.0.0.1:{chatterd_port}/llmchat"
        self.max_tokens = max_tokens
        self.client = AsyncHTTPClient(force_instance=True, max_clients=64)
        self.run_id = os.urandom(4).hex()

    def question(self, n: int, way: str) -> str:
        return f"{QUESTIONS[n % len(QUESTIONS)]} ({way} {n})"

    async def direct(self, n: int):
        return await one(self.client, self.direct_url, {
            "model": small_model.MODEL_NAME, "stream": True, "temperature": 0, "seed": 1,
            "max_tokens": self.max_tokens, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": self.question(n, "d")}]}, openai_content)

    async def via_chatterd(self, n: int):
        return await one(self.client, self.chatterd_url, {
            "appID": f"real-model-{self.run_id}-{n}", "model": small_model.MODEL_NAME,
            "stream": True, "options": {"temperature": 0, "seed": 1, "num_predict": self.max_tokens},
            "messages": [{"role": "user", "content": self.question(n, "c")}]}, ollama_content)

    async def pair(self, n: int):
        if n % 2:
            via = await self.via_chatterd(n)
            direct = await self.direct(n)
        else:
            direct = await self.direct(n)
            via = await self.via_chatterd(n)
        return direct, via

    async def run(self, turns: int, concurrency: int, first: int) -> list:
        pairs: list = []
        next_turn = iter(range(first, first + turns))

        async def worker() -> None:
            for n in next_turn:
                pairs.append(await self.pair(n))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return pairs


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p * (len(values) - 1)))]


def report(pairs: list, concurrency: int) -> None:
    ms = 1000.0
    direct_ttft = [d[0] * ms for d, _ in pairs]
    via_ttft = [v[0] * ms for _, v in pairs]
    added = [(v[0] - d[0]) * ms for d, v in pairs]
    direct_turn = [d[1] * ms for d, _ in pairs]
    via_turn = [v[1] * ms for _, v in pairs]
    added_turn = [(v[1] - d[1]) * ms for d, v in pairs]
    tokens = statistics.median([d[2] for d, _ in pairs]), statistics.median([v[2] for _, v in pairs])
    print(f"{len(pairs)} turns, {concurrency} at a time: TTFT added by chatterd p50 "
          f"{pct(added, 0.5):.1f} ms, p99 {pct(added, 0.99):.1f} ms (model's own TTFT p50 "
          f"{pct(direct_ttft, 0.5):.1f}, p99 {pct(direct_ttft, 0.99):.1f} ms; through chatterd p50 "
          f"{pct(via_ttft, 0.5):.1f}, p99 {pct(via_ttft, 0.99):.1f} ms)")
    print(f"{len(pairs)} turns, {concurrency} at a time: turn time direct p50 "
          f"{pct(direct_turn, 0.5):.1f} ms, through chatterd p50 {pct(via_turn, 0.5):.1f} ms, "
          f"added p50 {pct(added_turn, 0.5):.1f} ms, p99 {pct(added_turn, 0.99):.1f} ms "
          f"(content events per reply: {tokens[0]:g} direct, {tokens[1]:g} through chatterd)")


async def measure(args, model_port: int, chatterd_port: int) -> None:
    bench = Bench(model_port, chatterd_port, args.max_tokens)
    await bench.run(args.warmup, 1, 0)  # loads the model, teaches chatterd its model list
    first = args.warmup
    for concurrency in args.concurrency:
        pairs = await bench.run(args.turns, concurrency, first)
        first += args.turns
        report(pairs, concurrency)
    bench.client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=100, help="turns per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16, help="reply tokens at most")
    parser.add_argument("--concurrency", default="1,4",
                        help="comma list: clients at once, one run each")
    parser.add_argument("--warmup", type=int, default=6, help="untimed turns first")
    parser.add_argument("--threads", type=int, default=1, help="the model's CPU threads")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
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
