"""Accepting at the open-file limit: a pause and one warning, not a spinning loop and a log flood."""

import asyncio
import errno
import os
import resource
import socket
import time

from tornado.httpclient import AsyncHTTPClient
from tornado.testing import AsyncTestCase, gen_test

from runtime import accept_guard
from tests.ollama_double import OllamaDouble
from tests.support import database_url
from tests.test_process import start_chatterd, stop


class FlakySocket(socket.socket):
    """A listening socket whose accept() fails with `error` (an errno) while it is set."""

    error = errno.EMFILE
    accepts = 0

    def accept(self):  # type: ignore[override]
        self.accepts += 1
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        return super().accept()


def listening(test) -> FlakySocket:
    sock = FlakySocket(socket.AF_INET, socket.SOCK_STREAM)
    test.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


class AcceptGuardTest(AsyncTestCase):
    @gen_test(timeout=20)
    async def test_emfile_pauses_accepting_and_warns_once(self):
        sock = listening(self)
        accepted = []
        taken = asyncio.Event()

        def on_accept(conn, addr):
            accepted.append(conn)
            taken.set()

        with self.assertLogs("chatterd", "INFO") as logs:
            stop_accepting = accept_guard.add_accept_handler(sock, on_accept, backoff=0.1)
            _, writer = await asyncio.open_connection(*sock.getsockname())
            await asyncio.sleep(1.0)  # the window the tries are counted over
            self.assertLess(sock.accepts, 20)  # about one try per back-off, not a spin
            self.assertEqual(accepted, [])
            sock.error = None  # descriptors are free again: the waiting connection is taken
            await asyncio.wait_for(taken.wait(), 5)
            self.assertEqual(len(accepted), 1)
            stop_accepting()
        writer.close()
        for conn in accepted:
            conn.close()
        warnings = [r for r in logs.records if r.levelname == "WARNING"]
        self.assertEqual(len(warnings), 1, logs.output)
        self.assertIn("Too many open files", warnings[0].getMessage())
        self.assertIn("accepting connections again", logs.output[-1])

    @gen_test(timeout=10)
    async def test_other_accept_errors_still_raise(self):
        sock = listening(self)
        sock.error = errno.EBADF
        stop_accepting = accept_guard.add_accept_handler(sock, lambda conn, addr: None)
        try:
            fd, accept_handler = self.io_loop.handlers[sock.fileno()]  # what the IOLoop calls
            with self.assertRaises(OSError):
                accept_handler(fd, 0)
        finally:
            stop_accepting()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class FileLimitProcessTest(AsyncTestCase):
    NOFILE = 64

    async def start_limited(self, *args):
        """chatterd with RLIMIT_NOFILE soft = hard = NOFILE (raise_open_file_limit raises the
        soft limit only up to the hard one, so it cannot lift this)."""
        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.NOFILE, self.NOFILE))

        return await start_chatterd(*args, preexec_fn=limit)

    @gen_test(timeout=90)
    async def test_at_the_fd_limit_it_neither_spins_nor_floods_the_log(self):
        double = OllamaDouble()
        double.listen()
        try:
            await self.fill_and_recover(double)
        finally:
            await double.stop()

    async def fill_and_recover(self, double):
        proc, port = await self.start_limited("--database-url", database_url(),
                                              "--ollama-url", double.url)
        clients = []
        try:
            for _ in range(self.NOFILE + 40):  # more than chatterd can hold; the rest wait
                clients.append(await asyncio.open_connection("127.0.0.1", port))
            deadline = time.monotonic() + 10
            while not any("Too many open files" in line for line in proc.log):  # the limit
                self.assertLess(time.monotonic(), deadline, "".join(proc.log[-20:]))
                await asyncio.sleep(0.05)
            lines, cpu, started = len(proc.log), cpu_seconds(proc.pid), time.monotonic()
            await asyncio.sleep(3)
            window_lines = len(proc.log) - lines
            window_cpu = cpu_seconds(proc.pid) - cpu
            print(f"at the fd limit, over {time.monotonic() - started:.1f} s: {window_lines} log "
                  f"lines, {window_cpu:.2f} CPU-s")
            self.assertTrue(any("Too many open files" in line for line in proc.log), "".join(proc.log))
            self.assertLess(window_lines, 50, "".join(proc.log[-20:]))
            self.assertLess(window_cpu, 0.5)
            for _, writer in clients:
                writer.transport.abort()
            clients = []
            response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/healthz",
                                                     request_timeout=10)
            self.assertEqual(response.code, 200)
        finally:
            for _, writer in clients:
                writer.transport.abort()
            await stop(proc)
