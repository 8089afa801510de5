"""PostgreSQL's CPU per turn: what begin_turn + end_turn cost the backend that runs them,
for a fresh conversation and for one with ~60 turns of history, measured quietly (no load,
one connection per checkout) and comparable across checkouts of chatterd.

    .venv/bin/python bench/turn_cost.py                                  # this checkout
    .venv/bin/python bench/turn_cost.py --code ../before --code .        # two, side by side
    .venv/bin/python bench/turn_cost.py --pg-bin /usr/lib/postgresql/15/bin ...
    .venv/bin/python bench/turn_cost.py --explain                        # the plans of a turn

It starts a private PostgreSQL (the embedded server, or with --pg-bin the one in that
directory, as the shared harness does) with the harness's settings (fsync, synchronous_commit
and full_page_writes off) and autovacuum off, so that nothing re-plans a statement in the
middle of a run.  Each --code checkout gets a worker process that imports `db/` from that
checkout, creates its own database, migrates it with that checkout's migrations and
functions, and then, on ONE pooled connection, calls db/conversations.py's begin_turn and
end_turn as turns/ does (the history cache, the delivered turns handed to the next
begin_turn, context 8192 with a 6144-token budget, the resend window).  Before measuring, each
worker stores --filler one-turn conversations (the tables' other rows), gives --conversations
conversations --history turns each, runs ANALYZE (as autovacuum would; --no-analyze: not, so
the tables have no statistics, as a new database's until autovacuum first analyzes them, and
the connection keeps the plans PL/pgSQL cached while they were small) and --warmup turns of
each kind (the backend compiles and plans what a turn runs).

Then, for --rounds rounds, every worker runs --block fresh turns (a new appID each), then
every worker runs --block turns spread over its conversations with history; the workers take
turns in alternating order (A B, then B A), so that the machine's drift and other processes'
load fall on every checkout alike.  Measured per block: the backend's CPU time
(/proc/<pg_backend_pid()>/schedstat: nanoseconds on a CPU), divided by the block's turns;
printed per checkout, the median over rounds and the total, with the client's wall time and
the WAL written per turn, then each checkout's median per-round ratio to the first one.  The
backend's pid goes to stderr, for `perf record -p`.  Replies are 5 tokens and Ollama's prompt_eval_count is 1, as the shared harness's fake
upstream answers (--prompt-tokens exact: the turn's estimated prompt, so that the new
message's count is learned).

A checkout from before conversations had owners (begin_turn(pool, app_id, process, ...),
end_turn(pool, turn_id, ...)) is called through its own signatures.

--explain: one worker (the first --code) runs the same preparation, then one fresh turn and
one turn with history with auto_explain (nested statements, ANALYZE, BUFFERS) and prints the
plan of every statement inside them.  --statements (with --pg-bin, which loads
pg_stat_statements): every statement the measured turns ran, nested ones too, per checkout.
"""

import argparse
import asyncio
import importlib
import inspect
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# As the shared harness (../shared/bench) runs its PostgreSQL, and autovacuum off.
SERVER_SETTINGS = ("fsync = off", "synchronous_commit = off", "full_page_writes = off",
                   "autovacuum = off")
# --statements: every statement, nested ones too, with its planning.
STATEMENTS = ("pg_stat_statements.track = 'all'", "pg_stat_statements.track_planning = on")
AUTO_EXPLAIN = ("auto_explain.log_min_duration = 0", "auto_explain.log_nested_statements = on",
                "auto_explain.log_analyze = on", "auto_explain.log_buffers = on",
                "auto_explain.log_timing = on", "auto_explain.log_level = notice")


def backend_cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


class Calls:
    """begin_turn / end_turn of one checkout's db/conversations.py, in its own signatures."""

    def __init__(self, conversations, cache, exact: bool) -> None:
        self.c = conversations
        self.cache = cache
        self.exact = exact
        self.owned = "owner_id" in inspect.signature(conversations.begin_turn).parameters
        self.delivered: list = []

    async def turn(self, pool, app_id: str, content: str) -> str:
        """One turn, as chatterd runs it; end_turn's answer."""
        delivered, self.delivered = self.delivered, []
        key = (pool, 0, app_id) if self.owned else (pool, app_id)
        turn_id, _history, window, replay = await self.c.begin_turn(
            *key, "turn-cost", 10.0, [{"role": "user", "content": content}],
            resend_seconds=120.0, budget=6144, context=8192, delivered=delivered or None,
            cache=self.cache)
        assert turn_id is not None and replay is None, (app_id, turn_id, replay)
        reply = self.c.Reply(content="one two three four five", model="bench-n5-i0", tokens=5,
                             prompt_tokens=window.sent_tokens if self.exact else 1)
        key = (pool, 0, turn_id) if self.owned else (pool, turn_id)
        status = await self.c.end_turn(*key, "complete", None, reply)
        self.delivered.append((0, turn_id) if self.owned else turn_id)
        return status


async def worker(code: str, dsn: str, args) -> None:
    """A checkout's worker: prepare, print "ready", then answer each "fresh N" / "history N"
    line on stdin with one JSON line (backend CPU ns, wall seconds, end_turn's answers)."""
    import asyncpg
    sys.path.insert(0, code)
    conversations = importlib.import_module("db.conversations")
    migrate = importlib.import_module("db.migrate")
    db_pool = importlib.import_module("db.pool")
    history_cache = importlib.import_module("db.history_cache")
    assert Path(conversations.__file__).resolve().is_relative_to(Path(code).resolve())

    plans: list[str] = []  # auto_explain's notices (--explain)

    def listen(con) -> None:
        if args.explain:
            con.add_log_listener(lambda _con, message: plans.append(message.message))

    async def init(con) -> None:
        await db_pool._init_connection(con)
        listen(con)

    async def reset(con) -> None:  # asyncpg drops a connection's listeners as it comes back
        await db_pool._reset_connection(con)
        listen(con)

    warnings.filterwarnings("ignore", category=asyncpg.InterfaceWarning)  # the listener kept
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, init=init, reset=reset,
                                     server_settings={"search_path": migrate.SCHEMA})
    await migrate.migrate(pool)
    calls = Calls(conversations, history_cache.HistoryCache(1000), args.prompt_tokens == "exact")
    pid = await pool.fetchval("SELECT pg_backend_pid()")
    print(f"{code}: PostgreSQL backend {pid}", file=sys.stderr, flush=True)
    history = [f"history-{k}" for k in range(args.conversations)]
    counter = {"fresh": 0, "history": 0}

    def app_ids(kind: str, n: int) -> list[str]:
        start, counter[kind] = counter[kind], counter[kind] + n
        if kind == "fresh":
            return [f"fresh-{i}" for i in range(start, start + n)]
        return [history[i % len(history)] for i in range(start, start + n)]

    async def turns(names: list[str], label: str) -> dict:
        outcomes: dict = {}
        wal = await pool.fetchval("SELECT pg_current_wal_insert_lsn()")  # asyncpg: an int
        cpu, wall = backend_cpu_ns(pid), time.perf_counter()
        for i, app_id in enumerate(names):
            status = await calls.turn(pool, app_id, f"{label} {i}: tell me more. ")
            outcomes[status] = outcomes.get(status, 0) + 1
        cpu, wall = backend_cpu_ns(pid) - cpu, time.perf_counter() - wall
        wal = await pool.fetchval("SELECT pg_current_wal_insert_lsn()") - wal
        return {"cpu_ns": cpu, "wall_s": wall, "wal_bytes": int(wal), "turns": len(names),
                "outcomes": outcomes}

    await turns([f"filler-{i}" for i in range(args.filler)], "filler")
    for t in range(args.history):
        await turns(history, f"history turn {t}")
    if args.analyze:
        await pool.execute("ANALYZE")
    await turns(app_ids("fresh", args.warmup), "warm-up")
    await turns(app_ids("history", args.warmup), "warm-up")
    if args.explain:
        async with pool.acquire() as con:  # the pool's one connection, which the turns use
            await con.execute("LOAD 'auto_explain'")
            for setting in AUTO_EXPLAIN:
                await con.execute(f"SET {setting}")
        for kind in ("fresh", "history"):
            plans.clear()
            await turns(app_ids(kind, 1), "explained")
            await asyncio.sleep(0)  # asyncpg hands notices to listeners with call_soon
            print(f"==== a {kind} turn: {len(plans)} statements")
            for plan in plans:
                print(plan, end="\n\n")
        await pool.close()
        return
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).split():
        kind, n = line[0], int(line[1])
        print(json.dumps(await turns(app_ids(kind, n), "request")), flush=True)
    await pool.close()


def start_system_postgres(bin_dir: str, root: str, statements: bool = False):
    """initdb and start the PostgreSQL in *bin_dir* under *root* (as user postgres when
    run as root, as the harness does); return (admin DSN, a function that stops it)."""
    def as_pg(argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] + argv if os.geteuid() == 0 else argv

    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.chmod(root, 0o755)
    os.makedirs(sock)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg_ctl = os.path.join(bin_dir, "pg_ctl")
    subprocess.run(as_pg([os.path.join(bin_dir, "initdb"), "-D", data, "-U", "postgres",
                          "-A", "trust", "-E", "UTF8", "--no-sync"]),
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(as_pg([pg_ctl, "-D", data, "-l", os.path.join(root, "postgres.log"), "-o",
                          f"-p {port} -k {sock} -c listen_addresses=127.0.0.1"
                          " -c shared_buffers=256MB"
                          + (" -c shared_preload_libraries=pg_stat_statements"
                             if statements else ""), "-w", "start"]),
                   check=True, stdout=subprocess.DEVNULL)

    def stop() -> None:
        subprocess.run(as_pg([pg_ctl, "-D", data, "-m", "fast", "-w", "stop"]),
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


def main(args) -> None:
    sys.path.insert(0, str(ROOT))
    import asyncpg
    from db import embedded

    codes = [str(Path(c).resolve()) for c in (args.code or [ROOT])]
    if args.explain:
        codes = codes[:1]
    root = tempfile.mkdtemp(prefix="chatterd-turn-cost-")
    stop = None
    if args.pg_bin:
        admin, stop = start_system_postgres(args.pg_bin, root, args.statements)
    else:
        admin = embedded.start(root)

    async def admin_sql(*statements: str) -> None:
        con = await asyncpg.connect(admin)
        try:
            for statement in statements:
                await con.execute(statement)
        finally:
            await con.close()

    settings = SERVER_SETTINGS + (STATEMENTS if args.statements else ())
    asyncio.run(admin_sql(*(f"ALTER SYSTEM SET {setting}" for setting in settings),
                          "SELECT pg_reload_conf()"))
    passthrough = ["--history", str(args.history), "--conversations", str(args.conversations),
                   "--warmup", str(args.warmup), "--filler", str(args.filler),
                   "--prompt-tokens", args.prompt_tokens] + (["--explain"] if args.explain else [])
    passthrough += [] if args.analyze else ["--no-analyze"]
    workers = []
    try:
        for k, code in enumerate(codes):
            name = f"turn_cost_{k}"
            asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
            dsn = re.sub(r"/postgres(?=\?|$)", f"/{name}", admin)  # the database, not the user
            w = subprocess.Popen([sys.executable, __file__, "--worker", code, "--dsn", dsn]
                                 + passthrough, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
            if args.explain:
                print(w.communicate()[0], end="")
                return
            assert w.stdout.readline() == "ready\n", f"the worker for {code} failed"
            workers.append(w)
        if args.statements:
            asyncio.run(admin_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
                                  "SELECT pg_stat_statements_reset()"))
        measure(args, codes, workers)
        if args.statements:
            asyncio.run(print_statements(admin, codes))
    finally:
        for w in workers:
            w.stdin.close()
            w.wait()
        if stop is not None:
            stop()


async def print_statements(admin: str, codes: list[str]) -> None:
    """pg_stat_statements per checkout's database: every statement the measured turns ran."""
    import asyncpg
    con = await asyncpg.connect(admin)
    try:
        for k, code in enumerate(codes):
            print(f"---- statements of {code} (per call: plans, plan ms, exec ms, blocks hit)")
            for r in await con.fetch(
                    "SELECT s.calls, s.plans, s.total_plan_time, s.total_exec_time,"
                    " s.shared_blks_hit, s.query FROM pg_stat_statements s"
                    " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1"
                    " ORDER BY s.total_exec_time DESC", f"turn_cost_{k}"):
                calls = r["calls"] or 1
                print(f"{r['calls']:6d} {r['plans'] / calls:5.2f} {r['total_plan_time'] / calls:7.4f}"
                      f" {r['total_exec_time'] / calls:7.4f} {r['shared_blks_hit'] / calls:6.1f}  "
                      + " ".join(r["query"].split())[:150])
    finally:
        await con.close()


def measure(args, codes: list[str], workers: list) -> None:
    blocks: dict = {(code, kind): [] for code in codes for kind in ("fresh", "history")}
    for r in range(args.rounds):
        order = list(range(len(codes)))
        if r % 2:
            order.reverse()
        for kind in ("fresh", "history"):
            for i in order:
                workers[i].stdin.write(f"{kind} {args.block}\n")
                workers[i].stdin.flush()
                blocks[codes[i], kind].append(json.loads(workers[i].stdout.readline()))
    for code in codes:
        parts = []
        for kind in ("fresh", "history"):
            runs = blocks[code, kind]
            per_turn = [b["cpu_ns"] / 1e6 / b["turns"] for b in runs]
            turns = sum(b["turns"] for b in runs)
            outcomes: dict = {}
            for b in runs:
                for status, n in b["outcomes"].items():
                    outcomes[status] = outcomes.get(status, 0) + n
            parts.append(
                f"{kind} {statistics.median(per_turn):.3f} ms (median of {len(runs)} blocks;"
                f" all {sum(b['cpu_ns'] for b in runs) / 1e6 / turns:.3f} ms; wall"
                f" {sum(b['wall_s'] for b in runs) * 1e3 / turns:.2f} ms;"
                f" WAL {sum(b['wal_bytes'] for b in runs) / turns:.0f} bytes; {outcomes})")
        print(f"{code}: PostgreSQL CPU per turn: " + "; ".join(parts), flush=True)
    for code in codes[1:]:  # each block against the first checkout's of the same round
        ratios = [statistics.median(b["cpu_ns"] / b["turns"] / (a["cpu_ns"] / a["turns"])
                                    for a, b in zip(blocks[codes[0], kind], blocks[code, kind]))
                  for kind in ("fresh", "history")]
        print(f"{code} / {codes[0]}, median of the rounds' ratios: fresh {ratios[0]:.3f},"
              f" history {ratios[1]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", action="append",
                        help="a checkout of chatterd whose db/ is measured (repeatable;"
                             " default this one)")
    parser.add_argument("--rounds", type=int, default=20, help="blocks of each kind per checkout")
    parser.add_argument("--block", type=int, default=20, help="turns per block")
    parser.add_argument("--history", type=int, default=60,
                        help="turns each conversation with history has before the measured ones")
    parser.add_argument("--conversations", type=int, default=40,
                        help="conversations with history the measured turns are spread over")
    parser.add_argument("--filler", type=int, default=2000,
                        help="one-turn conversations stored first (what setting a of the"
                             " shared harness leaves behind): tables of a realistic size")
    parser.add_argument("--warmup", type=int, default=40, help="unmeasured turns of each kind")
    parser.add_argument("--prompt-tokens", choices=("harness", "exact"), default="harness",
                        help="Ollama's prompt_eval_count: 1 (the shared harness's fake"
                             " upstream) or the turn's estimated prompt")
    parser.add_argument("--no-analyze", dest="analyze", action="store_false",
                        help="no ANALYZE after the preparation: the tables without statistics,"
                             " as a new database's are until autovacuum analyzes them")
    parser.add_argument("--pg-bin", help="the directory of a PostgreSQL's initdb and pg_ctl to"
                                         " run instead of the embedded one (the shared harness"
                                         " runs /usr/lib/postgresql/15/bin)")
    parser.add_argument("--statements", action="store_true",
                        help="with --pg-bin: print pg_stat_statements (nested statements too,"
                             " with their planning) of the measured turns, per checkout")
    parser.add_argument("--explain", action="store_true",
                        help="print the plans inside one fresh and one history turn")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a worker: the checkout to run
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.worker:
        asyncio.run(worker(parsed.worker, parsed.dsn, parsed))
    else:
        main(parsed)
