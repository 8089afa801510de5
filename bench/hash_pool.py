"""Password hashing cost and the event loop's freedom while it runs (accounts/passwords.py).

    .venv/bin/python bench/hash_pool.py [--workers 2] [--concurrent 50] [--rounds 3]

Prints, for each event loop: the time of one Argon2id hash at the default parameters (inside
the worker, and the round trip as a caller sees it), then, for each round, the largest gap
between the wake-ups of a 5 ms loop ticker while `--concurrent` hash requests run at once, and
that gap less the time the process spent ready to run but waiting for a CPU (/proc/self/schedstat:
the part the loop itself is answerable for, on a machine other work shares).
"""

import argparse
import asyncio
import os
import statistics
import sys
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from accounts.passwords import PasswordHasher  # noqa: E402


def runqueue_wait() -> float:
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


async def measure(workers: int, concurrent: int, rounds: int) -> None:
    async with PasswordHasher(workers=workers, max_waiting=concurrent) as hasher:
        inside, round_trip = [], []
        for i in range(20):
            start = time.perf_counter()
            reply = await hasher._request("hash", f"secret-{i}")
            round_trip.append(time.perf_counter() - start)
            inside.append(reply["finished"] - reply["started"])
        print(f"  one hash: {statistics.median(inside) * 1000:.1f} ms in the worker, "
              f"{statistics.median(round_trip) * 1000:.1f} ms round trip (medians of 20)")
        loop = asyncio.get_running_loop()
        for _ in range(rounds):
            gaps: list[float] = []
            held: list[float] = []
            done = False

            async def ticker() -> None:
                last, last_wait = loop.time(), runqueue_wait()
                while not done:
                    await asyncio.sleep(0.005)
                    now, wait = loop.time(), runqueue_wait()
                    gaps.append(now - last)
                    held.append(now - last - (wait - last_wait))
                    last, last_wait = now, wait

            ticking = asyncio.ensure_future(ticker())
            start = time.perf_counter()
            await asyncio.gather(*(hasher.hash(f"secret-{i}") for i in range(concurrent)))
            elapsed = time.perf_counter() - start
            done = True
            await ticking
            print(f"  {concurrent} concurrent hashes on {workers} workers: {elapsed * 1000:.0f} ms, "
                  f"{len(gaps)} ticks of 5 ms, largest gap {max(gaps) * 1000:.1f} ms, "
                  f"median {statistics.median(gaps) * 1000:.1f} ms; less waiting for a CPU: "
                  f"largest {max(held) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name, new_loop in (("uvloop", uvloop.new_event_loop), ("asyncio", asyncio.new_event_loop)):
        print(name)
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(measure(args.workers, args.concurrent, args.rounds))


if __name__ == "__main__":
    main()
