"""The real thing: `python chatterd.py` on its embedded PostgreSQL, driven by real curl."""

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from tornado.testing import AsyncTestCase, bind_unused_port, gen_test

import jsonfmt
from tests.ollama_double import OllamaDouble, default_reply
from tests.sse_parser import parse

ROOT = Path(__file__).resolve().parent.parent


def unused_port() -> int:
    sock, port = bind_unused_port()
    sock.close()
    return port


async def start_chatterd(*args, env=None):
    """Start chatterd; return (process, port) once it says it is listening."""
    port = unused_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "chatterd.py", *args, cwd=ROOT, env={**os.environ, "CHATTERD_PORT": str(port),
                                                             **(env or {})},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    log = []
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert line, "chatterd exited during start-up:\n" + "".join(log)
        log.append(line.decode())
        if b"chatterd listening" in line:
            break
    asyncio.ensure_future(_drain(proc.stderr, log))
    proc.log = log
    return proc, port


async def _drain(stream, log):
    while line := await stream.readline():
        log.append(line.decode())


async def curl(*args):
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "--max-time", "30", *args,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"curl {args} exited {proc.returncode}"
    return out


class ProcessTest(AsyncTestCase):
    @gen_test(timeout=120)
    async def test_embedded_database_survives_restart_and_sigterm_exits_0(self):
        double = OllamaDouble()
        double.listen()
        data_dir = tempfile.mkdtemp(prefix="chatterd-proc-")
        args = ("--data-dir", data_dir, "--ollama-url", double.url + "/api")
        proc, port = await start_chatterd(*args)
        base = f"http://127.0.0.1:{port}"
        try:
            out = await curl("-X", "POST", f"{base}/postchatt", "-H", "Content-Type: application/json",
                             "-d", '{"name":"curl","message":"kept across restarts"}')
            self.assertEqual(jsonfmt.loads(out), {})
            out = await curl("-N", "-X", "POST", f"{base}/llmchat", "-d",
                             jsonfmt.dumps({"appID": "proc", "model": "llama3.2", "stream": True,
                                            "messages": [{"role": "user", "content": "hi"}]}))
            events, _ = parse(out)
            self.assertEqual("".join(jsonfmt.loads(e.data)["message"]["content"] for e in events),
                             default_reply([{"role": "user", "content": "hi"}]))
        finally:
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(await asyncio.wait_for(proc.wait(), 30), 0)
        self.assertTrue(any("200 127.0.0.1 POST /llmchat" in line and "appID='proc'" in line
                            for line in proc.log), "".join(proc.log))
        proc, port = await start_chatterd(*args)
        try:
            rows = jsonfmt.loads(await curl(f"http://127.0.0.1:{port}/getchatts"))
            self.assertEqual([r[:2] for r in rows], [["curl", "kept across restarts"]])
        finally:
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(await asyncio.wait_for(proc.wait(), 30), 0)
            await double.stop()
        # The embedded PostgreSQL stopped with its last chatterd.
        self.assertFalse((Path(data_dir) / "pgdata" / "postmaster.pid").exists())
        shutil.rmtree(data_dir, ignore_errors=True)
