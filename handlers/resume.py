"""GET /turns/<turn id>/events and POST /turns/<turn id>/stop: resuming and stopping a
streamed turn (docs/api.md, "Resuming a stream"), from any chatterd process.

Only the conversation's owner may: the same appID (and, for a signed-in user, the same
user).  Anything else is 404, as for a turn that does not exist, so turn ids reveal
nothing.  A finished turn's events are kept --resume-retention seconds once written to the
database, then 410 (docs/api.md says when a stream is written).
"""

import asyncio
from typing import Any, Optional

import asyncpg
from tornado.iostream import StreamClosedError

import sse
from db import events
from db.pool import DatabaseUnavailable
from handlers.base import BaseHandler
from handlers.validation import ClientError
from resume import reader
from resume.reader import BadEventId, parse_last_event_id

# Seconds a stream asked for may take to be written by the process holding it, while its
# turn runs, and once it ended (a loaded database can hold a checkpoint back that long).
APPEAR_WAIT = 5.0
APPEAR_WAIT_ENDED = 1.0
BEYOND_WAIT = 2.0  # seconds a Last-Event-ID ahead of what is stored may wait for it


class TurnHandler(BaseHandler):
    """What both endpoints share: the turn, found for its owner only."""

    turn_id = 0

    async def find_turn(self, turn_id: str) -> Any:
        """The turn's state (events.turn_state, *recent* meaning within --resume-linger),
        or ClientError 400/404."""
        self.turn_id = int(turn_id) if len(turn_id) <= 18 else -1
        app_id = self.get_query_argument("appID", None)
        if not app_id:
            raise ClientError(400, "appID (the conversation the turn belongs to) is required")
        self.app_id = app_id
        state = await events.turn_state(self.pool, self.owner_id, self.turn_id,
                                        self.application.resume.linger + 1.0)
        if state is None or state["appid"] != app_id or state["status"] == "rejected":
            raise self.not_found()  # (a rejected turn never had a stream)
        return state

    async def find(self, turn_id: str) -> Any:
        """The turn's stream row, or None for a turn whose process died before its stream
        was published; ClientError 404/410/503.  A stream not in the database yet is asked
        for from the process holding it, and waited for (briefly)."""
        state = await self.find_turn(turn_id)
        resume = self.application.resume
        loop = asyncio.get_running_loop()
        deadline, ended_deadline = loop.time() + APPEAR_WAIT, loop.time() + APPEAR_WAIT_ENDED
        asked = None  # when the holder was last asked
        while True:
            stream = await events.stream_of(self.pool, self.owner_id, self.turn_id,
                                            resume.retention)
            if stream is not None:
                break
            if asked is not None:
                state = await events.turn_state(self.pool, self.owner_id, self.turn_id,
                                                resume.linger + 1.0)
                if state is None:  # its conversation was deleted meanwhile
                    raise self.not_found()
            if state["status"] in ("running", "abandoned") and not state["leased"]:
                return None
            if not state["recent"]:
                raise self.not_kept()
            running = state["status"] == "running"
            if loop.time() >= (deadline if running else ended_deadline):
                if running:
                    raise ClientError(503, f"the chatterd process generating turn "
                                           f"{self.turn_id} does not answer; retry")
                raise self.not_kept()
            if asked is None or loop.time() - asked >= 1.0:  # again, should it have missed it
                await resume.publish(self.turn_id)
                asked = loop.time()
            await resume.hub.wait(self.turn_id, 0.05)
        if stream["expired"]:
            raise ClientError(410, f"turn {self.turn_id}'s events were kept "
                                   f"{resume.retention:g} s after it ended, and are gone")
        return stream

    def not_found(self) -> ClientError:
        return ClientError(404, f"no streamed turn {self.turn_id} in this conversation")

    def not_kept(self) -> ClientError:
        resume = self.application.resume
        return ClientError(410, f"turn {self.turn_id} has ended and its events are not kept (a "
                                f"stream its client received whole is kept {resume.linger:g} s, "
                                f"one cut short {resume.retention:g} s); its reply is stored in "
                                f"the conversation")


class TurnEventsHandler(TurnHandler):
    _left: Optional[asyncio.Future] = None
    events: Any = None

    async def get(self, turn_id: str) -> None:
        if self.application.draining:  # a proxy retries elsewhere
            raise ClientError(503, "server is shutting down; retry")
        last = self.request.headers.get("Last-Event-ID")
        if last is None:
            last = self.get_query_argument("lastEventId", None)
        try:
            after = parse_last_event_id(last, int(turn_id) if len(turn_id) <= 18 else -1)
        except BadEventId as e:
            raise ClientError(400, str(e)) from None
        stream = await self.find(turn_id)
        if stream is not None:
            await self.check_position(stream, after)
        self.set_header("X-Chatterd-Turn", str(self.turn_id))
        self._left = asyncio.get_running_loop().create_future()
        self.events = sse.EventStream(self, self.config.heartbeat, self.config.write_timeout)
        self.events.set_headers()
        self.outcome = "resumed"
        try:
            await self.events.open()
            if stream is None:  # nothing of it was published: it ends here
                await self.events.send(reader.error_event(self.turn_id, after + 1, reader.DIED))
                return
            async for data in reader.read(self.application.resume, self.owner_id, self.turn_id,
                                          after, self._left):
                await self.events.send(data)
        except StreamClosedError:
            self.outcome = "client_left"
        except (DatabaseUnavailable, asyncpg.PostgresError) as e:
            # The stream ends without its terminal event: the client resumes again from
            # the last id it has (as an EventSource does by itself).
            self.outcome = "database_unavailable"
            self.error_message = str(e)
        finally:
            self.events.close()

    async def check_position(self, stream: Any, after: int) -> None:
        """416 for an event the turn has not produced: once it finished, at once; while it
        runs, after waiting a moment for a checkpoint that may hold it."""
        if after <= stream["last_n"]:
            return
        resume = self.application.resume
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BEYOND_WAIT
        while not stream["finished"] and loop.time() < deadline:
            await resume.hub.wait(self.turn_id, max(0.01, min(0.2, deadline - loop.time())))
            stream = await events.stream_of(self.pool, self.owner_id, self.turn_id,
                                            resume.retention)
            if stream is None:  # its conversation was deleted meanwhile
                raise self.not_found()
            if after <= stream["last_n"]:
                return
        raise ClientError(416, f"Last-Event-ID names event {after} of turn {self.turn_id}, "
                               f"which has {stream['last_n']} events")

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.end_for_shutdown()

    def end_for_shutdown(self) -> None:
        """End the resumed stream (without a terminal event: the client resumes again,
        from another process)."""
        if self._left is not None and not self._left.done():
            self._left.set_result(True)

    def on_finish(self) -> None:
        super().on_finish()
        if self.events is not None:
            self.events.close()
            self.events.handler = None


class TurnStopHandler(TurnHandler):
    STOP_WAIT = 5.0  # seconds to wait for the stopped turn's end to be stored

    async def post(self, turn_id: str) -> None:
        state = await self.find_turn(turn_id)
        self.outcome = "stopped"
        if state["status"] == "running" and state["leased"]:
            resume = self.application.resume
            await resume.stop(self.turn_id)
            # 204 once its end is stored (interrupted), so a turn typed right after sees
            # the interrupted reply; a process that does not answer is waited for only so
            # long (its lease expires, and the next turn abandons it).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.STOP_WAIT
            asked = loop.time()
            while loop.time() < deadline:
                if loop.time() - asked >= 1.0:  # a process LISTENing again missed the first
                    await resume.stop(self.turn_id)
                    asked = loop.time()
                # A stopped stream is published: its checkpoints wake this wait.
                await resume.hub.wait(self.turn_id, min(0.25, max(deadline - loop.time(), 0.01)))
                state = await events.turn_state(self.pool, self.owner_id, self.turn_id)
                if state is None or state["status"] != "running" or not state["leased"]:
                    break
        self.set_status(204)
        self.finish()
