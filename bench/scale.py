"""Scale benchmark: N concurrent slow streams in one chatterd process.

    .venv/bin/python bench/scale.py [--streams 10000] [--tokens 20] [--interval 1.0] [--ramp 10]

Starts a real chatterd (embedded PostgreSQL in a temporary directory, --max-streams >= N)
in front of a minimal upstream (its own process, so each bench process holds one socket per
stream) that writes one NDJSON line per --interval seconds, each line carrying the
CLOCK_MONOTONIC time it was written.  This process opens N raw-socket clients, their starts
spread evenly over --ramp seconds, each with its own appID.  Reported:
  completed: 200, every line and the final one as `data:` events, no error event, within
             the stream's deadline (ramp slot + tokens x interval + --slack); failures by reason;
  RSS/stream: (chatterd's VmRSS when the most streams were open - its VmRSS at idle after a
             warm-up) / streams open then; the peak VmRSS (often later: freed memory is
             not handed back) is shown too;
  relay latency: upstream write (stamp in the line) -> client read, p50/p99/max over all events;
  CPU: % of one core over the scenario for chatterd, the client process and the upstream.

The upstream is bench/scale_upstream.py.  The bench's own processes (the clients, the
upstream) run without Python's cyclic garbage
collector: with 10,000 sockets open, the clients' collections paused them for 20-60 ms
(young generations) and 100-195 ms (full ones), each pause counted as relay latency of
every event read late because of it.  Everything they allocate for a run is freed with it.
"""

import argparse
import asyncio
import collections
import errno
import gc
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from procstat import (cpu_seconds, nofile_limit, open_fds, postgres_cpu, raise_nofile, self_cpu,
                      status_kib)
from scale_upstream import STAMP

ROOT = Path(__file__).resolve().parent.parent

# ---- the clients ---------------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.ok = 0
        self.failures = collections.Counter()
        self.latencies_us: list[int] = []  # upstream write -> client read, per event
        self.stamps_ns: list[int] = []     # and when the upstream wrote it
        self.last_begun_ns = 0                 # when the last stream got its first event
        self.first_end_ns: int | None = None   # when the first stream ended (or failed)
        self.open = 0
        self.ttft: list[float] = []

    def ended(self, at_ns: int) -> None:
        if self.first_end_ns is None or at_ns < self.first_end_ns:
            self.first_end_ns = at_ns


async def stream(port: int, app_id: str, tokens: int, interval: float, stats: Stats) -> None:
    body = (b'{"appID":"%s","model":"bench","stream":true,"messages":[{"role":"user",'
            b'"content":"go"}],"options":{"tokens":%d,"interval":%s}}'
            % (app_id.encode(), tokens, repr(interval).encode()))
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        stats.failures[f"connect: {errno.errorcode.get(e.errno, e)}"] += 1
        return
    events = 0
    done = False
    error = None
    stats.open += 1
    try:
        writer.write(b"POST /llmchat HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            stats.failures[f"status {status.decode()}"] += 1
            return
        tail = b""
        latencies, stamps = stats.latencies_us, stats.stamps_ns
        while data := await reader.read(1 << 16):
            now = time.monotonic_ns()
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if line.startswith(b"data: "):
                    if events == 0:
                        stats.ttft.append(time.monotonic() - started)
                        stats.last_begun_ns = max(stats.last_begun_ns, now)
                    events += 1
                    at = line.find(STAMP)
                    if at >= 0:
                        end = line.index(b" ", at)
                        stamp = int(line[at + len(STAMP):end])
                        latencies.append((now - stamp) // 1000)
                        stamps.append(stamp)
                    elif b'"done":true' in line:
                        done = True
                        stats.ended(now)
                    elif error == "":
                        error = line[6:86].decode(errors="replace")
                elif line.startswith(b"event: error"):
                    error = ""
        if error is not None:
            stats.failures[f"error event: {error}"] += 1
        elif not done or events != tokens + 1:
            stats.failures[f"incomplete ({'done' if done else 'no done line'})"] += 1
        else:
            stats.ok += 1
    except asyncio.CancelledError:
        stats.failures[f"deadline ({events} events by then)" if events else
                       "deadline (no event)"] += 1
    except (OSError, asyncio.IncompleteReadError) as e:
        stats.failures[f"connection: {type(e).__name__}"] += 1
    finally:
        stats.open -= 1
        if not done:
            stats.ended(time.monotonic_ns())
        writer.close()


async def bounded_stream(port, app_id, tokens, interval, deadline, stats) -> None:
    task = asyncio.ensure_future(stream(port, app_id, tokens, interval, stats))
    done, _ = await asyncio.wait([task], timeout=deadline)
    if not done:
        task.cancel()
        await asyncio.wait([task])


def percentile(sorted_values, p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


async def run_streams(proc, port, args, name: str, idle_kib: int | None) -> dict:
    stats = Stats()
    samples = []  # (rss KiB, open streams, fds, chatterd CPU-s, monotonic)
    stop = asyncio.Event()

    async def sample():
        while not stop.is_set():
            samples.append((status_kib(proc.pid, "VmRSS"), stats.open, open_fds(proc.pid),
                            cpu_seconds(proc.pid), time.monotonic()))
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.ensure_future(sample())
    cpu0 = (cpu_seconds(proc.pid), self_cpu(), cpu_seconds(args.upstream_pid),
            postgres_cpu(args.data_dir))
    t0 = time.monotonic()
    tasks = []
    per_stream = args.tokens * args.interval + args.slack
    for i in range(args.streams):
        due = t0 + i * args.ramp / args.streams
        if (delay := due - time.monotonic()) > 0.005:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(bounded_stream(
            port, f"{name}-{os.getpid()}-{i}", args.tokens, args.interval,
            per_stream, stats)))
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t0
    cpu1 = (cpu_seconds(proc.pid), self_cpu(), cpu_seconds(args.upstream_pid),
            postgres_cpu(args.data_dir))
    stop.set()
    await sampler
    lat = sorted(stats.latencies_us)
    # Steady state: every stream open, from the last one's first event (its turn has begun)
    # to the first one's end (done, or failed), so no turn begins or ends; what is left is
    # relaying lines.
    steady_from = stats.last_begun_ns
    steady_to = stats.first_end_ns or 0
    steady = sorted(l for l, s in zip(stats.latencies_us, stats.stamps_ns)
                    if steady_from <= s <= steady_to)
    peak = max(samples, key=lambda s: s[0])
    full = max(samples, key=lambda s: (s[1], -s[0]))  # the most streams open (least RSS of those)
    result = {
        "name": name, "streams": args.streams, "ok": stats.ok, "failures": stats.failures,
        "wall": wall, "events": len(lat),
        "p50": percentile(lat, 0.50) / 1000 if lat else float("nan"),
        "p99": percentile(lat, 0.99) / 1000 if lat else float("nan"),
        "max": lat[-1] / 1000 if lat else float("nan"),
        "steady_events": len(steady),
        "steady_s": max(0.0, (steady_to - steady_from) / 1e9),
        "steady_p50": percentile(steady, 0.50) / 1000 if steady else float("nan"),
        "steady_p99": percentile(steady, 0.99) / 1000 if steady else float("nan"),
        "ttft_p99": percentile(sorted(stats.ttft), 0.99) if stats.ttft else float("nan"),
        "max_open": max(s[1] for s in samples), "max_fds": max(s[2] for s in samples),
        "peak_kib": peak[0], "open_at_peak": peak[1], "full_kib": full[0], "open_full": full[1],
        "cpu": [(b - a) / wall * 100 for a, b in zip(cpu0, cpu1)],
        "cpu_peak": max(((b[3] - a[3]) / (b[4] - a[4]) * 100
                         for a, b in zip(samples, samples[4:])), default=0.0),
    }
    if idle_kib is not None and full[1]:
        result["per_stream_kib"] = (full[0] - idle_kib) / full[1]
    return result


def report(r: dict, idle_kib: int) -> None:
    failures = ", ".join(f"{n} {reason}" for reason, n in r["failures"].most_common()) or "none"
    print(f"{r['name']}: {r['ok']}/{r['streams']} completed in {r['wall']:.1f} s "
          f"(failures: {failures}); at most {r['max_open']} open at once, chatterd fds <= "
          f"{r['max_fds']}")
    if "per_stream_kib" in r:
        print(f"  chatterd RSS idle {idle_kib / 1024:.1f} MiB, {r['full_kib'] / 1024:.1f} MiB with "
              f"{r['open_full']} streams open: {r['per_stream_kib']:.1f} KiB per open stream "
              f"(peak {r['peak_kib'] / 1024:.1f} MiB, with {r['open_at_peak']} open)")
    print(f"  relay latency over {r['events']} events: p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms,"
          f" max {r['max']:.1f} ms; first event p99 {r['ttft_p99'] * 1000:.0f} ms after connecting")
    print(f"  with every stream open ({r['steady_s']:.0f} s, no turn starting or ending): "
          f"{r['steady_events']} events, p50 {r['steady_p50']:.2f} ms, p99 {r['steady_p99']:.2f} ms")
    c, me, up, pg = r["cpu"]
    print(f"  CPU (% of one core over the run): chatterd {c:.0f}%, clients (this process) "
          f"{me:.0f}%, upstream {up:.0f}%, PostgreSQL {pg:.0f}%; chatterd's busiest second "
          f"{r['cpu_peak']:.0f}%")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=None,
                        help="lines per stream (+ the done line); default max(20, ramp + 10), so "
                             "every stream is open at once")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a stream's lines")
    parser.add_argument("--ramp", type=float, default=None,
                        help="seconds over which streams start; default streams / 250 (chatterd "
                             "begins about 250-300 turns per second on this 2-core VM)")
    parser.add_argument("--slack", type=float, default=15.0,
                        help="seconds a stream may take beyond tokens x interval")
    parser.add_argument("--db-pool-size", type=int, default=10)
    parser.add_argument("--no-fit", action="store_true",
                        help="run every stream even beyond chatterd's open-file limit (the "
                             "default runs as many as fit, and says so)")
    args = parser.parse_args()
    if args.ramp is None:
        args.ramp = max(2.0, args.streams / 250)
    if args.tokens is None:
        args.tokens = max(20, int(args.ramp / args.interval) + 10)
    hard = raise_nofile()

    up = subprocess.Popen([sys.executable, str(Path(__file__).with_name("scale_upstream.py"))],
                          stdout=subprocess.PIPE)
    up_port = int(up.stdout.readline())
    args.upstream_pid = up.pid
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = args.data_dir = tempfile.mkdtemp(prefix="chatterd-scale-")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "chatterd.py"), f"--port={port}", f"--data-dir={data_dir}",
        f"--ollama-url=http://127.0.0.1:{up_port}", f"--max-streams={args.streams + 16}",
        f"--db-pool-size={args.db_pool_size}", stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, cwd=ROOT)
    while b"chatterd listening" not in (line := await proc.stderr.readline()):
        if not line:
            raise SystemExit("chatterd did not start")
    warnings = collections.Counter()

    async def read_log():
        while line := await proc.stderr.readline():
            if b" WARNING " in line or b" ERROR " in line:
                text = line.decode(errors="replace").split(": ", 1)[-1].strip()
                text = re.sub(r"appID='[^']*' |\d[\d.]*(ms)?", "", text)
                warnings[text[:110]] += 1

    logger = asyncio.ensure_future(read_log())
    try:
        warm = argparse.Namespace(**{**vars(args), "streams": 50, "tokens": 5, "interval": 0.05,
                                     "ramp": 0.5})
        await run_streams(proc, port, warm, "warm-up", None)
        await asyncio.sleep(1.0)
        idle_kib, idle_fds = status_kib(proc.pid, "VmRSS"), open_fds(proc.pid)
        print(f"open-file limit: bench {hard}, chatterd {nofile_limit(proc.pid)} (soft/hard), "
              f"chatterd holds {idle_fds} fds at idle; each stream takes 2 more")
        limit = int(nofile_limit(proc.pid).split("/")[0])
        fits = (limit - idle_fds - 24) // 2  # spare: the pool may open connections
        if args.streams > fits and not args.no_fit:
            print(f"{args.streams} streams do not fit under chatterd's open-file limit {limit} "
                  f"(two sockets each): running the {fits} that do (--no-fit: all of them)")
            args.streams = fits
        print(f"{args.streams} streams of {args.tokens} lines, one per {args.interval:g} s, "
              f"started over {args.ramp:g} s")
        r = await run_streams(proc, port, args, f"{args.streams} slow streams", idle_kib)
        report(r, idle_kib)
        for text, n in warnings.most_common(5):
            print(f"  chatterd logged {n}x: {text}")
    finally:
        proc.terminate()
        await proc.wait()
        logger.cancel()
        up.terminate()
        up.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    gc.disable()  # (see the docstring: its pauses are not chatterd's latency)
    uvloop.install()
    asyncio.run(main())
