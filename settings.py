"""Every chatterd setting, declared once: its name, type, default and help.

A setting is `--name=value` (or `--name value`) on the command line and CHATTERD_<NAME>
in the environment (upper case, "-" becomes "_"); the command line wins over the
environment, which wins over the default.  One-shot actions (ACTIONS) are command line
only, so a service's environment file can never turn a server into a command that exits.

Code reads a value from a Settings object by its Python name (`config.turn_lease`):
`parse()` builds the process's from argv and the environment, `defaults(...)` one for a
test or a bench.  `python chatterd.py --help` and docs/configuration.md are generated
from the declarations below (`python -m settings --markdown > docs/configuration.md`;
tests/test_settings.py fails when the committed file is out of date).
"""

from dataclasses import dataclass
import difflib
import sys
import textwrap
from typing import Any, Mapping

PROGRAM = "python chatterd.py"
DOC_COMMAND = "python -m settings --markdown > docs/configuration.md"


@dataclass(frozen=True)
class Setting:
    name: str  # on the command line: --name
    type: type  # str, int, float or bool
    default: Any
    help: str
    choices: tuple[str, ...] = ()  # the only values allowed, when not empty

    @property
    def attr(self) -> str:
        """The name code reads it by: config.<attr>."""
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "CHATTERD_" + self.attr.upper()

    @property
    def option(self) -> str:
        return "--" + self.name


SECTIONS: tuple[tuple[str, tuple[Setting, ...]], ...] = (
    ("Server", (
        Setting("address", str, "127.0.0.1", "Address to listen on (keep loopback behind nginx)"),
        Setting("port", int, 8000, "TCP port to listen on"),
        Setting("xheaders", bool, False,
                "Trust X-Real-IP/X-Forwarded-For/-Proto (turn on only behind nginx that sets them)"),
        Setting("shutdown-grace", float, 30.0,
                "On SIGTERM, seconds in-flight streams may run before they are ended"),
    )),
    ("Client connections", (
        Setting("max-body-size", int, 1048576,
                "Largest accepted request body in bytes (larger gets 413)"),
        Setting("idle-connection-timeout", float, 75.0,
                "Seconds a client connection may stay silent between requests; also the deadline "
                "for a request's headers (above nginx's 60 s upstream keepalive_timeout)"),
        Setting("body-timeout", float, 60.0, "Seconds a client may take to send a request body"),
        Setting("max-messages", int, 1000,
                "Most messages one /llmchat or /llmprep request may carry (more gets 422)"),
        Setting("heartbeat", float, 15.0,
                "Seconds of silence after which a ': keepalive' SSE comment is sent"),
        Setting("write-timeout", float, 30.0,
                "Seconds a client may take to read one write before it is disconnected and its "
                "upstream request ended"),
    )),
    ("Database", (
        Setting("database-url", str, "",
                "PostgreSQL DSN; empty starts an embedded PostgreSQL whose data lives in --data-dir"),
        Setting("data-dir", str, "./var", "Directory for the embedded PostgreSQL's data"),
        Setting("db-pool-size", int, 10,
                "PostgreSQL connections per process: all are opened and readied for turns at "
                "start, more are never opened; turn begins take at most all but a third of them "
                "(all but 3 at most), which stay free for turn ends and stream checkpoints"),
        Setting("db-idle-timeout", float, 600.0,
                "Seconds an unused PostgreSQL connection stays open (0: until chatterd stops); "
                "a reopened connection costs PostgreSQL extra CPU on its first turn"),
        Setting("db-timeout", float, 10.0, "Seconds a database operation may take before it fails"),
        Setting("history-cache", int, 1000,
                "AppIDs whose recent conversation each process keeps in memory, so a turn reads "
                "only what is new from PostgreSQL (0: off)"),
    )),
    ("Upstreams", (
        Setting("ollama-url", str, "http://localhost:11434",
                "Ollama base URL (a trailing /api, as the course writes it, is accepted)"),
        Setting("upstreams", str, "",
                "Comma-separated LLM servers in order of preference: Ollama base URLs, or "
                "OpenAI-compatible ones as openai+http(s)://[:KEY@]host[:port]/v1; "
                "empty: --ollama-url"),
        Setting("upstream-keepalive", int, 64,
                "Idle connections kept open per upstream for the next request (0: one "
                "connection per request)"),
        Setting("upstream-cooldown", float, 10.0,
                "Seconds an upstream that failed (unreachable, 5xx/429) is tried only after "
                "the others"),
        Setting("models-refresh", float, 60.0,
                "Seconds between listings of each upstream's models (also listed on an "
                "unknown model)"),
        Setting("connect-timeout", float, 5.0, "Seconds to wait for a TCP connection to an upstream"),
        Setting("status-grace", float, 2.0,
                "Seconds to wait for an upstream's status before committing a chat stream to 200 "
                "and heartbeats"),
        Setting("idle-timeout", float, 300.0,
                "Seconds an upstream may send nothing (model loading included) before the turn "
                "is ended"),
        Setting("request-timeout", float, 1800.0, "Hard limit in seconds on one upstream request"),
        Setting("max-streams", int, 2048,
                "Concurrent upstream requests per process before new ones queue"),
        Setting("queue-timeout", float, 30.0,
                "Seconds a request may wait for one of the --max-streams slots before it fails "
                "with 503"),
    )),
    ("Turns", (
        Setting("turn-wait", float, 30.0,
                "Seconds a turn waits for a running turn of the same appID to end before it "
                "gets 409"),
        Setting("turn-lease", float, 10.0,
                "Seconds after which the turns of a chatterd process that died are abandoned "
                "and their appIDs free again (the lease is renewed every third of it)"),
        Setting("store-retry", float, 15.0,
                "Seconds storing a turn's end is retried while the database is unreachable"),
        Setting("resend-window", float, 120.0,
                "Seconds during which a resend of a turn whose answer was stored but never "
                "delivered gets the stored answer instead of being stored again (0 turns this off)"),
        Setting("early-upstream", bool, True,
                "Send a /llmchat turn upstream while it begins when this process knows its "
                "conversation (its last turn ended here), relaying nothing until begin_turn "
                "confirms the lease and the very same history; otherwise the request is "
                "cancelled and sent again after begin_turn (false: always after)"),
        Setting("context-tokens", int, 8192,
                "Context window (num_ctx) a chat turn is budgeted for and sent upstream with, "
                "unless the request's options.num_ctx says otherwise; history beyond it is left "
                "out, oldest whole turns first (0: send the whole conversation, no num_ctx)"),
    )),
    ("Resumable streams", (
        Setting("resume-window", float, 120.0,
                "Most seconds a streamed turn keeps generating after its client left, when the "
                "request asks for it (X-Chatterd-Keep-Generating); a reader resuming it extends "
                "that (0: the header is ignored and a client that leaves stops its turn)"),
        Setting("resume-retention", float, 300.0,
                "Seconds a finished turn's stream events, once written to PostgreSQL, stay "
                "resumable (GET /turns/<id>/events); then 410"),
        Setting("resume-checkpoint", float, 0.2,
                "Seconds between checkpoints to PostgreSQL of the events of the running streams "
                "that may be resumed (their client left, or a reader asked for them; one "
                "statement per process for all of them); a resume lags the live stream by about "
                "this much"),
        Setting("resume-linger", float, 60.0,
                "Seconds a process keeps in memory the stream of a turn whose client received "
                "all of it, for a client that resumes it anyway (it is written to PostgreSQL "
                "only then); later such a resume gets 410 (0: not kept; set it alike on every "
                "process: a reader asks the others for streams that ended this recently)"),
    )),
    ("Resident tools", (
        Setting("weather-url", str, "https://api.open-meteo.com/v1/forecast",
                "Open-Meteo forecast API behind the resident tool get_weather(lat, lon) of "
                "/llmtools (empty: the tool is off)"),
        Setting("tool-rounds", int, 4,
                "Most rounds of resident tool calls one /llmtools turn may run; a model that "
                "calls them again ends the turn as failed (0: resident tools are off)"),
        Setting("tool-timeout", float, 10.0,
                "Seconds a resident tool may take (the weather request included); then its "
                "result is an error text for the model"),
    )),
    ("People", (
        Setting("auth", str, "open",
                "open: a request without credentials acts in the anonymous namespace (the "
                "course's apps); required: every endpoint but /, /healthz, /readyz, /auth/signup, "
                "/auth/login and the page's static files needs a login session or an API token "
                "(401 otherwise)", choices=("open", "required")),
        Setting("signup", str, "open",
                "open: anyone may make an account (POST /auth/signup); closed: 403, and accounts "
                "are added with --add-user", choices=("open", "closed")),
        Setting("session-idle", float, 86400.0,
                "Seconds a login session may go unused before it ends"),
        Setting("session-max-age", float, 604800.0,
                "Seconds after login at which a session ends however much it is used"),
        Setting("login-attempts", int, 5,
                "Login attempts (and password checks) one username may get from one client "
                "address per --login-window before 429; other addresses are not affected"),
        Setting("login-window", float, 300.0, "Seconds over which --login-attempts are counted"),
        Setting("user-streams", int, 0,
                "Concurrent model requests per user (per client address for anonymous callers) "
                "before 429 (0: no limit)"),
        Setting("user-rate", int, 0,
                "Model requests per minute per user (per client address for anonymous callers) "
                "before 429 (0: no limit)"),
        Setting("hash-workers", int, 2,
                "Processes that hash and check passwords (Argon2id, 19 MiB each), so that no "
                "login stalls a stream"),
    )),
    ("Runtime", (
        Setting("event-loop", str, "uvloop",
                "The asyncio event loop: uvloop (less CPU per event) or asyncio (the standard "
                "library's)", choices=("uvloop", "asyncio")),
        Setting("gc-full-interval", float, 300.0,
                "Seconds between full garbage collections (0: never).  They run on this timer "
                "instead of Python's heap-growth trigger, which fires again and again while "
                "streams open and pauses every stream each time"),
    )),
)

SETTINGS: tuple[Setting, ...] = tuple(s for _, group in SECTIONS for s in group)

# One-shot actions: command line only (see the module's docstring).
ACTIONS: tuple[Setting, ...] = (
    Setting("import-course", bool, False,
            "Import the rows of the course's public.chatts table not imported yet, then exit"),
    Setting("add-user", str, "",
            "Add the account NAME (its password read from standard input, one line), then exit; "
            "works with --signup closed"),
)

_BY_ATTR = {s.attr: s for s in SETTINGS + ACTIONS}
_TRUE = ("true", "t", "1", "yes", "y", "on")
_FALSE = ("false", "f", "0", "no", "n", "off")


class Error(Exception):
    """A setting's name or value that chatterd cannot use; the message says which and why."""


class Settings:
    """The value of every setting and action, by Python name: `config.turn_lease`.

    Read-only: `defaults(...)` or `.replace(...)` make another.
    """

    def __init__(self, **values: Any) -> None:
        unknown = values.keys() - _BY_ATTR.keys()
        if unknown:
            raise TypeError(_unknown(sorted(unknown)[0]))
        missing = _BY_ATTR.keys() - values.keys()
        if missing:
            raise TypeError(f"no value for the setting {sorted(missing)[0]!r}")
        for name, value in values.items():
            _check_type(_BY_ATTR[name], value)
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:  # only reached for a name that is not a setting
        raise AttributeError(_unknown(name))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are read-only: use settings.defaults(...) or .replace(...)")

    def replace(self, **changes: Any) -> "Settings":
        """A copy with *changes* (by Python name)."""
        return Settings(**{**self.__dict__, **changes})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if v != _BY_ATTR[k].default)
        return f"Settings({changed})"


def defaults(**overrides: Any) -> Settings:
    """Every setting at its default, but *overrides* (by Python name: turn_lease=0.5)."""
    return Settings(**{**{s.attr: s.default for s in _BY_ATTR.values()}, **overrides})


def parse(args: list[str], environ: Mapping[str, str]) -> Settings:
    """The settings from the command line *args* (without the program name) over the
    environment over the defaults.  Raises Error, naming the option or variable at fault."""
    values = {s.attr: s.default for s in _BY_ATTR.values()}
    for s in SETTINGS:
        if s.env in environ:
            values[s.attr] = _convert(s, environ[s.env], s.env)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            raise Error(f"unexpected argument {arg!r}: every setting is --name=value")
        name, equals, text = arg.lstrip("-").partition("=")
        s = _BY_ATTR.get(name.replace("-", "_"))
        if s is None:
            raise Error(_unknown(name, prefix="--"))
        if not equals:
            if s.type is bool:
                text = "true"
            elif i < len(args):
                text = args[i]
                i += 1
            else:
                raise Error(f"{s.option} needs a value")
        values[s.attr] = _convert(s, text, s.option)
    return Settings(**values)


def _convert(s: Setting, text: str, where: str) -> Any:
    value: Any
    if s.type is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise Error(f"{where} must be true or false, not {text!r}")
        value = text.lower() in _TRUE
    elif s.type in (int, float):
        try:
            value = s.type(text)
        except ValueError:
            kind = "a whole number" if s.type is int else "a number"
            raise Error(f"{where} must be {kind}, not {text!r}") from None
    else:
        value = text
    if s.choices and value not in s.choices:
        raise Error(f"{where} must be {' or '.join(s.choices)}, not {text!r}")
    return value


def _check_type(s: Setting, value: Any) -> None:
    ok = isinstance(value, s.type) and not (s.type is int and isinstance(value, bool))
    if s.type is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise TypeError(f"the setting {s.attr!r} is {_type_name(s)}, not {value!r}")


def _unknown(name: str, prefix: str = "") -> str:
    known = [s.attr for s in _BY_ATTR.values()]
    close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
    hint = f" (did you mean {prefix}{close[0].replace('_', '-') if prefix else close[0]}?)" if close else ""
    return f"no setting named {prefix}{name}{hint}"


# -- the generated texts ------------------------------------------------------------------

def _type_name(s: Setting) -> str:
    if s.choices:
        return " or ".join(s.choices)
    return {str: "text", int: "integer", float: "number", bool: "true/false"}[s.type]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def help_text() -> str:
    """What `python chatterd.py --help` prints."""
    lines = [f"usage: {PROGRAM} [--name=value ...]", "",
             *textwrap.wrap("Every setting can also be given in the environment variable shown "
                            "beside it; the command line wins over the environment, which wins "
                            "over the default.  docs/configuration.md lists the same.", 88)]
    for title, group in (*SECTIONS, ("Actions (command line only)", ACTIONS)):
        lines += ["", f"{title}:"]
        for s in group:
            value = "" if s.type is bool else "=" + ("|".join(s.choices) or _type_name(s).upper())
            default = _shown(s.default) if s.default != "" else '""'
            where = "" if s in ACTIONS else f", ${s.env}"
            lines.append(f"  {s.option}{value}  (default {default}{where})")
            lines += textwrap.wrap(s.help, 88, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                   break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """docs/configuration.md."""
    intro = (
        "Every setting is a command-line option (`--port=8001` or `--port 8001`) and an "
        "environment variable (`CHATTERD_PORT=8001`: `CHATTERD_` and the name in upper case, "
        "`-` becoming `_`).  The command line wins over the environment, which wins over the "
        "default.  A true/false setting is turned on by its bare option (`--xheaders`) or by "
        "`true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).  A value chatterd cannot use "
        "stops it at start with a message naming the option or variable.",
        f"`{PROGRAM} --help` prints the same list.  One-shot actions (`--import-course`) are "
        "command line only, so a service's environment file can never turn a server into a "
        "command that exits.",
    )
    out = ["# Configuration", "",
           f"<!-- Generated from settings.py by `{DOC_COMMAND}`: edit settings.py, not this file. -->"]
    for paragraph in intro:
        out += ["", *textwrap.wrap(paragraph, 90, break_on_hyphens=False, break_long_words=False)]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    for title, group in SECTIONS:
        out += ["", f"## {title}", "",
                "| Option | Environment variable | Type | Default | What it does |",
                "|---|---|---|---|---|"]
        for s in group:
            default = f"`{_shown(s.default)}`" if s.default != "" else "*(empty)*"
            out.append(f"| `{s.option}` | `{s.env}` | {_type_name(s)} | {default} | {cell(s.help)} |")
    out += ["", "## Actions (command line only)", "", "| Option | What it does |", "|---|---|"]
    out += [f"| `{s.option}` | {cell(s.help)} |" for s in ACTIONS]
    return "\n".join(out) + "\n"


def main(args: list[str]) -> None:
    if args == ["--markdown"]:
        sys.stdout.write(markdown())
    elif not args or args == ["--help"]:
        sys.stdout.write(help_text())
    else:
        raise SystemExit(f"usage: python -m settings [--markdown]  (--markdown: {DOC_COMMAND})")


if __name__ == "__main__":
    main(sys.argv[1:])
