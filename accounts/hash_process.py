"""The parent's side of one password hashing worker process (accounts/hash_worker.py): its
pipes, its exit, one request at a time, and the errors a request can end with.  The pool that
hands requests to workers is accounts/passwords.py.
"""

import asyncio
import json
import logging
import os
import signal
import subprocess
from typing import Callable, Optional

log = logging.getLogger("accounts.passwords")

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



class WorkerProcess:
    """One worker process, its two pipes and its exit, driven by loop callbacks only.

    *on_idle(worker)* is called when it is ready for a request (started, or done with one);
    *on_lost(worker)* once it is dead.  A request unanswered after *timeout* seconds kills it.
    """

    def __init__(self, process: subprocess.Popen, timeout: float, *,
                 on_idle: Callable[["WorkerProcess"], None],
                 on_lost: Callable[["WorkerProcess"], None]) -> None:
        self.process = process
        self.pid = process.pid
        self.timeout = timeout
        self._on_idle = on_idle
        self._on_lost = on_lost
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
        self._deadline = self._loop.call_later(self.timeout, self._hung, self.timeout)
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
            self._on_idle(self)

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
        self._on_lost(self)

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
    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.worker.dead:
            self.worker.on_eof()


class _StdoutProtocol(asyncio.Protocol):
    def __init__(self, worker: WorkerProcess) -> None:
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
