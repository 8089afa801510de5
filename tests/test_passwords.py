"""accounts/passwords.py: Argon2id in real worker processes, on the standard event loop and on uvloop.

Every test also holds the design's promise that no thread is ever started (the standard loop's
asyncio.create_subprocess_exec would start one per child on Python 3.11)."""

import asyncio
import os
import signal
import statistics
import sys
import threading
import time
from typing import Awaitable, Callable

import pytest
import uvloop

from accounts.passwords import (HasherBusy, HasherClosed, HasherUnavailable, InvalidStoredHash,
                                PasswordHasher, WorkerDied)

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
OWASP = "$argon2id$v=19$m=19456,t=2,p=1$"


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable], object]:
    def run(coroutine: Awaitable) -> object:
        global _threads_before
        # Threads that earlier tests of the run left (a loop's resolver pool winding down) are
        # not this test's; any other is.
        _threads_before = threads()
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            result = runner.run(coroutine)
        assert_no_thread()
        return result
    return run


_threads_before: set = set()


def threads() -> set:
    """The Python threads and the kernel's tasks (native threads too) of this process."""
    return set(threading.enumerate()) | {f"task {t}" for t in os.listdir("/proc/self/task")}


def assert_no_thread() -> None:
    started = threads() - _threads_before
    assert not started, f"threads started: {started}"


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until condition holds (state this process changes, so a few turns do)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def hash_workers_of_this_process() -> list[int]:
    """Live (not yet reaped) children of this process that run accounts.hash_worker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == os.getpid() and b"accounts.hash_worker" in cmdline:
            found.append(int(entry))
    return found


def test_hash_and_verify_any_unicode_up_to_1024_characters(run) -> None:
    passwords = ["correct horse battery staple", "pässwörd-пароль-密码-🔑",
                 "e\u0301" * 4 + "\u00e9" * 4,
                 "x" * 1024, "é" * 1024, "🔑" * 1024, "\x00\n\"{}\\"]

    async def main() -> None:
        async with PasswordHasher() as hasher:
            assert_no_thread()
            hashes = await asyncio.gather(*(hasher.hash(p) for p in passwords))
            for password, stored in zip(passwords, hashes):
                assert stored.startswith(OWASP), stored
                assert await hasher.verify(stored, password) == (True, None)
                other = password[:-1] + chr(ord(password[-1]) ^ 1)  # the last character changed
                assert await hasher.verify(stored, other) == (False, None)
                assert await hasher.verify(stored, password[:-1]) == (False, None)
            assert len(set(hashes)) == len(hashes)
            assert hashes[0] != await hasher.hash(passwords[0])  # salted
            # Normalization is the caller's business: NFD and NFC forms are different passwords.
            assert await hasher.verify(hashes[2], "\u00e9" * 8) == (False, None)

    run(main())


def test_text_that_is_not_unicode_or_too_long_is_refused_before_any_worker_sees_it(run) -> None:
    async def main() -> None:
        async with PasswordHasher(workers=1) as hasher:
            stored = await hasher.hash("secret-1")
            for call in (hasher.hash, hasher.dummy_verify, lambda p: hasher.verify(stored, p)):
                with pytest.raises(ValueError) as raised:
                    await call("secret-\ud800-x")
                assert "secret" not in str(raised.value) and "\ud800" not in str(raised.value)
                with pytest.raises(ValueError):
                    await call("🔑" * 1025)
                with pytest.raises(TypeError):
                    await call(b"secret")
            assert hasher._ids.__next__() == 2  # only the first hash was ever sent

    run(main())


def test_a_hash_argon2_cannot_check_raises_invalid_stored_hash(run) -> None:
    async def main() -> None:
        async with PasswordHasher(workers=1) as hasher:
            stored = await hasher.hash("secret-1")
            # (Not a truncated hash: one in 16 still decodes, as a shorter hash that simply mismatches.)
            for bad in ["", "not a hash", stored.rsplit("$", 1)[0], stored[:-5] + "!!!!!",
                        stored.replace("argon2id", "argon2xx"), stored.replace("m=19456", "m=abc"), "é" * 10,
                        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$" + "A" * 600, None]:
                with pytest.raises(InvalidStoredHash):
                    await hasher.verify(bad, "secret-1")
            assert await hasher.verify(stored, "secret-1") == (True, None)

    run(main())


def test_a_hash_of_other_parameters_is_replaced_at_a_match(run) -> None:
    async def main() -> None:
        async with PasswordHasher(workers=1, memory_cost=8192, time_cost=1) as weak:
            old = await weak.hash("secret-1")
        assert old.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
        async with PasswordHasher(workers=1) as hasher:
            assert await hasher.verify(old, "wrong-1") == (False, None)  # no new hash without a match
            ok, new = await hasher.verify(old, "secret-1")
            assert ok and new is not None and new.startswith(OWASP)
            assert await hasher.verify(new, "secret-1") == (True, None)
            assert await hasher.verify(new, "wrong-1") == (False, None)

    run(main())


def test_dummy_verify_costs_what_a_wrong_password_costs(run) -> None:
    async def main() -> tuple[float, float]:
        async with PasswordHasher(workers=1) as hasher:
            stored = await hasher.hash("secret-1")
            verify, dummy = [], []
            for _ in range(5):  # alternated, so that a slow moment of the box hits both alike
                start = time.perf_counter()
                assert await hasher.verify(stored, "wrong-1") == (False, None)
                verify.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert await hasher.dummy_verify("wrong-1") is None
                dummy.append(time.perf_counter() - start)
            return statistics.median(verify), statistics.median(dummy)

    verify, dummy = run(main())
    print(f"median verify {verify * 1000:.1f} ms, dummy_verify {dummy * 1000:.1f} ms")
    assert 0.5 < dummy / verify < 2


def test_each_worker_hashes_one_at_a_time_and_callers_wait_in_order(run) -> None:
    async def main() -> None:
        async with PasswordHasher(workers=2) as hasher:
            pids = set(hasher.pids)
            replies = await asyncio.gather(*(hasher._request("hash", f"secret-{i}") for i in range(6)))
            assert {r["pid"] for r in replies} == pids
            for pid in pids:
                spans = sorted((r["started"], r["finished"]) for r in replies if r["pid"] == pid)
                assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
            events = sorted([(r["started"], 1) for r in replies] + [(r["finished"], -1) for r in replies])
            running = [sum(e for _, e in events[:i + 1]) for i in range(len(events))]
            assert max(running) == 2, running

        async with PasswordHasher(workers=1) as hasher:
            tasks = []
            for i in range(5):
                tasks.append(asyncio.ensure_future(hasher._request("hash", f"secret-{i}")))
                await until(lambda: len(hasher._waiters) == i, "the caller is queued")  # arrival order known
            replies = await asyncio.gather(*tasks)
            assert [r["started"] for r in replies] == sorted(r["started"] for r in replies)

    run(main())


def test_beyond_max_waiting_callers_get_hasher_busy_at_once(run) -> None:
    async def main() -> None:
        async with PasswordHasher(workers=1, max_waiting=2) as hasher:
            tasks = [asyncio.ensure_future(hasher.hash(f"secret-{i}")) for i in range(3)]
            await until(lambda: len(hasher._waiters) == 2, "two callers wait")
            with pytest.raises(HasherBusy):
                await hasher.hash("secret-4")
            assert len(await asyncio.gather(*tasks)) == 3
            await hasher.hash("secret-5")  # the queue drained: accepted again

    run(main())


def test_a_cancelled_caller_neither_leaks_its_worker_nor_gets_answers_crossed(run) -> None:
    async def main() -> None:
        async with PasswordHasher(workers=1) as hasher:
            running = asyncio.ensure_future(hasher.hash("secret-1"))
            await until(lambda: not hasher._idle, "the worker is busy")
            waiting = asyncio.ensure_future(hasher.hash("secret-2"))
            await until(lambda: len(hasher._waiters) == 1, "the second caller waits")
            waiting.cancel()
            running.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
            assert not hasher._waiters
            # The worker still computes secret-1's hash; the next caller must get its own.
            stored = await hasher.hash("secret-3")
            assert await hasher.verify(stored, "secret-3") == (True, None)
            assert await hasher.verify(stored, "secret-1") == (False, None)

    run(main())


def test_a_killed_worker_fails_its_request_at_once_and_is_replaced(run) -> None:
    async def main() -> None:
        # A hash of about a second, so that "at once" is far from "when the hash would be done".
        async with PasswordHasher(workers=2, time_cost=100) as hasher:
            start = time.perf_counter()
            await hasher.hash("secret-1")
            duration = time.perf_counter() - start
            request = asyncio.ensure_future(hasher._request("hash", "secret-2"))
            await until(lambda: len(hasher._idle) == 1, "one worker is busy")
            [busy] = hasher._workers - set(hasher._idle)
            victim = busy.pid
            killed = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(WorkerDied, match=str(victim)):
                await asyncio.wait_for(request, 10)
            failed_after = time.perf_counter() - killed
            print(f"hash {duration * 1000:.0f} ms; the killed worker's request failed after "
                  f"{failed_after * 1000:.1f} ms")
            assert failed_after < duration / 2
            assert await asyncio.wait_for(busy.exited, 10) == -signal.SIGKILL
            assert victim not in hash_workers_of_this_process()  # reaped, no zombie
            reply = await hasher._request("hash", "secret-3")
            assert reply["pid"] != victim
            await asyncio.wait_for(asyncio.gather(*hasher._replacing), 30)  # the replacement is ready
            assert len(hasher.pids) == 2 and victim not in hasher.pids
            assert_no_thread()

    run(main())


def test_a_worker_that_does_not_answer_in_time_is_killed_and_replaced(run) -> None:
    async def main() -> None:
        async with PasswordHasher(workers=1, timeout=0.3) as hasher:
            [stuck] = hasher._workers
            os.kill(stuck.pid, signal.SIGSTOP)
            start = time.perf_counter()
            with pytest.raises(WorkerDied, match="did not answer within 0.3 s"):
                await asyncio.wait_for(hasher.hash("secret-1"), 10)
            assert 0.3 <= time.perf_counter() - start < 5
            assert await asyncio.wait_for(stuck.exited, 10) == -signal.SIGKILL
            assert stuck.pid not in hash_workers_of_this_process()
            stored = await hasher.hash("secret-2")
            assert await hasher.verify(stored, "secret-2") == (True, None)

    run(main())


def test_a_worker_that_answers_out_of_turn_is_killed(run) -> None:
    # A stand-in worker: ready, then an answer to a request it was never given.
    fake = ('import sys; print(\'{"ready": true}\', flush=True); sys.stdin.readline(); '
            'print(\'{"id": 999, "hash": "x"}\', flush=True); sys.stdin.read()')

    async def main() -> None:
        hasher = PasswordHasher(workers=1)
        hasher._command = [sys.executable, "-c", fake]
        async with hasher:
            [rogue] = hasher._workers
            with pytest.raises(WorkerDied, match="answered a request it was not given"):
                await asyncio.wait_for(hasher.hash("secret-1"), 10)
            assert await asyncio.wait_for(rogue.exited, 10) == -signal.SIGKILL
            assert rogue.pid not in hash_workers_of_this_process()

    run(main())


def test_when_no_worker_can_start_callers_fail_instead_of_hanging(run) -> None:
    async def main() -> None:
        async with PasswordHasher(workers=1) as hasher:
            command = hasher._command
            hasher._command = [sys.executable, "-c", "raise SystemExit(3)"]
            [worker] = hasher._workers
            os.kill(worker.pid, signal.SIGKILL)
            await asyncio.wait_for(worker.exited, 10)
            for _ in range(3):
                with pytest.raises(HasherUnavailable):
                    await asyncio.wait_for(hasher.hash("secret-1"), 10)
            hasher._command = command  # the next retry starts a worker again
            await asyncio.wait_for(asyncio.gather(*hasher._replacing), 10)
            assert await hasher.verify(await hasher.hash("secret-2"), "secret-2") == (True, None)

    run(main())


def test_close_fails_pending_requests_and_leaves_no_child_process(run) -> None:
    async def main() -> None:
        hasher = PasswordHasher(workers=2, max_waiting=8)
        await hasher.start()
        pids = hasher.pids
        assert sorted(hash_workers_of_this_process()) == pids
        tasks = [asyncio.ensure_future(hasher.hash(f"secret-{i}")) for i in range(6)]
        await until(lambda: len(hasher._waiters) == 4, "two run, four wait")
        await hasher.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, HasherClosed) for r in results), results
        assert hash_workers_of_this_process() == []
        for pid in pids:
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # already reaped by close()
        with pytest.raises(HasherClosed):
            await hasher.hash("secret-1")
        await hasher.close()  # twice is harmless

    run(main())


def runqueue_wait() -> float:
    """Seconds this (single-threaded) process has spent ready to run but waiting for a CPU."""
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def test_the_event_loop_keeps_ticking_while_hashes_run(run) -> None:
    async def main() -> tuple[float, float]:
        async with PasswordHasher() as hasher:
            loop = asyncio.get_running_loop()
            gaps, held = [], []
            done = False

            async def ticker() -> None:
                last, last_wait = loop.time(), runqueue_wait()
                while not done:
                    await asyncio.sleep(0.005)
                    now, wait = loop.time(), runqueue_wait()
                    gaps.append(now - last)
                    # The part of the gap that the loop itself is answerable for: on a shared
                    # machine the scheduler may keep a ready process off the CPUs for a while.
                    held.append(now - last - (wait - last_wait))
                    last, last_wait = now, wait
                    assert_no_thread()

            ticking = asyncio.ensure_future(ticker())
            start = time.perf_counter()
            hashes = await asyncio.gather(*(hasher.hash(f"secret-{i}") for i in range(20)))
            elapsed = time.perf_counter() - start
            done = True
            await ticking
            assert len(set(hashes)) == 20
            print(f"20 hashes on 2 workers in {elapsed * 1000:.0f} ms; {len(gaps)} ticks, largest gap "
                  f"{max(gaps) * 1000:.1f} ms ({max(held) * 1000:.1f} ms less waiting for a CPU)")
            assert len(gaps) >= 5  # the hashes took long enough for the figure to mean something
            return max(held)

    assert run(main()) < 0.05


def test_a_hasher_whose_workers_cannot_start_fails_to_start_and_leaves_nothing(run) -> None:
    async def main() -> None:
        hasher = PasswordHasher(workers=2)
        hasher._command = [sys.executable, "-c", "raise SystemExit(3)"]
        with pytest.raises(HasherUnavailable):
            await asyncio.wait_for(hasher.start(), 10)
        assert hash_workers_of_this_process() == [] and hasher.pids == []
        with pytest.raises(HasherClosed):
            await hasher.hash("secret-1")

    run(main())


def test_without_pidfds_workers_are_reaped_all_the_same(run, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError("pidfd_open is not available")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)

    async def main() -> None:
        async with PasswordHasher(workers=2) as hasher:
            assert all(w._pidfd is None for w in hasher._workers)
            worker = next(iter(hasher._workers))
            os.kill(worker.pid, signal.SIGKILL)
            assert await asyncio.wait_for(worker.exited, 10) == -signal.SIGKILL
            assert worker.pid not in hash_workers_of_this_process()
            assert await hasher.verify(await hasher.hash("secret-1"), "secret-1") == (True, None)
            pids = hasher.pids
        assert not set(pids) & set(hash_workers_of_this_process())

    run(main())


def test_workers_run_below_the_server_s_cpu_priority(run) -> None:
    async def main() -> None:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        async with PasswordHasher(workers=1) as hasher:
            assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in hasher.pids] == [min(mine + 10, 19)]
        async with PasswordHasher(workers=1, nice=0) as hasher:
            assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in hasher.pids] == [mine]

    run(main())
