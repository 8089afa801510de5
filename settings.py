"""Every chatterd setting, declared once with its default and help text.

Each setting is a `tornado.options` option (``--name=value`` on the command line)
and can also come from the environment as ``CHATTERD_<NAME>`` (upper case, ``-``
becomes ``_``).  The command line wins over the environment, which wins over the
default.
"""

import os
import sys
from typing import Any, NamedTuple

from tornado.options import Error, OptionParser


class Setting(NamedTuple):
    name: str
    default: Any
    type: type
    help: str


SETTINGS = (
    Setting("address", "127.0.0.1", str, "Address to listen on (keep loopback behind nginx)"),
    Setting("port", 8000, int, "TCP port to listen on"),
    Setting("database-url", "", str,
            "PostgreSQL DSN; empty starts an embedded PostgreSQL whose data lives in --data-dir"),
    Setting("data-dir", "./var", str, "Directory for the embedded PostgreSQL's data"),
    Setting("ollama-url", "http://localhost:11434",
            str, "Ollama base URL (a trailing /api, as the course writes it, is accepted)"),
    Setting("upstreams", "", str,
            "Comma-separated LLM servers in order of preference: Ollama base URLs, or "
            "OpenAI-compatible ones as openai+http(s)://[:KEY@]host[:port]/v1; empty: --ollama-url"),
    Setting("upstream-keepalive", 64, int,
            "Idle connections kept open per upstream for the next request (0: one connection "
            "per request)"),
    Setting("upstream-cooldown", 10.0, float,
            "Seconds an upstream that failed (unreachable, 5xx/429) is tried only after the others"),
    Setting("models-refresh", 60.0, float,
            "Seconds between listings of each upstream's models (also listed on an unknown model)"),
    Setting("connect-timeout", 5.0, float, "Seconds to wait for a TCP connection to Ollama"),
    Setting("status-grace", 2.0, float,
            "Seconds to wait for Ollama's status before committing a chat stream to 200 and heartbeats"),
    Setting("heartbeat", 15.0, float, "Seconds of silence after which a ': keepalive' SSE comment is sent"),
    Setting("write-timeout", 30.0, float,
            "Seconds a client may take to read one write before it is disconnected and its "
            "Ollama request ended"),
    Setting("idle-timeout", 300.0, float,
            "Seconds Ollama may send nothing (model loading included) before the turn is ended"),
    Setting("request-timeout", 1800.0, float, "Hard limit in seconds on one Ollama request"),
    Setting("max-body-size", 1048576, int, "Largest accepted request body in bytes (larger gets 413)"),
    Setting("idle-connection-timeout", 75.0, float,
            "Seconds a client connection may stay silent between requests; also the deadline "
            "for a request's headers (above nginx's 60 s upstream keepalive_timeout)"),
    Setting("body-timeout", 60.0, float, "Seconds a client may take to send a request body"),
    Setting("max-messages", 1000, int,
            "Most messages one /llmchat or /llmprep request may carry (more gets 422)"),
    Setting("max-streams", 2048, int, "Concurrent Ollama requests per process before new ones queue"),
    Setting("queue-timeout", 30.0, float,
            "Seconds a request may wait for one of the --max-streams slots before it fails with 503"),
    Setting("db-pool-size", 10, int,
            "PostgreSQL connections per process: all are opened and readied for turns at start, "
            "more are never opened"),
    Setting("db-idle-timeout", 600.0, float,
            "Seconds an unused PostgreSQL connection stays open (0: until chatterd stops); "
            "a new one costs PostgreSQL about 15 ms of CPU on its first turn"),
    Setting("db-timeout", 10.0, float, "Seconds a database operation may take before it fails"),
    Setting("history-cache", 1000, int,
            "AppIDs whose recent conversation each process keeps in memory, so a turn reads "
            "only what is new from PostgreSQL (0: off)"),
    Setting("gc-full-interval", 300.0, float,
            "Seconds between full garbage collections (0: never), instead of Python's "
            "heap-growth trigger, whose pauses were the whole p99 relay latency at scale"),
    Setting("event-loop", "uvloop", str,
            "The asyncio event loop: uvloop (faster) or asyncio (the standard library's)"),
    Setting("xheaders", False, bool,
            "Trust X-Real-IP/X-Forwarded-For/-Proto (turn on only behind nginx that sets them)"),
    Setting("turn-wait", 30.0, float,
            "Seconds a turn waits for a running turn of the same appID to end before it gets 409"),
    Setting("turn-lease", 10.0, float,
            "Seconds after which the turns of a chatterd process that died are abandoned and "
            "their appIDs free again (the lease is renewed every third of it)"),
    Setting("store-retry", 15.0, float,
            "Seconds storing a turn's end is retried while the database is unreachable"),
    Setting("resend-window", 120.0, float,
            "Seconds during which a resend of a turn whose answer was stored but never delivered "
            "gets the stored answer instead of being stored again (0 turns this off)"),
    Setting("context-tokens", 8192, int,
            "Context window (num_ctx) a chat turn is budgeted for and sent to Ollama with, "
            "unless the request's options.num_ctx says otherwise; history beyond it is left "
            "out, oldest whole turns first (0: send the whole conversation, no num_ctx)"),
    Setting("weather-url", "https://api.open-meteo.com/v1/forecast", str,
            "Open-Meteo forecast API behind the resident tool get_weather(lat, lon) of /llmtools "
            "(empty: the tool is off)"),
    Setting("tool-rounds", 4, int,
            "Most rounds of resident tool calls one /llmtools turn may run; a model that calls "
            "them again ends the turn as failed (0: resident tools are off)"),
    Setting("tool-timeout", 10.0, float,
            "Seconds a resident tool may take (the weather request included); then its result "
            "is an error text for the model"),
    Setting("resume-window", 120.0, float,
            "Most seconds a streamed turn keeps generating after its client left, when the "
            "request asks for it (X-Chatterd-Keep-Generating); a reader resuming it extends "
            "that (0: the header is ignored and a client that leaves stops its turn)"),
    Setting("resume-retention", 300.0, float,
            "Seconds a finished turn's stream events stay resumable (GET /turns/<id>/events); "
            "then 410"),
    Setting("resume-checkpoint", 0.2, float,
            "Seconds between checkpoints of the running streams' events to PostgreSQL (one "
            "statement per process for all of them); a resume on another process lags the "
            "live stream by about this much"),
    Setting("shutdown-grace", 30.0, float,
            "On SIGTERM, seconds in-flight streams may run before they are ended"),
)

# One-shot actions: command line only (no environment variable), so a service's
# environment file can never turn a server into a command that exits.
ACTIONS = (
    Setting("import-course", False, bool,
            "Import the rows of the course's public.chatts table not imported yet, then exit"),
)


def env_name(setting_name: str) -> str:
    return "CHATTERD_" + setting_name.upper().replace("-", "_")


def define_settings(parser: OptionParser) -> None:
    for s in SETTINGS:
        parser.define(s.name, default=s.default, type=s.type, help=f"{s.help} [${env_name(s.name)}]")
    for s in ACTIONS:
        parser.define(s.name, default=s.default, type=s.type, help=f"{s.help} [command line only]")


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> OptionParser:
    """Return a fresh OptionParser filled from defaults, environment and argv.

    Environment values are fed to the parser as if they were given first on the
    command line, so the parser's own type checking and error messages apply to them.
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    parser = OptionParser()
    define_settings(parser)
    from_env = [f"--{s.name}={environ[env_name(s.name)]}" for s in SETTINGS if env_name(s.name) in environ]
    try:
        parser.parse_command_line([argv[0], *from_env, *_join_values(argv[1:])])
    except ValueError as e:  # tornado lets the type's own error escape
        raise Error(f"invalid setting value: {e}") from None
    return parser


def _join_values(args: list[str]) -> list[str]:
    """Accept `--port 8000` as well as tornado's own `--port=8000`."""
    takes_value = {f"--{s.name}" for s in SETTINGS if s.type is not bool}
    takes_value |= {name.replace("-", "_") for name in takes_value}
    joined: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in takes_value and i + 1 < len(args):
            joined.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            joined.append(args[i])
            i += 1
    return joined
