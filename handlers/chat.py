"""POST /llmchat: one turn of an appID's conversation, the reply relayed as SSE.

The life of a turn (turns/ keeps the rules, db/conversations.py the SQL):
1. validate the body, then wait until no other turn of the appID runs, store the
   incoming messages as pending and read the conversation: one round trip, and no
   connection is held while streaming.  When this process knows the conversation, the
   upstream request is sent meanwhile (handlers/early_call.py) and used only if that
   round trip confirms it, else cancelled;
2. start Ollama's /api/chat and wait up to --status-grace for its status.  A non-200
   within the grace becomes that status and the turn is rejected (never part of the
   conversation); otherwise the response commits to 200 and heartbeats cover the
   model's silence;
3. relay each NDJSON line as one `data:` event, one write per upstream chunk;
4. end the turn: its reply, exactly as streamed, enters the conversation with the
   incoming messages, marked complete, interrupted (client left) or failed (upstream
   error, timeout, shutdown).  Ollama's final `done` line is relayed only once that is
   committed, so a client that saw `done` knows the turn is stored.  A client that
   left before any of the answer was sent gets its turn rejected instead.
"""

import datetime
import logging
from typing import Awaitable, Optional

import asyncpg
from tornado.iostream import StreamClosedError

import jsonfmt
import metrics
import sse
from db.conversations import Reply
from db.pool import DatabaseUnavailable
from handlers.base import UpstreamHandler
from handlers.early_call import EarlyCall, EarlyUpstream
from handlers.validation import ClientError
from handlers.llm_request import LLMRequest, parse_llm_request
from handlers.reply_text import ReplyText, prompt_count, token_count
from handlers.resumable import ResumableTurn
from handlers.turn_start import announce_window, begin_turn
from upstreams.errors import UpstreamAborted, UpstreamError
from turns import ClientLeft, Turn, TurnNotStored

log = logging.getLogger("chatterd")


class LLMChatHandler(EarlyUpstream, ResumableTurn, UpstreamHandler):
    # The turn's relay state lives in slots: with Tornado's own attributes, a handler's
    # instance dictionary outgrew the one CPython shares between instances (30 keys) and
    # became a private one, 0.5 KiB more per open stream (bench/scale.py).  Each is set
    # before it is read, as an instance attribute would be.
    __slots__ = ("turn", "reply", "failure", "done_line", "answer_started", "text",
                 "time_to_first_token", "events", "record", "stopped", "window_timer", "early")

    # Whether a turn may be sent upstream while it begins: /llmtools and /v1 do not (their
    # requests hold more than the conversation forecast: kept tool schemas, OpenAI's shapes).
    sends_early = True

    outcome: Optional[str] = None  # for the access log: complete, interrupted, failed, rejected
    context: Optional[str] = None  # for the access log: what the turn sent and left out

    async def post(self) -> None:
        self.refuse_when_draining()
        request = self.parse_request()
        self.app_id = request.app_id
        keep = self.keep_generating()
        self.early: Optional[EarlyCall] = None  # the upstream call sent while the turn begins
        self.send_early(request)
        try:
            try:
                self.turn = await self.begin(request)
            finally:
                if self.early is not None and not self.early.confirmed:
                    self.drop_early()
        except ClientLeft:
            self.set_status(499, "Client Closed Request")
            return
        if self.turn.replay is not None:
            await self._replay(request, self.turn.replay)
            return
        self.start_record(request.stream, keep)
        announce_window(self, self.turn)
        self.reply = Reply(model=request.model)
        self.failure: Optional[str] = None
        self.done_line: Optional[bytes] = None
        self.answer_started = False
        self.text = ReplyText()
        self.time_to_first_token: Optional[float] = None
        metrics.ACTIVE_STREAMS.inc()
        try:
            if request.stream:
                await self._stream(request)
            else:
                await self._once(request)
        finally:
            metrics.ACTIVE_STREAMS.dec()
            if self.early is not None:  # confirmed, but the turn ended before it was used
                self.drop_early()
            if not self.turn.ended:  # an unexpected error: never leave the turn pending here
                await self.turn.reject("chatterd failed to handle the turn")
            await self.close_record(self.reply.error or "the turn ended")

    # -- streaming ------------------------------------------------------------------

    async def _stream(self, request: LLMRequest) -> None:
        self.events = sse.EventStream(self, self.config.heartbeat, self.config.write_timeout)
        self.events.set_headers()
        self.call_upstream(request, self._on_lines)
        # Queued behind --max-streams: the grace starts once Ollama has the request, so a
        # turn that never gets a slot is a real 503, not a 200 that ends in an error.
        await self.call.wait_slot()
        status = await self.call.wait_status(self.config.status_grace)
        if (status is not None and status != 200) or self.call.failed_early:
            try:
                await self.call.finished()  # raises: it is not a 200
            except UpstreamError as e:
                await self._refuse(e)  # still before the stream: a real status
            return
        try:
            await self._open()
            while True:
                try:
                    await self.call.finished()
                except UpstreamAborted as e:
                    self._end("interrupted" if self.client_gone or self.stopped else "failed",
                              e.message)
                except UpstreamError as e:
                    self._end("failed", e.message)
                else:
                    if self.done_line is None:
                        self._end("failed", "Ollama ended the reply without its final done message")
                    elif await self.next_round(request):
                        continue  # another upstream round of the same turn has started
                break
            await self._finish_turn()
        finally:
            self.events.close()
            self._observe()

    async def _refuse(self, error: UpstreamError) -> None:
        """End a turn that failed before anything was sent to the client: it never happened."""
        self.outcome = "rejected"
        await self.turn.reject(error.message)
        if self.client_gone:
            self.set_status(499, "Client Closed Request")
            return
        self.clear()
        raise ClientError(error.status, error.message)

    async def _open(self) -> None:
        if self.events.opened or self.client_gone:
            return
        try:
            # First what the turn sent and left out, as a comment parsers skip; then, if
            # still waiting for Ollama's status, a heartbeat so proxies see a live stream.
            said = sse.comment(f"context {self.context}") if self.context else b""
            self.open_record()
            await self.events.open(said + (b"" if self.call.status == 200 else sse.KEEPALIVE))
        except StreamClosedError:
            self.on_connection_close()

    def _on_lines(self, lines: list[bytes]) -> Optional[Awaitable[None]]:
        """The hot path: light bookkeeping per line, one write per chunk.  Returns None when
        the client's kernel took the write at once (see LinesCallback), else what to await."""
        reply = self.reply
        parts = self.text.recent
        relayed = lines
        for i, line in enumerate(lines):
            try:
                chunk = jsonfmt.loads(line)
            except ValueError:
                chunk = None
            if not isinstance(chunk, dict):
                self._fail_upstream(f"Ollama sent a line that is not a JSON object: {line[:80]!r}")
                relayed = lines[:i]
                break
            if "error" in chunk:
                self._fail_upstream(f"Ollama: {chunk['error']}")
                relayed = lines[:i]
                break
            message = chunk.get("message")
            if isinstance(message, dict):
                content = message.get("content")
                if content and isinstance(content, str):
                    parts.append(content)
                    if self.time_to_first_token is None:
                        self.time_to_first_token = self.request.request_time()
                calls = message.get("tool_calls")
                if calls and isinstance(calls, list):
                    reply.extra.setdefault("tool_calls", []).extend(calls)
            if chunk.get("done") is True:
                # Held back until the turn is stored: `done` promises the turn is kept.
                self.done_line = line
                reply.tokens = token_count(chunk.get("eval_count"))
                relayed = lines[:i]
                break
        self.text.compact()
        if relayed:
            return self.checkpointed(self._send_now(self.framed(relayed)))
        return None

    def _send_now(self, data: bytes) -> Optional[Awaitable[None]]:
        """_send() without a coroutine while the stream is open and the client keeps up."""
        if self.client_gone:
            return None
        if not self.events.opened:
            return self._send(data)
        self.answer_started = True
        try:
            pending = self.events.send_now(data)
        except StreamClosedError:
            self.on_connection_close()
            return None
        return None if pending is None else self._sent(pending)

    async def _send(self, data: bytes) -> None:
        if self.client_gone:
            return
        await self._open()
        self.answer_started = True
        await self._sent(self.events.send(data))

    async def _sent(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except StreamClosedError:
            self.on_connection_close()

    def _fail_upstream(self, message: str) -> None:
        self.failure = message
        self.call.abort(UpstreamError(message))

    def _end(self, status: str, error: str) -> None:
        self.reply.status = status
        self.reply.error = self.failure or error
        if status == "interrupted":
            metrics.CLIENT_DISCONNECTS.inc()

    async def _finish_turn(self) -> None:
        """End the turn (it enters the conversation), then tell the client how it went."""
        reply = self.reply
        reply.content = str(self.text)
        reply.prompt_tokens = prompt_count(self.done_line)
        if reply.status == "interrupted" and not self.answer_started:
            # The client left before any of the answer was sent: as if never asked.
            await self.turn.reject("the client left before the answer started")
            reply.status = "rejected"
            return
        # The stream's last event, framed (once) before the turn is stored, for a resume.
        end = self.stage_end(self.frame([self.done_line]), "complete") if reply.status == "complete" \
            else self.stage_end(self.frame_error(reply.error), reply.status) if reply.error else b""
        try:
            await self.turn.end(reply.status, reply)
        except (DatabaseUnavailable, TurnNotStored, asyncpg.PostgresError) as e:
            log.warning("storing turn %d of appID %r failed: %s", self.turn.id, self.app_id, e)
            await self.turn.reject(f"storing it failed: {e}")  # its lease is freed, if possible
            reply.status = "failed"
            await self._send(self.numbered(self.frame_error(f"the reply could not be stored: {e}"),
                                           last=True))
            return
        if end:
            await self._send(self.numbered(end, last=True))
        if not self.client_gone and reply.status != "interrupted":
            await self.turn.delivered()

    def _observe(self) -> None:
        self.tokens = self.reply.tokens if self.reply.tokens is not None else len(self.text)
        self.outcome = self.reply.status
        metrics.TOKENS.inc(self.tokens)
        if self.time_to_first_token is not None:
            metrics.TIME_TO_FIRST_TOKEN.observe(self.time_to_first_token)
        metrics.STREAM_DURATION.labels(outcome=self.reply.status).observe(self.request.request_time())

    # -- stream: false -------------------------------------------------------------

    async def _once(self, request: LLMRequest) -> None:
        """Ollama's single JSON object, passed through; the turn stored the same way."""
        self.call_upstream(request, None)
        try:
            await self.call.finished()
        except UpstreamError as e:
            await self._refuse(e)
            return
        body = bytes(self.call.body)
        try:
            answer = jsonfmt.loads(body)
            message = answer["message"]
            content = message.get("content", "")
            if not isinstance(content, str):
                raise TypeError("content is not a string")
            self.reply.content = content
            if message.get("tool_calls"):
                self.reply.extra["tool_calls"] = message["tool_calls"]
            self.reply.tokens = token_count(answer.get("eval_count"))
            self.reply.prompt_tokens = token_count(answer.get("prompt_eval_count"))
        except (ValueError, KeyError, TypeError, AttributeError):
            await self._refuse(UpstreamError("Ollama's answer is not a chat response object"))
            return
        try:
            await self.turn.end("complete", self.reply)
        except (TurnNotStored, DatabaseUnavailable, asyncpg.PostgresError) as e:
            await self.turn.reject(f"storing it failed: {e}")  # frees its lease, if it can
            raise ClientError(503, f"the reply could not be stored: {e}") from None
        self.tokens, self.outcome = self.reply.tokens, "complete"
        await self.finish_once(body)

    # -- what a handler for another client dialect replaces (handlers/openai_api.py) ----

    def parse_request(self) -> LLMRequest:
        return parse_llm_request(self.json_object(), max_messages=self.config.max_messages)

    async def begin(self, request: LLMRequest) -> Turn:
        return await begin_turn(self, request, early=self.early)

    async def next_round(self, request: LLMRequest) -> bool:
        """The upstream round ended with its done line (held back, not relayed yet).

        Return True after starting another round of the same turn as `self.call` (with a
        fresh `self.reply`, `self.text`, `self.done_line`); False ends the turn with
        `self.reply`.  /llmchat has one round; /llmtools runs resident tools here
        (handlers/llmtools.py)."""
        return False

    frame = staticmethod(sse.data_events)  # Ollama lines -> the bytes of their events
    frame_error = staticmethod(sse.error_event)  # an error after the stream started

    async def finish_once(self, body: bytes) -> None:
        """Answer a "stream": false turn with Ollama's object."""
        self.set_header("Content-Type", "application/json")
        await self._deliver_whole(body)

    async def _deliver_whole(self, body: bytes) -> None:
        try:
            await self.finish(body)
        except StreamClosedError:
            return
        await self.turn.delivered()

    # -- a resend of a turn stored but never delivered ------------------------------

    async def _replay(self, request: LLMRequest, stored: dict) -> None:
        """Answer a resend with the reply stored for it, in the shape Ollama would use: the
        text, then `done` (or, for a failed turn, the text so far and its error event)."""
        self.outcome = "replayed"
        self.set_header("X-Chatterd-Replayed", str(self.turn.id))
        failed = stored.get("status") == "failed"
        if failed and not request.stream:
            raise ClientError(502, stored.get("error") or "the turn failed")
        message = {"role": "assistant", "content": stored.get("content") or ""}
        if (stored.get("extra") or {}).get("tool_calls"):
            message["tool_calls"] = stored["extra"]["tool_calls"]
        created = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        final = {"model": stored.get("model") or request.model, "created_at": created,
                 "message": {"role": "assistant", "content": ""}, "done": True,
                 "done_reason": "stop", "eval_count": stored.get("tokens") or 0}
        if not request.stream:
            final["message"] = message
            self.set_header("Content-Type", "application/json")
            await self.finish_once(jsonfmt.dumpb(final))
            return
        first = {"model": final["model"], "created_at": created, "message": message, "done": False}
        events = [jsonfmt.dumpb(first)] if message["content"] or "tool_calls" in message else []
        body = self.frame(events if failed else events + [jsonfmt.dumpb(final)])
        if failed:
            body += self.frame_error(stored.get("error") or "the turn failed")
        self.events = sse.EventStream(self, self.config.heartbeat, self.config.write_timeout)
        self.events.set_headers()
        try:
            await self.events.open(b": replay of turn %d, stored but never delivered\n\n%s"
                                   % (self.turn.id, body))
        except StreamClosedError:
            return
        finally:
            self.events.close()
        await self.turn.delivered()
