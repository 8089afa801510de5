"""POST /llmprompt (a verbatim relay to /api/generate) and POST /llmprep (set the system prompt)."""

from tornado.iostream import StreamClosedError

import jsonfmt
import metrics
import sse
from handlers.base import UpstreamHandler
from handlers.validation import ClientError, check_json
from handlers.turn_start import begin_turn
from handlers.llm_request import parse_llm_request
from upstreams.errors import UpstreamError
from turns import ClientLeft, TurnNotStored


class LLMPromptHandler(UpstreamHandler):
    """Ollama's generate stream, passed through line by line.  Nothing is stored.

    NDJSON has no comment lines, so there is no heartbeat: the status waits for
    Ollama, and an error after the stream started is one Ollama-style
    {"error": ...} line.
    """

    async def post(self) -> None:
        self.refuse_when_draining()
        # Refuse what is not a JSON object or holds what Ollama cannot take (NUL, NaN, ...);
        # forward the bytes untouched.
        check_json(self.json_object())
        self.start_call("/api/generate", bytes(self._body), self._relay)
        metrics.ACTIVE_STREAMS.inc()
        try:
            await self._pass_through()
        finally:
            metrics.ACTIVE_STREAMS.dec()

    async def _pass_through(self) -> None:
        await self.call.wait_status(timeout=None)
        if self.call.status != 200:
            try:
                await self.call.finished()
            except UpstreamError as e:
                raise ClientError(e.status, e.message) from None
        try:
            await self.call.finished()
        except UpstreamError as e:  # after the stream started: NDJSON's own way to say it
            await self._relay([jsonfmt.dumpb({"error": e.message})])

    async def _relay(self, lines: list[bytes]) -> None:
        if self.client_gone:
            return
        if not self._headers_written:
            self.set_header("Content-Type", self.call.content_type)
            self.set_header("X-Accel-Buffering", "no")
            sse.send_at_once(self)
        try:
            self.write(b"\n".join(lines) + b"\n")
            await sse.flush_within(self, self.config.write_timeout)
        except StreamClosedError:
            self.on_connection_close()


class LLMPrepHandler(UpstreamHandler):
    """Start the appID's conversation over with the given (system) messages.

    It is a turn of its own (waiting for a running one to end), so it never cuts into one.
    """

    async def post(self) -> None:
        self.refuse_when_draining()
        request = parse_llm_request(self.json_object(), allow_empty_messages=True,
                                    max_messages=self.config.max_messages)
        self.app_id = request.app_id
        try:
            turn = await begin_turn(self, request, replace=True)
        except ClientLeft:
            self.set_status(499, "Client Closed Request")
            return
        try:
            await turn.end("complete")
        except TurnNotStored as e:
            raise ClientError(503, f"the new conversation could not be stored: {e}") from None
        self.send_json({})
