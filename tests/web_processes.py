"""The processes behind the browser tests (tests/test_web.py): an Ollama double programmed
per model and one chatterd on the run's PostgreSQL, each a real process of its own (a
blocking browser driver in the test process cannot share an event loop with them).

Start-up is awaited on the process's own "listening" line; after it, `cat` copies the rest
of its stderr to a log file, so the pipe never fills and no thread is needed here.
"""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from tests.support import database_url

ROOT = Path(__file__).resolve().parent.parent
LONG = 30  # seconds: the generous bound on anything a test waits for


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process whose stderr is read until it says it is ready, then copied to a log
    file by `cat` (so the pipe never fills, with no thread here)."""

    def __init__(self, name: str, args: list[str], ready: str, log_dir: str,
                 env: Optional[dict] = None) -> None:
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out = self.proc.stderr
        assert out is not None
        seen = b""
        deadline = time.monotonic() + 90
        while ready.encode() not in seen:
            left = deadline - time.monotonic()
            # Unbuffered reads: select() only knows about bytes not yet read from the pipe.
            if left <= 0 or not select.select([out], [], [], left)[0]:
                self.stop()
                raise AssertionError(f"{name} did not start:\n" + seen.decode(errors="replace"))
            data = os.read(out.fileno(), 65536)
            if not data:
                self.stop()
                raise AssertionError(f"{name} exited during start-up:\n" + seen.decode(errors="replace"))
            seen += data
        self.log = open(self.log_path, "wb")
        self.log.write(seen)
        self.log.flush()
        self.copier = subprocess.Popen(["cat"], stdin=out, stdout=self.log)
        out.close()

    def text(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(LONG)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "copier", None) is not None:
            self.copier.wait(10)
            self.log.close()
        return self.proc.returncode


class Stack:
    """The Ollama double and one chatterd, each a process; `base` is chatterd's URL."""

    def __init__(self, behaviors: dict[str, dict], chatterd_args: list[str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="chatterd-web-")
        self.procs: list[Process] = []
        double_port = unused_port()
        behave = [f"--behave={model}={json.dumps(fields)}" for model, fields in behaviors.items()]
        self.double = self._start("ollama-double", [
            sys.executable, "-m", "tests.ollama_double", "--address=127.0.0.1",
            f"--port={double_port}", "--no-accept-any-model", "--token-delay=0.03", *behave],
            "Ollama double listening")
        self.port = unused_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATTERD_")}
        self.chatterd = self._start("chatterd", [
            sys.executable, "chatterd.py", f"--port={self.port}", "--address=127.0.0.1",
            f"--database-url={database_url()}", f"--ollama-url=http://127.0.0.1:{double_port}",
            *chatterd_args],
            "chatterd listening", env)
        self.base = f"http://localhost:{self.port}"

    def _start(self, name: str, args: list[str], ready: str, env: Optional[dict] = None) -> Process:
        process = Process(name, args, ready, self.dir, env)
        self.procs.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.text()}" for p in self.procs)

    def close(self) -> None:
        codes = {p.name: p.stop() for p in reversed(self.procs)}
        assert codes.get("chatterd") == 0, f"chatterd exited {codes}:\n{self.logs()}"
        shutil.rmtree(self.dir, ignore_errors=True)
