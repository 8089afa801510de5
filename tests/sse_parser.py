"""A strict Server-Sent Events parser (WHATWG HTML, "event stream interpretation").

Strict beyond the standard where a sloppy server would slip through: every line
must be a comment or one of our fields, and the stream must end on an event
boundary, so an event cut in half is an error rather than silently dropped.
"""

from dataclasses import dataclass, field


class SSEError(AssertionError):
    pass


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    comments: list[str] = field(default_factory=list)


def parse(raw: bytes) -> tuple[list[Event], list[str]]:
    """Return (events, comments) of a complete SSE body."""
    text = raw.decode("utf-8")  # SSE is always UTF-8; invalid bytes are an error
    if text.startswith("\ufeff"):
        text = text[1:]
    if text and not (text.endswith("\n\n") or text.endswith("\r\n\r\n")):
        raise SSEError(f"stream does not end on an event boundary: {text[-40:]!r}")
    events: list[Event] = []
    comments: list[str] = []
    data: list[str] = []
    event_type = ""
    for line in text.replace("\r\n", "\n").split("\n")[:-1]:
        if line == "":
            if data:
                events.append(Event(event_type or "message", "\n".join(data)))
            elif event_type:
                raise SSEError(f"event {event_type!r} without data")
            data, event_type = [], ""
            continue
        if line.startswith(":"):
            comments.append(line[1:].lstrip(" "))
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name in ("id", "retry"):
            continue
        else:
            raise SSEError(f"unknown SSE field in line {line!r}")
    return events, comments
