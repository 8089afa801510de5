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
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any, Optional

log = logging.getLogger(__name__)

# OWASP's minimum for Argon2id (Password Storage Cheat Sheet): 19 MiB, 2 passes, 1 lane.
MEMORY_COST = 19456  # KiB
TIME_COST = 2
PARALLELISM = 1

# 1024 characters (the longest password accounts accept) of up to 4 bytes each in UTF-8.
MAX_PASSWORD_BYTES = 4096
# A PHC string of sane parameters is about 100 characters; anything far longer is not one.
MAX_HASH_CHARS = 512

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPLY_LIMIT = 64 * 1024  # a worker's line is a few hundred bytes; more means it is broken


class HasherError(Exception):
    """A password could not be hashed or checked (the request's outcome is unknown)."""


class HasherBusy(HasherError):
    """Too many callers are already waiting for a worker: answer 503 or 429, try later."""


class HasherClosed(HasherError):
    """The hasher is closed (or was never started)."""


class HasherUnavailable(HasherError):
    """No worker is running and none could be started."""


class WorkerDied(HasherError):
    """The worker that held the request exited, or was killed for not answering in time."""


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
        self._workers: set[_Worker] = set()  # every worker not yet dead: starting, idle or busy
        self._idle: collections.deque[_Worker] = collections.deque()
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

    async def _take(self) -> "_Worker":
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

    def _give(self, worker: "_Worker") -> None:
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

    async def _spawn(self) -> "_Worker":
        # Popen forks with vfork and returns once the child has exec'd: about a millisecond here.
        process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   bufsize=0, cwd=_PROJECT_ROOT, close_fds=True)
        worker = _Worker(process, self)
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

    def _lost(self, worker: "_Worker") -> None:
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


class _Worker:
    """One worker process, its two pipes and its exit, driven by loop callbacks only."""

    def __init__(self, process: subprocess.Popen, pool: PasswordHasher) -> None:
        self.process = process
        self.pid = process.pid
        self.pool = pool
        self.dead = False
        self._loop = asyncio.get_running_loop()
        self._stdin: Optional[asyncio.WriteTransport] = None
        self._stdout: Optional[asyncio.ReadTransport] = None
        self.buffer = bytearray()
        self._request_id: Optional[int] = None
        self._reply: Optional[asyncio.Future] = None
        self._deadline: Optional[asyncio.TimerHandle] = None
        self.ready: asyncio.Future = self._loop.create_future()
        self.exited: asyncio.Future = self._loop.create_future()  # the exit code, once reaped
        # A pidfd signals the exit without SIGCHLD or a waiting thread (Linux 5.3 and later); it is
        # opened before the child can be reaped, so it cannot name a reused pid.
        try:
            self._pidfd: Optional[int] = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        else:
            self._loop.add_reader(self._pidfd, self._reap)

    async def connect(self) -> None:
        loop, process = self._loop, self.process
        self._stdin, _ = await loop.connect_write_pipe(lambda: _StdinProtocol(self), process.stdin)
        self._stdout, _ = await loop.connect_read_pipe(lambda: _StdoutProtocol(self), process.stdout)

    def send(self, request_id: int, request: dict) -> asyncio.Future:
        """Write one request; the future gets the worker's reply or the error it died of."""
        self._request_id = request_id
        self._reply = self._loop.create_future()
        self._deadline = self._loop.call_later(self.pool.timeout, self._hung, self.pool.timeout)
        self._stdin.write(json.dumps(dict(request, id=request_id), separators=(",", ":")).encode() + b"\n")
        return self._reply

    def _hung(self, timeout: float) -> None:
        log.warning("password hashing worker %d did not answer within %g s: killed", self.pid, timeout)
        self.kill(WorkerDied(f"password hashing worker {self.pid} did not answer within {timeout:g} s"))

    def on_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.kill(WorkerDied(f"password hashing worker {self.pid} wrote something that is not a reply"))
        elif not self.ready.done():
            if message.get("ready") is True:
                self.ready.set_result(None)
            else:
                self.kill(WorkerDied(f"password hashing worker {self.pid} did not start properly"))
        elif self._reply is None or message.get("id") != self._request_id:
            self.kill(WorkerDied(f"password hashing worker {self.pid} answered a request it was not given"))
        else:
            reply, self._reply, self._request_id = self._reply, None, None
            self._deadline.cancel()
            if not reply.done():  # done: its caller was cancelled and no longer listens
                reply.set_result(message)
            self.pool._give(self)

    def on_eof(self) -> None:
        if not self.dead:
            log.warning("password hashing worker %d exited unexpectedly", self.pid)
            self.kill(WorkerDied(f"password hashing worker {self.pid} exited"))

    def kill(self, error: HasherError) -> None:
        """End the worker and fail what it held with error."""
        if self.dead:
            return
        self._die(error)
        if not self.exited.done():  # not reaped yet, so the pid is still this worker's
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap()

    def _die(self, error: HasherError) -> None:
        self.dead = True
        if self._deadline is not None:
            self._deadline.cancel()
        for future in (self.ready, self._reply):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # marked retrieved: a caller that went away must not cause a warning
        # A transport that saw the pipe close is already closing (closing it again would make
        # asyncio's pipe transport call connection_lost twice).
        if self._stdin is None:
            self.process.stdin.close()
        elif not self._stdin.is_closing():
            self._stdin.abort()
        if self._stdout is None:
            self.process.stdout.close()
        elif not self._stdout.is_closing():
            self._stdout.close()
        self.pool._lost(self)

    def _reap(self) -> None:
        """Collect the exit status once the process has ended (called again until it has)."""
        if self.exited.done():
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # some other part of the process reaped it first
            pid, status = self.pid, None
        if pid == 0:  # still running: the pidfd, or without one a short timer, calls again
            if self._pidfd is None:
                self._loop.call_later(0.005, self._reap)
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        code = None if status is None else os.waitstatus_to_exitcode(status)
        self.process.returncode = code  # reaped here: Popen must not wait for it again
        self.exited.set_result(code)
        if not self.dead:
            log.warning("password hashing worker %d exited with code %s", self.pid, code)
            self._die(WorkerDied(f"password hashing worker {self.pid} exited with code {code}"))


class _StdinProtocol(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.worker.dead:
            self.worker.on_eof()


class _StdoutProtocol(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def data_received(self, data: bytes) -> None:
        buffer = self.worker.buffer
        buffer += data
        while not self.worker.dead:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > _REPLY_LIMIT:
                    self.worker.kill(WorkerDied(f"password hashing worker {self.worker.pid} "
                                                "wrote an overlong line"))
                return
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            self.worker.on_line(line)

    def eof_received(self) -> bool:
        self.worker.on_eof()
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.worker.dead:
            self.worker.on_eof()


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
