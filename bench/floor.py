"""The floor for the shared harness's setting c: a /llmchat relay that stores nothing.

    bench/floor.py --port 8000 --ollama-url http://127.0.0.1:11434/api

Not chatterd and not a server to deploy: Tornado on uvloop, the conversation of each appID
kept in a dict of this process (nothing in PostgreSQL, lost when it stops, no turn rules),
its whole history sent upstream, each NDJSON line relayed as one SSE `data:` event.  Run it
as the shared harness's `cmd` target to see the TTFT that is left once the database costs
nothing at all (docs/benchmarks.md):

    cd ../shared/bench && ./run.sh --targets naive_tornado,cmd --settings c --rounds 2 \\
        --cmd-name floor --cmd-cwd /path/to/chatterd \\
        --cmd 'exec .venv/bin/python bench/floor.py --port $PORT --ollama-url $OLLAMA_BASE_URL'
"""

import argparse
import asyncio

import tornado.web
import ujson
import uvloop
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

CONVERSATIONS: dict[str, list[dict]] = {}


class FloorRelay(tornado.web.RequestHandler):
    async def post(self) -> None:
        try:
            body = ujson.loads(self.request.body)
            app_id, model = body["appID"], body["model"]
            incoming = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
        except (ValueError, KeyError, TypeError) as e:
            self.set_status(400)
            self.finish({"error": f"bad request: {e}"})
            return
        history = CONVERSATIONS.setdefault(app_id, [])
        history.extend(incoming)
        self.request.connection.stream.set_nodelay(True)  # each event at once, as chatterd
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        reply: list[str] = []
        rest = b""

        def relay(chunk: bytes) -> None:
            nonlocal rest
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    try:
                        reply.append(ujson.loads(line)["message"]["content"])
                    except (ValueError, KeyError, TypeError):
                        pass
                    self.write(b"data: " + line + b"\n\n")
            self.flush()

        upstream = ujson.dumps({"model": model, "messages": history, "stream": True})
        try:
            await AsyncHTTPClient().fetch(HTTPRequest(
                self.settings["ollama_url"] + "/chat", method="POST", body=upstream,
                streaming_callback=relay, request_timeout=3600))
        except Exception as e:  # noqa: BLE001 (a bench tool: say what failed, in the stream)
            self.write(b"event: error\ndata: " + ujson.dumps({"error": str(e)}).encode() + b"\n\n")
        history.append({"role": "assistant", "content": "".join(reply)})
        self.finish()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ollama-url", required=True, help="Ollama's base URL, with /api")
    args = parser.parse_args()
    AsyncHTTPClient.configure(None, max_clients=1000)
    app = tornado.web.Application([(r"/llmchat/?", FloorRelay)],
                                  ollama_url=args.ollama_url.rstrip("/"))
    app.listen(args.port, address="127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
