"""POST /llmtools against a real PostgreSQL, the Ollama double (tool calls whole in one line,
as Ollama sends them) and a local fake Open-Meteo: resident tools run by chatterd, client
tools relayed as `event: tool_calls`, tool schemas kept per conversation, bounded rounds,
tool errors as result text, and the turn contract through it all."""

import asyncio
from urllib.parse import parse_qs, urlparse

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port, gen_test

import jsonfmt
from tests.message_shape import shape_problems
from tests.ollama_double import default_reply, tool_call
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_and_leave, chat_body, streams_finished
from tools import weather
from tools.registry import InvalidArguments, Registry, Tool, validate

LOCATION = {"type": "function", "function": {
    "name": "get_location", "description": "The device's current location",
    "parameters": {"type": "object", "properties": {}}}}
CONTACTS = {"type": "function", "function": {
    "name": "get_contacts", "description": "The user's contacts",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


class FakeOpenMeteo:
    """Open-Meteo's forecast endpoint, as far as get_weather uses it."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.delay = 0.0
        meteo = self

        class Forecast(tornado.web.RequestHandler):
            async def get(self) -> None:
                query = {k: v[0] for k, v in parse_qs(urlparse(self.request.uri).query).items()}
                meteo.requests.append(query)
                if meteo.delay:
                    await asyncio.sleep(meteo.delay)
                self.set_status(meteo.status)
                if meteo.status != 200:
                    self.finish({"error": True, "reason": "Latitude must be in range of -90 to 90°."})
                    return
                self.finish({"latitude": float(query["latitude"]), "longitude": float(query["longitude"]),
                             "current_units": {"time": "iso8601", "temperature_2m": "°C",
                                               "wind_speed_10m": "km/h", "weather_code": "wmo code"},
                             "current": {"time": "2026-11-21T16:00", "interval": 900,
                                         "temperature_2m": 7.5, "wind_speed_10m": 12.1,
                                         "weather_code": 3}})

        sock, port = bind_unused_port()
        self.server = HTTPServer(tornado.web.Application([(r"/v1/forecast", Forecast)]))
        self.server.add_sockets([sock])
        self.url = f"http://127.0.0.1:{port}/v1/forecast"


WEATHER_TEXT = ("Current weather at latitude 42.28, longitude -83.74 (2026-11-21T16:00): "
                "temperature_2m 7.5°C, wind_speed_10m 12.1km/h, weather_code 3wmo code")


class ToolsTestCase(ChatterdTestCase):
    serve_weather = True  # False: --weather-url is empty

    def get_app(self):
        self.meteo = FakeOpenMeteo()
        return super().get_app()

    def make_config(self):
        return super().make_config().replace(weather_url=self.meteo.url if self.serve_weather else "")

    def tearDown(self) -> None:
        self.meteo.server.stop()
        super().tearDown()

    def tools(self, body, path="/llmtools"):
        response = self.post_json(path, body)
        events = parse(response.body)[0] if response.code == 200 else []
        return response, events

    def stored(self, app_id):
        return [(r["role"], r["content"], r["extra"], r["status"]) for r in self.rows(app_id)]

    def turn_rows(self, app_id):
        return self.io_loop.run_sync(lambda: self.pool.fetch(
            "SELECT id, status, continues, error, unanswered FROM turns WHERE appid = $1 ORDER BY id",
            app_id))

    def record(self, app_id):
        """Every message row of the appID's turns, in order (records outside the conversation
        included)."""
        return self.io_loop.run_sync(lambda: self.pool.fetch(
            "SELECT role, content, extra, status FROM messages WHERE appid = $1 ORDER BY turn_id, seq",
            app_id))

    def kept_schemas(self, app_id):
        return self.io_loop.run_sync(lambda: self.pool.fetchval(
            "SELECT schemas FROM tool_schemas WHERE appid = $1", app_id))


class ResidentToolTest(ToolsTestCase):
    def test_resident_tool_round_trip(self):
        call = tool_call("get_weather", lat=42.28, lon=-83.74)
        self.double.behave("llama3.2", tool_calls=[call])
        response, events = self.tools(chat_body("w", "Weather here?", tools=[LOCATION]))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["Content-Type"], "text/event-stream")
        first, second = self.double.chat_requests()
        # Round 1: the conversation, the client's tools and the resident ones.
        self.assertEqual(first.body["messages"], [{"role": "user", "content": "Weather here?"}])
        self.assertEqual(first.body["tools"], [LOCATION, weather.SCHEMA])
        self.assertNotIn("appID", first.body)
        # chatterd ran get_weather against Open-Meteo ...
        self.assertEqual(self.meteo.requests, [{"latitude": "42.28", "longitude": "-83.74",
                                                "current": "temperature_2m,wind_speed_10m,weather_code"}])
        # ... and round 2 sends the call and its result.
        exchange = [{"role": "user", "content": "Weather here?"},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": WEATHER_TEXT, "tool_name": "get_weather"}]
        self.assertEqual(second.body["messages"], exchange)
        self.assertEqual(second.body["tools"], [LOCATION, weather.SCHEMA])
        # The client saw the whole exchange as one stream: the call line, then the answer,
        # one done at the very end (round 1's done line is not relayed).
        self.assertTrue(all(e.event == "message" for e in events))
        self.assertEqual(events[0].data.encode(), first.lines_sent[0])
        self.assertEqual([e.data.encode() for e in events[1:]], second.lines_sent)
        chunks = [jsonfmt.loads(e.data) for e in events]
        self.assertEqual([c["done"] for c in chunks].count(True), 1)
        answer = "".join(c["message"]["content"] for c in chunks)
        self.assertEqual(answer, default_reply(exchange))
        # Stored: one turn, the whole exchange in order.
        self.assertEqual(self.stored("w"), [
            ("user", "Weather here?", None, "complete"),
            ("assistant", "", {"tool_calls": [call]}, "complete"),
            ("tool", WEATHER_TEXT, {"tool_name": "get_weather"}, "complete"),
            ("assistant", answer, None, "complete")])
        (turn,) = self.turn_rows("w")
        self.assertEqual((turn["status"], turn["continues"]), ("complete", False))
        self.assertEqual(self.kept_schemas("w"), [LOCATION])
        # The next turn sends the stored exchange as it was.
        self.double.behave("llama3.2")  # no more tool calls
        self.tools(chat_body("w", "Thanks"))
        self.assertEqual(self.double.chat_requests()[2].body["messages"],
                         exchange + [{"role": "assistant", "content": answer},
                                     {"role": "user", "content": "Thanks"}])
        # Token counts kept consistent (0005): the turn's total is its messages' sum.
        sizes = self.io_loop.run_sync(lambda: self.pool.fetchrow(
            "SELECT (SELECT sum(tokens) FROM turns WHERE appid = 'w') AS turns,"
            " (SELECT sum(ntokens) FROM messages WHERE appid = 'w') AS messages,"
            " (SELECT tokens FROM conversation_sizes WHERE appid = 'w') AS size,"
            " (SELECT messages FROM conversation_sizes WHERE appid = 'w') AS n"))
        self.assertEqual((sizes["turns"], sizes["size"], sizes["n"]), (sizes["messages"],) * 2 + (6,))

    def test_tool_error_becomes_result_text(self):
        self.meteo.status = 400
        self.double.behave("llama3.2", tool_calls=[tool_call("get_weather", lat=42.28, lon=-83.74)])
        response, events = self.tools(chat_body("e", "Weather?"))
        self.assertEqual(response.code, 200)
        result = self.double.chat_requests()[1].body["messages"][2]
        self.assertEqual(result, {"role": "tool", "tool_name": "get_weather", "content":
                                  "error: the weather service answered 400: "
                                  "Latitude must be in range of -90 to 90°."})
        self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
        self.assertEqual([r[0] for r in self.stored("e")], ["user", "assistant", "tool", "assistant"])

    def test_bad_arguments_are_validated_not_run(self):
        self.double.behave("llama3.2", tool_calls=[
            {"id": "call_1", "function": {"index": 0, "name": "get_weather",
                                          "arguments": {"lat": "north", "lon": 1}}},
            {"id": "call_2", "function": {"index": 1, "name": "get_weather",
                                          "arguments": {"lat": 91, "lon": 1}}},
            {"id": "call_3", "function": {"index": 2, "name": "get_weather", "arguments": {"lon": 1}}}])
        response, _ = self.tools(chat_body("b", "Weather?"))
        self.assertEqual(response.code, 200)
        results = self.double.chat_requests()[1].body["messages"][2:]
        self.assertEqual([(r["tool_call_id"], r["content"]) for r in results], [
            ("call_1", "error: arguments.lat must be a number, not string"),
            ("call_2", "error: arguments.lat must be at most 90, not 91"),
            ("call_3", "error: arguments.lat is required")])
        self.assertEqual(self.meteo.requests, [])

    def test_client_tool_is_sent_to_the_client_and_its_result_continues(self):
        call = tool_call("get_location")
        self.double.behave("llama3.2", tool_calls=[call])
        response, events = self.tools(chat_body("c", "Weather here?", tools=[LOCATION]))
        self.assertEqual(response.code, 200)
        (upstream,) = self.double.chat_requests()
        self.assertEqual([e.event for e in events], ["tool_calls", "message"])
        self.assertEqual(events[0].data.encode(), upstream.lines_sent[0])  # the NDJSON line
        self.assertEqual(jsonfmt.loads(events[0].data)["message"]["tool_calls"], [call])
        self.assertTrue(jsonfmt.loads(events[1].data)["done"])
        self.assertEqual(self.stored("c"), [("user", "Weather here?", None, "complete"),
                                            ("assistant", "", {"tool_calls": [call]}, "complete")])
        self.assertEqual(self.meteo.requests, [])
        # The client runs its tool and sends the result, without resending its tools.
        result = {"role": "tool", "content": "lat 42.28, lon -83.74", "tool_name": "get_location"}
        response, events = self.tools({"appID": "c", "model": "llama3.2", "messages": [result]})
        self.assertEqual(response.code, 200)
        second = self.double.chat_requests()[1]
        self.assertEqual(second.body["messages"], [
            {"role": "user", "content": "Weather here?"},
            {"role": "assistant", "content": "", "tool_calls": [call]}, result])
        self.assertEqual(second.body["tools"], [LOCATION, weather.SCHEMA])  # remembered
        self.assertEqual([(t["status"], t["continues"]) for t in self.turn_rows("c")],
                         [("complete", False), ("complete", True)])

    def test_mixed_calls_split_resident_run_client_relayed(self):
        calls = [tool_call("get_weather", lat=42.28, lon=-83.74), tool_call("get_location")]
        self.double.behave("llama3.2", tool_calls=calls)
        response, events = self.tools(chat_body("m", "Both?", tools=[LOCATION]))
        self.assertEqual([e.event for e in events], ["message", "tool_calls", "message"])
        self.assertEqual(jsonfmt.loads(events[0].data)["message"]["tool_calls"], calls[:1])
        self.assertEqual(jsonfmt.loads(events[1].data)["message"]["tool_calls"], calls[1:])
        self.assertEqual(len(self.double.chat_requests()), 1)
        self.assertEqual(self.stored("m"), [
            ("user", "Both?", None, "complete"),
            ("assistant", "", {"tool_calls": calls}, "complete"),
            ("tool", WEATHER_TEXT, {"tool_name": "get_weather"}, "complete")])
        result = {"role": "tool", "content": "here", "tool_name": "get_location"}
        self.tools({"appID": "m", "model": "llama3.2", "messages": [result]})
        self.assertEqual([m["role"] for m in self.double.chat_requests()[1].body["messages"]],
                         ["user", "assistant", "tool", "tool"])

    def test_tool_schemas_are_kept_and_replaced(self):
        self.tools(chat_body("s", "one", tools=[LOCATION]))
        self.tools(chat_body("s", "two"))
        self.tools(chat_body("s", "three", tools=[CONTACTS]))
        self.tools(chat_body("s", "four"))
        offered = [r.body["tools"] for r in self.double.chat_requests()]
        self.assertEqual(offered, [[LOCATION, weather.SCHEMA], [LOCATION, weather.SCHEMA],
                                   [CONTACTS, weather.SCHEMA], [CONTACTS, weather.SCHEMA]])
        self.assertEqual(self.kept_schemas("s"), [CONTACTS])
        # A client tool named like a resident one is not offered: the resident one is.
        mine = {"type": "function", "function": {"name": "get_weather", "description": "mine"}}
        self.tools(chat_body("s", "five", tools=[mine, LOCATION]))
        self.assertEqual(self.double.chat_requests()[4].body["tools"], [LOCATION, weather.SCHEMA])
        self.tools(chat_body("s", "six", tools=[]))  # an empty list clears them
        self.assertEqual(self.double.chat_requests()[5].body["tools"], [weather.SCHEMA])

    def test_llmprep_starts_over_without_the_kept_schemas(self):
        self.tools(chat_body("sp", "one", tools=[LOCATION]))
        self.assertEqual(self.kept_schemas("sp"), [LOCATION])
        prep = self.post_json("/llmprep", {"appID": "sp", "model": "llama3.2",
                                           "messages": [{"role": "system", "content": "Be brief."}]})
        self.assertEqual(prep.code, 200)
        self.assertIsNone(self.kept_schemas("sp"))
        self.tools(chat_body("sp", "two"))
        self.assertEqual(self.double.chat_requests()[-1].body["tools"], [weather.SCHEMA])

    def test_invalid_tools_and_bodies_are_422_naming_the_field(self):
        cases = [
            ({"tools": {"a": 1}}, "tools must be a list of tool schemas"),
            ({"tools": [1]}, "tools[0] must be an object with type and function"),
            ({"tools": [{"type": "fn", "function": {}}]}, 'tools[0].type must be "function"'),
            ({"tools": [LOCATION, {"type": "function"}]}, "tools[1].function must be an object"),
            ({"tools": [{"type": "function", "function": {"name": "", "description": ""}}]},
             "tools[0].function.name must be a non-empty string"),
            ({"tools": [{"type": "function", "function": {"name": "x"}}]},
             "tools[0].function.description must be a string"),
            ({"tools": [LOCATION, LOCATION]}, 'tools[1].function.name "get_location" is given twice'),
            ({"tools": [{"type": "function", "function": {"name": "x", "description": "",
                                                           "parameters": []}}]},
             "tools[0].function.parameters must be an object"),
            ({"stream": False}, "stream must be true"),
        ]
        for extra, message in cases:
            response = self.post_json("/llmtools", chat_body("v", "hi", **extra))
            self.assertEqual(response.code, 422, extra)
            self.assertIn(message, jsonfmt.loads(response.body)["error"])
        bad = {"appID": "v", "model": "llama3.2",
               "messages": [{"role": "tool", "content": "x", "tool_name": 3}]}
        self.assertEqual(jsonfmt.loads(self.post_json("/llmtools", bad).body)["error"],
                         "messages[0].tool_name must be a string")
        self.assertEqual(self.double.chat_requests(), [])

    @gen_test(timeout=20)
    async def test_client_leaving_while_the_tool_runs_leaves_a_record_outside_the_conversation(self):
        # No round follows, so the model never answers the result: the call is not stored,
        # and a reply with no text then makes the turn one that ended before any answer text.
        self.meteo.delay = 0.5
        call = tool_call("get_weather", lat=42.28, lon=-83.74)
        self.double.behave("llama3.2", tool_calls=[call])
        await chat_and_leave(self.get_http_port(), chat_body("d", "Weather?"),
                             wait_for=b'"tool_calls"', path=b"/llmtools")
        await streams_finished(self._app)
        self.assertEqual(len(self.double.chat_requests()), 1)  # no round after the client left
        self.assertEqual(len(self.meteo.requests), 1)  # the tool had started: it finished
        self.assertEqual(await self.conversation("d"), [])
        (turn,) = await self.turns("d")
        self.assertEqual((turn["status"], turn["unanswered"]), ("interrupted", True))
        rows = await self.pool.fetch("SELECT role, content, extra FROM messages WHERE appid = 'd'"
                                     " ORDER BY turn_id, seq")
        self.assertEqual([tuple(r) for r in rows], [("user", "Weather?", None), ("assistant", "", None)])

    @gen_test(timeout=20)
    async def test_client_leaving_in_the_next_round_keeps_the_finished_round(self):
        call = tool_call("get_weather", lat=42.28, lon=-83.74)
        self.double.behave("llama3.2", tool_calls=[call], token_delay=0.05)
        await chat_and_leave(self.get_http_port(), chat_body("d2", "Weather?"),
                             wait_for=b"Reply", path=b"/llmtools")
        await streams_finished(self._app)
        rows = await self.conversation("d2")
        self.assertEqual([(r["role"], r["status"]) for r in rows],
                         [("user", "complete"), ("assistant", "complete"), ("tool", "complete"),
                          ("assistant", "interrupted")])
        self.assertTrue(rows[3]["content"].startswith(" Reply"))
        self.assertEqual(rows[1]["extra"], {"tool_calls": [call]})

    def test_a_call_whose_round_failed_is_neither_run_nor_stored(self):
        # The call line arrives, then Ollama's stream ends without its done line.
        self.double.behave("llama3.2", tool_calls=[tool_call("get_weather", lat=1, lon=2)],
                           reply="Let me check.", omit_done=True)
        response, events = self.tools(chat_body("f", "Weather?"))
        self.assertEqual([e.event for e in events[-2:]], ["message", "error"])
        self.assertIn("tool_calls", events[-2].data)  # the client saw the call line ...
        self.assertEqual(self.meteo.requests, [])  # ... but it was not run
        self.assertEqual(self.stored("f"), [("user", "Weather?", None, "complete"),
                                            ("assistant", "Let me check.", None, "failed")])


class BoundedRoundsTest(ToolsTestCase):
    settings_overrides = {"tool_rounds": 2}

    def test_rounds_are_bounded(self):
        call = tool_call("get_weather", lat=42.28, lon=-83.74)
        self.double.behave("llama3.2", tool_calls=lambda messages: [call])  # calls forever
        response, events = self.tools(chat_body("r", "Weather?"))
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.double.chat_requests()), 3)
        self.assertEqual(len(self.meteo.requests), 2)
        self.assertEqual(events[-1].event, "error")
        self.assertIn("the limit is 2 (--tool-rounds)", jsonfmt.loads(events[-1].data)["error"])
        self.assertFalse(any(jsonfmt.loads(e.data).get("done") for e in events[:-1]))
        # The third call is neither run nor stored, and the model never answered in text: the
        # turn ended before any answer text, a record (with its two rounds) outside the
        # conversation, so no later turn goes on from a tool result.
        self.assertEqual([(r["role"], r["status"]) for r in self.record("r")],
                         [("user", "complete")] + [("assistant", "complete"), ("tool", "complete")] * 2
                         + [("assistant", "failed")])
        self.assertEqual(self.stored("r"), [])
        (turn,) = self.turn_rows("r")
        self.assertEqual((turn["status"], turn["unanswered"]), ("failed", True))
        self.double.behave("llama3.2")
        self.assertEqual(self.tools(chat_body("r", "And now?"))[0].code, 200)
        sent = self.double.chat_requests()[3].body["messages"]
        self.assertEqual([(m["role"], m["content"]) for m in sent], [("user", "And now?")])

    def test_a_later_round_with_text_keeps_the_finished_rounds_well_formed(self):
        # The model says something with its third call: that text is its answer, and the two
        # finished rounds stay, each call followed by its result and an answer.
        call = tool_call("get_weather", lat=42.28, lon=-83.74)
        self.double.behave("llama3.2", tool_calls=lambda messages: [call],
                           reply="Checking again.")
        response, events = self.tools(chat_body("rt", "Weather?"))
        self.assertEqual(events[-1].event, "error")
        self.assertEqual([(r[0], r[3]) for r in self.stored("rt")],
                         [("user", "complete")] + [("assistant", "complete"), ("tool", "complete")] * 2
                         + [("assistant", "failed")])
        self.assertEqual(self.stored("rt")[-1][1:3], ("Checking again.", None))
        self.double.behave("llama3.2")
        self.assertEqual(self.tools(chat_body("rt", "And now?"))[0].code, 200)
        sent = self.double.chat_requests()[-1].body["messages"]
        self.assertEqual(shape_problems(sent), [])


class WeatherOffTest(ToolsTestCase):
    serve_weather = False

    def test_weather_tool_off_when_url_is_empty(self):
        self.assertFalse(self._app.tools)
        call = tool_call("get_weather", lat=1, lon=2)
        self.double.behave("llama3.2", tool_calls=[call])
        response, events = self.tools(chat_body("o", "Weather?", tools=[LOCATION]))
        (upstream,) = self.double.chat_requests()
        self.assertEqual(upstream.body["tools"], [LOCATION])
        self.assertEqual([e.event for e in events], ["tool_calls", "message"])  # the client's now
        self.assertEqual(self.meteo.requests, [])

    def test_no_tools_at_all_sends_none(self):
        response, events = self.tools(chat_body("o2", "hi"))
        self.assertEqual(response.code, 200)
        self.assertNotIn("tools", self.double.chat_requests()[0].body)


# --- the registry and the validator, without a server ------------------------------------


def test_validator_subset():
    schema = {"type": "object", "required": ["n", "unit"],
              "properties": {"n": {"type": "integer", "minimum": 1},
                             "unit": {"type": "string", "enum": ["C", "F"]},
                             "exact": {"type": "boolean"},
                             "tags": {"type": "array", "items": {"type": "string"}}}}
    validate(schema, {"n": 2, "unit": "C", "exact": True, "tags": ["a"], "other": None})
    validate(schema, {"n": 2.0, "unit": "F"})
    for value, message in [
            ([], "arguments must be an object, not array"),
            ({"unit": "C"}, "arguments.n is required"),
            ({"n": 1.5, "unit": "C"}, "arguments.n must be an integer, not number"),
            ({"n": True, "unit": "C"}, "arguments.n must be an integer, not boolean"),
            ({"n": 0, "unit": "C"}, "arguments.n must be at least 1, not 0"),
            ({"n": 1, "unit": "K"}, 'arguments.unit must be one of "C", "F", not "K"'),
            ({"n": 1, "unit": "C", "exact": "yes"}, "arguments.exact must be true or false, not string"),
            ({"n": 1, "unit": "C", "tags": [1]}, "arguments.tags[0] must be a string, not integer")]:
        with pytest.raises(InvalidArguments) as e:
            validate(schema, value)
        assert str(e.value) == message


def test_registry_turns_every_failure_into_result_text():
    async def boom(**_):
        raise RuntimeError("disk on fire")

    async def slow(**_):
        await asyncio.sleep(5)
        return "late"

    async def fine(x):
        return {"x": x}

    def schema(name, params=None):
        return {"type": "function", "function": {"name": name, "description": name,
                                                 **({"parameters": params} if params else {})}}

    registry = Registry([Tool(schema("boom"), boom), Tool(schema("slow"), slow),
                         Tool(schema("fine", {"type": "object", "required": ["x"],
                                              "properties": {"x": {"type": "number"}}}), fine)],
                        timeout=0.2)

    async def run():
        return [await registry.call(tool_call("boom")),
                await registry.call(tool_call("slow")),
                await registry.call(tool_call("fine", x=1)),
                await registry.call({"function": {"name": "fine", "arguments": '{"x": 2}'}}),
                await registry.call({"function": {"name": "fine", "arguments": "{x"}}),
                await registry.call(tool_call("fine"))]

    assert asyncio.run(run()) == [
        "error: boom failed: disk on fire", "error: slow did not finish within 0.2 s",
        '{"x":1}', '{"x":2}', "error: the arguments of fine are not valid JSON",
        "error: arguments.x is required"]



class ResentToolTurnTest(ToolsTestCase):
    def test_a_resent_tool_turn_that_was_never_delivered_is_answered_from_storage(self):
        call = tool_call("get_weather", lat=42.28, lon=-83.74)
        self.double.behave("llama3.2", tool_calls=[call])
        body = chat_body("rt", "Weather here?", tools=[LOCATION])
        response, _ = self.tools(body)
        self.assertEqual(response.code, 200)
        asked = len(self.double.chat_requests())
        # A SIGKILL between the commit and the done line: the delivery was never recorded.
        self._app.turns._delivered.clear()
        again, events = self.tools(body)
        self.assertEqual(again.code, 200)
        self.assertIn("X-Chatterd-Replayed", again.headers)
        self.assertEqual(len(self.double.chat_requests()), asked)  # neither the model nor the tool
        self.assertEqual(len(self.meteo.requests), 1)
        stored = self.rows("rt")
        self.assertEqual([r["role"] for r in stored], ["user", "assistant", "tool", "assistant"])
        self.assertEqual(jsonfmt.loads(events[0].data)["message"]["content"], stored[-1]["content"])
