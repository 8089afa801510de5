"""The resident tools registry: name -> (Ollama tool schema, async function).

    registry = tools.resident(config)       # the tools the settings turn on
    registry.schemas()                      # offered to the model with the client's tools
    text = await registry.call(call)        # one of the model's tool_calls, run here

A call's arguments are validated against its schema first (a small JSON-schema subset:
type object/number/integer/string/boolean/array, properties, required, enum, minimum,
maximum, items); every failure (bad arguments, an exception, the --tool-timeout) becomes
the tool's result text, starting with "error:", which the model reads like any result.
Nothing a tool does can crash the turn.
"""

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import jsonfmt

log = logging.getLogger("chatterd")

ToolFunction = Callable[..., Awaitable[str]]


class InvalidArguments(ValueError):
    """The model's arguments do not match the tool's schema (the message says where)."""


@dataclass
class Tool:
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}
    run: ToolFunction  # awaited with the validated arguments as keywords; returns the result text

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "value")


def validate(schema: dict, value: Any, where: str = "arguments") -> None:
    """Raise InvalidArguments naming the first place where *value* breaks *schema*."""
    kind = schema.get("type")
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(jsonfmt.dumps(c) for c in schema["enum"])
        raise InvalidArguments(f"{where} must be one of {choices}, not {jsonfmt.dumps(value)}")
    actual = _kind(value)
    if kind == "object":
        if actual != "object":
            raise InvalidArguments(f"{where} must be an object, not {actual}")
        for name in schema.get("required", ()):
            if name not in value:
                raise InvalidArguments(f"{where}.{name} is required")
        properties = schema.get("properties") or {}
        for name, sub in properties.items():
            if name in value:
                validate(sub, value[name], f"{where}.{name}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                raise InvalidArguments(f"{where}.{extra[0]} is not a known argument")
    elif kind in ("number", "integer"):
        if actual not in ("integer", "number") or \
                (kind == "integer" and not (actual == "integer" or float(value).is_integer())):
            raise InvalidArguments(f"{where} must be {'an integer' if kind == 'integer' else 'a number'}, "
                                   f"not {actual}")
        if "minimum" in schema and value < schema["minimum"]:
            raise InvalidArguments(f"{where} must be at least {schema['minimum']}, not {value}")
        if "maximum" in schema and value > schema["maximum"]:
            raise InvalidArguments(f"{where} must be at most {schema['maximum']}, not {value}")
    elif kind == "string":
        if actual != "string":
            raise InvalidArguments(f"{where} must be a string, not {actual}")
    elif kind == "boolean":
        if actual != "boolean":
            raise InvalidArguments(f"{where} must be true or false, not {actual}")
    elif kind == "array":
        if actual != "array":
            raise InvalidArguments(f"{where} must be an array, not {actual}")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                validate(schema["items"], item, f"{where}[{i}]")


def call_name(call: Any) -> Optional[str]:
    """The tool name of one of Ollama's tool_calls entries, if it has one."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


class Registry:
    """The resident tools of this process."""

    def __init__(self, tools: list[Tool], *, timeout: float) -> None:
        self.tools = {t.name: t for t in tools}
        self.timeout = timeout

    def __bool__(self) -> bool:
        return bool(self.tools)

    def has(self, name: Optional[str]) -> bool:
        return name in self.tools

    def is_resident(self, call: Any) -> bool:
        return call_name(call) in self.tools

    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools.values()]

    async def call(self, call: dict) -> str:
        """Run one resident tool call; the result text, or "error: ..." (never raises)."""
        name = call_name(call) or ""
        tool = self.tools[name]
        arguments = call["function"].get("arguments")
        if isinstance(arguments, str):  # an OpenAI-style upstream may send a JSON string
            try:
                arguments = jsonfmt.loads(arguments) if arguments.strip() else {}
            except ValueError:
                return f"error: the arguments of {name} are not valid JSON"
        if arguments is None:
            arguments = {}
        try:
            validate(tool.schema["function"].get("parameters") or {"type": "object"}, arguments)
        except InvalidArguments as e:
            return f"error: {e}"
        try:
            result = await asyncio.wait_for(tool.run(**arguments), self.timeout)
        except asyncio.TimeoutError:
            return f"error: {name} did not finish within {self.timeout:g} s"
        except Exception as e:  # a tool's failure is its result, never the turn's crash
            log.warning("resident tool %s failed: %r", name, e)
            return f"error: {name} failed: {e}"
        return result if isinstance(result, str) else jsonfmt.dumps(result)

