"""POST /llmchat: store the turn, send the whole conversation to Ollama, relay the reply as SSE.

The life of a turn:
1. validate and store the incoming messages (one transaction);
2. read the conversation and release the connection: none is held while streaming;
3. start Ollama's /api/chat and wait up to --status-grace for its status.  A non-200
   within the grace becomes that status (and the stored messages are removed);
   otherwise the response commits to 200 and heartbeats cover the model's silence;
4. relay each NDJSON line as one `data:` event, flushing once per upstream chunk;
5. store the reply exactly as streamed, marked complete, interrupted (client left)
   or failed (upstream error, timeout, shutdown), before the response ends.
"""

import logging
from typing import Optional

from tornado.iostream import StreamClosedError

import jsonfmt
import metrics
import sse
from db import conversations
from db.conversations import Reply
from db.pool import DatabaseUnavailable
from handlers.base import ClientError, UpstreamHandler
from handlers.llm_request import LLMRequest, parse_llm_request
from ollama_client import OllamaAborted, OllamaError


log = logging.getLogger("chatterd")


class ReplyText:
    """A reply's text as it streams in.

    The hot path appends each token to `recent`; `compact()`, once per upstream chunk,
    joins them into blocks, since a str per token costs ~50 bytes of overhead.
    """

    __slots__ = ("recent", "blocks", "pieces")

    def __init__(self) -> None:
        self.recent: list[str] = []
        self.blocks: list[str] = []
        self.pieces = 0  # tokens in blocks

    def compact(self) -> None:
        if len(self.recent) >= 256:
            self.pieces += len(self.recent)
            self.blocks.append("".join(self.recent))
            self.recent.clear()

    def __len__(self) -> int:
        return self.pieces + len(self.recent)

    def __str__(self) -> str:
        return "".join(self.blocks) + "".join(self.recent)


class LLMChatHandler(UpstreamHandler):
    outcome: Optional[str] = None  # for the access log: complete, interrupted or failed

    async def post(self) -> None:
        self.refuse_when_draining()
        request = parse_llm_request(self.json_object(), max_messages=self.settings["max_messages"])
        self.app_id = request.app_id
        turn = await conversations.append_messages(self.pool, request.app_id, request.messages)
        try:
            history = await conversations.load_history(self.pool, request.app_id)
        except DatabaseUnavailable:
            await self._forget_turn(turn)
            raise
        self.reply = Reply(model=request.model)
        self.failure: Optional[str] = None
        self.done_seen = False
        self.text = ReplyText()
        self.time_to_first_token: Optional[float] = None
        metrics.ACTIVE_STREAMS.inc()
        try:
            if request.stream:
                await self._stream(request, history, turn)
            else:
                await self._once(request, history, turn)
        finally:
            metrics.ACTIVE_STREAMS.dec()

    # -- streaming ------------------------------------------------------------------

    async def _stream(self, request: LLMRequest, history: list[dict], turn: list[int]) -> None:
        self.events = sse.EventStream(self, self.settings["heartbeat"])
        self.events.set_headers()
        self.start_call("/api/chat", request.upstream_body(history), self._on_lines)
        status = await self.call.wait_status(self.settings["status_grace"])
        if (status is not None and status != 200) or self.call.failed_early:
            try:
                await self.call.finished()  # raises: it is not a 200
            except OllamaError as e:
                await self._refuse(turn, e)  # still before the stream: a real status
            return
        try:
            await self._open()
            try:
                await self.call.finished()
            except OllamaAborted as e:
                self._end("interrupted" if self.client_gone else "failed", e.message)
            except OllamaError as e:
                self._end("failed", e.message)
            else:
                if not self.done_seen:
                    self._end("failed", "Ollama ended the reply without its final done message")
            await self._store_reply()
        finally:
            self.events.close()
            self._observe()

    async def _refuse(self, turn: list[int], error: OllamaError) -> None:
        """End a turn that failed before anything was sent to the client: nothing stays stored."""
        await self._forget_turn(turn)
        if self.client_gone:  # left before anything was sent: the turn never happened
            self.set_status(499, "Client Closed Request")
            return
        self.clear()
        raise ClientError(error.status, error.message)

    async def _open(self) -> None:
        if self.events.opened or self.client_gone:
            return
        try:
            # Still waiting for Ollama's status: say something so proxies see a live stream.
            await self.events.open(b"" if self.call.status == 200 else sse.KEEPALIVE)
        except StreamClosedError:
            self.on_connection_close()

    async def _on_lines(self, lines: list[bytes]) -> None:
        """The hot path: light bookkeeping per line, one write and one flush per chunk."""
        reply = self.reply
        parts = self.text.recent
        relayed = lines
        for i, line in enumerate(lines):
            try:
                chunk = jsonfmt.loads(line)
                message = chunk.get("message")
            except (ValueError, AttributeError):
                self._fail_upstream(f"Ollama sent a line that is not a JSON object: {line[:80]!r}")
                relayed = lines[:i]
                break
            if "error" in chunk:
                self._fail_upstream(f"Ollama: {chunk['error']}")
                relayed = lines[:i]
                break
            if message:
                content = message.get("content")
                if content:
                    parts.append(content)
                    if self.time_to_first_token is None:
                        self.time_to_first_token = self.request.request_time()
                if "tool_calls" in message:
                    reply.extra.setdefault("tool_calls", []).extend(message["tool_calls"])
            if chunk.get("done"):
                self.done_seen = True
                reply.tokens = chunk.get("eval_count")
        self.text.compact()
        if relayed and not self.client_gone:
            await self._open()
            try:
                await self.events.send(sse.data_events(relayed))
            except StreamClosedError:
                self.on_connection_close()

    def _fail_upstream(self, message: str) -> None:
        self.failure = message
        self.call.abort(OllamaError(message))

    def _end(self, status: str, error: str) -> None:
        self.reply.status = status
        self.reply.error = self.failure or error
        if status == "interrupted":
            metrics.CLIENT_DISCONNECTS.inc()

    async def _store_reply(self) -> None:
        """Commit the reply before the response ends, so the next request sees it."""
        reply = self.reply
        reply.content = str(self.text)
        try:
            await self._store_with_retry()
        except Exception as e:  # noqa: BLE001 - any failure must reach the client as an event
            log.warning("storing the reply of appID %r failed: %s", self.app_id, e)
            await self._send_error(f"storing the reply failed: {e}")
        if reply.status != "complete" and reply.error:
            await self._send_error(reply.error)

    async def _store_with_retry(self) -> None:
        try:
            await conversations.store_reply(self.pool, self.app_id, self.reply)
        except DatabaseUnavailable:
            # A broken pooled connection is replaced on the next acquire: try once more.
            await conversations.store_reply(self.pool, self.app_id, self.reply)

    async def _send_error(self, message: str) -> None:
        if self.client_gone:
            return
        try:
            await self.events.send(sse.error_event(message))
        except StreamClosedError:
            self.client_gone = True

    def _observe(self) -> None:
        self.tokens = self.reply.tokens if self.reply.tokens is not None else len(self.text)
        self.outcome = self.reply.status
        metrics.TOKENS.inc(self.tokens)
        if self.time_to_first_token is not None:
            metrics.TIME_TO_FIRST_TOKEN.observe(self.time_to_first_token)
        metrics.STREAM_DURATION.labels(outcome=self.reply.status).observe(self.request.request_time())

    # -- stream: false -------------------------------------------------------------

    async def _once(self, request: LLMRequest, history: list[dict], turn: list[int]) -> None:
        """Ollama's single JSON object, passed through; the reply stored the same way."""
        self.start_call("/api/chat", request.upstream_body(history), None)
        try:
            await self.call.finished()
        except OllamaError as e:
            await self._refuse(turn, e)
            return
        body = bytes(self.call.body)
        try:
            answer = jsonfmt.loads(body)
            message = answer["message"]
            self.reply.content = message.get("content", "")
            if message.get("tool_calls"):
                self.reply.extra["tool_calls"] = message["tool_calls"]
            self.reply.tokens = answer.get("eval_count")
        except (ValueError, KeyError, TypeError, AttributeError):
            await self._refuse(turn, OllamaError("Ollama's answer is not a chat response object"))
            return
        await self._store_with_retry()
        self.tokens, self.outcome = self.reply.tokens, "complete"
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    async def _forget_turn(self, turn: list[int]) -> None:
        try:
            await conversations.delete_messages(self.pool, turn)
        except DatabaseUnavailable as e:
            log.warning("could not remove the rejected turn of appID %r: %s", self.app_id, e)
