"""Argon2id password hashing in a small pool of worker processes.

A hash costs tens of milliseconds of CPU and memory on purpose; run on the event loop it would
stall every stream for that long, and the server runs no threads.  So each hash runs in a worker
process (accounts/hash_worker.py) that the loop talks to through non-blocking pipes, one request
per worker at a time, and callers beyond the workers wait in a bounded FIFO queue.

Workers are started with subprocess.Popen and watched with the loop's own readers (the pipe, and a
pidfd for the exit) rather than with asyncio.create_subprocess_exec, because the standard event
loop of Python 3.11 watches children with one thread each; this way no loop ever needs a thread.

Passwords go to workers only through the pipe (never argv or the environment) and are never
logged; the errors raised here never quote them.
"""

import asyncio
import base64
import collections
import itertools
import logging
import os
import subprocess
import sys
from typing import Any, Optional

from accounts.hash_process import (HasherBusy, HasherClosed, HasherError, HasherUnavailable,
                                   WorkerDied, WorkerProcess)

log = logging.getLogger(__name__)

__all__ = ["HasherBusy", "HasherClosed", "HasherError", "HasherUnavailable", "InvalidStoredHash",
           "PasswordHasher", "WorkerDied"]

# OWASP's minimum for Argon2id (Password Storage Cheat Sheet): 19 MiB, 2 passes, 1 lane.
MEMORY_COST = 19456  # KiB
TIME_COST = 2
PARALLELISM = 1

# 1024 characters (the longest password accounts accept) of up to 4 bytes each in UTF-8.
MAX_PASSWORD_BYTES = 4096
# A PHC string of sane parameters is about 100 characters; anything far longer is not one.
MAX_HASH_CHARS = 512

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InvalidStoredHash(ValueError):
    """The stored hash is not a PHC string argon2 can check."""


class PasswordHasher:
    """A pool of `workers` hashing processes; use `async with PasswordHasher() as hasher:`
    or start() and close().  Each worker handles one request at a time; up to `max_waiting`
    callers wait for one in arrival order, and one more raises HasherBusy.  A request that a
    worker has not answered within `timeout` seconds fails with WorkerDied and the worker is
    replaced, as is any worker that exits.  Workers run `nice` steps below this process's CPU
    priority: when hashing and streams want the same CPUs, the streams get them first."""

    def __init__(self, workers: int = 2, *, memory_cost: int = MEMORY_COST, time_cost: int = TIME_COST,
                 parallelism: int = PARALLELISM, max_waiting: int = 256, timeout: float = 30.0,
                 start_timeout: float = 30.0, nice: int = 10) -> None:
        if workers < 1 or max_waiting < 0 or timeout <= 0 or start_timeout <= 0 or not 0 <= nice <= 19:
            raise ValueError("workers must be >= 1, max_waiting >= 0, timeouts > 0, nice 0 to 19")
        if time_cost < 1 or parallelism < 1 or memory_cost < 8 * parallelism:
            raise ValueError("Argon2 needs time_cost >= 1, parallelism >= 1, "
                             "memory_cost >= 8 * parallelism KiB")
        self.size = workers
        self.memory_cost, self.time_cost, self.parallelism = memory_cost, time_cost, parallelism
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._command = [sys.executable, "-m", "accounts.hash_worker", "--time-cost", str(time_cost),
                         "--memory-cost", str(memory_cost), "--parallelism", str(parallelism),
                         "--nice", str(nice)]
        self._workers: set[WorkerProcess] = set()  # every worker not yet dead: starting, idle or busy
        self._idle: collections.deque[WorkerProcess] = collections.deque()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._replacing: set[asyncio.Task] = set()
        self._ids = itertools.count(1)
        self._started = False
        self._closed = False

    async def __aenter__(self) -> "PasswordHasher":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return sorted(w.pid for w in self._workers)

    async def start(self) -> None:
        """Start the workers and wait until each is ready (has computed its first hash)."""
        if self._started:
            raise RuntimeError("PasswordHasher.start() called twice")
        self._started = True
        results = await asyncio.gather(*(self._spawn() for _ in range(self.size)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.close()
            raise HasherUnavailable(f"could not start the password hashing workers: {failures[0]}") \
                from failures[0]
        for worker in results:
            self._give(worker)

    async def close(self) -> None:
        """Fail every waiting and running request with HasherClosed, kill the workers and reap them."""
        self._closed = True
        for task in self._replacing:
            task.cancel()
        self._fail_waiters(HasherClosed("the password hasher is closed"))
        workers = list(self._workers)
        for worker in workers:
            worker.kill(HasherClosed("the password hasher is closed"))
        await asyncio.gather(*self._replacing, *(w.exited for w in workers), return_exceptions=True)
        self._idle.clear()

    async def hash(self, password: str) -> str:
        """The PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash) of a new salted hash of password."""
        return (await self._request("hash", password))["hash"]

    async def verify(self, stored_hash: str, password: str) -> tuple[bool, Optional[str]]:
        """(whether password matches stored_hash, a new hash to store or None).  The new hash
        comes only with a match, when stored_hash was made with other parameters than this
        hasher's (argon2's check_needs_rehash).  Raises InvalidStoredHash if stored_hash is not
        a hash argon2 can check."""
        if not isinstance(stored_hash, str) or not stored_hash.isascii() or len(stored_hash) > MAX_HASH_CHARS:
            raise InvalidStoredHash("the stored password hash is not a PHC string")
        reply = await self._request("verify", password, stored_hash)
        return reply["ok"], reply["new_hash"]

    async def dummy_verify(self, password: str) -> None:
        """Check password against a hash nobody has a password for, at this hasher's parameters:
        the same work as verify() of a wrong password, for a user that does not exist, so that an
        unknown username takes as long to refuse as a wrong password."""
        await self._request("dummy", password)

    async def _request(self, op: str, password: str, stored_hash: Optional[str] = None) -> dict:
        """Send one request to a worker; the worker's whole reply (tests read its pid and times)."""
        request = {"op": op, "password": _encode(password)}
        if stored_hash is not None:
            request["hash"] = stored_hash
        worker = await self._take()
        # From here the worker is this request's until its reply comes (even if the caller is
        # cancelled meanwhile) or it dies; either way it returns itself to the pool, not us.
        reply = await worker.send(next(self._ids), request)
        error = reply.get("error")
        if error == "invalid_hash":
            raise InvalidStoredHash("the stored password hash is not a PHC string argon2 can check")
        if error is not None:
            detail = f"{error} {reply.get('type', '')}".rstrip()
            raise HasherError(f"password hashing worker {worker.pid} failed: {detail}")
        return reply

    async def _take(self) -> WorkerProcess:
        if self._closed or not self._started:
            raise HasherClosed(f"the password hasher is {'closed' if self._closed else 'not started'}")
        while self._idle and not self._waiters:
            worker = self._idle.popleft()
            if not worker.dead:
                return worker
        if not self._workers:
            raise HasherUnavailable("no password hashing worker is running")
        if len(self._waiters) >= self.max_waiting:
            raise HasherBusy(f"{len(self._waiters)} password checks are already waiting")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            worker = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give(waiter.result())  # handed a worker just as we were cancelled: pass it on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        if worker.dead:  # died between being handed over and this caller running
            return await self._take()
        return worker

    def _give(self, worker: WorkerProcess) -> None:
        """A worker is free: to the longest waiting caller, or to the idle ones."""
        if worker.dead or self._closed:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def _fail_waiters(self, error: HasherError) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def _spawn(self) -> WorkerProcess:
        # Popen forks with vfork and returns once the child has exec'd: about a millisecond here.
        process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   bufsize=0, cwd=_PROJECT_ROOT, close_fds=True)
        worker = WorkerProcess(process, self.timeout, on_idle=self._give, on_lost=self._lost)
        self._workers.add(worker)
        try:
            await worker.connect()
            await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout)
        except BaseException as e:
            worker.kill(HasherUnavailable("the password hashing worker did not start"))
            if isinstance(e, asyncio.TimeoutError):
                raise HasherUnavailable(f"password hashing worker {worker.pid} was not ready "
                                        f"within {self.start_timeout:g} s") from None
            raise
        return worker

    def _lost(self, worker: WorkerProcess) -> None:
        """A worker died: forget it and start another in its place."""
        self._workers.discard(worker)
        try:
            self._idle.remove(worker)
        except ValueError:
            pass
        if not self._closed and worker.ready.done() and not worker.ready.exception():
            task = asyncio.get_running_loop().create_task(self._replace())
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                worker = await self._spawn()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("could not start a password hashing worker (retrying in %g s): %s", delay, e)
                if not self._workers:  # nobody left to serve the waiting callers
                    self._fail_waiters(HasherUnavailable("no password hashing worker is running"))
                # Bounded retries on a timer: a worker that cannot start must not spin the loop.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._give(worker)
            return


def _encode(password: str) -> str:
    """The password as base64 of its UTF-8 bytes (any Unicode text; raises ValueError for
    text that is not, such as lone surrogates, without quoting any of it)."""
    if not isinstance(password, str):
        raise TypeError("a password is a str")
    try:
        data = password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the password is not valid Unicode text (it contains a lone surrogate)") from None
    if len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes in UTF-8")
    return base64.b64encode(data).decode("ascii")
