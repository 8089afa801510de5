"""GET /conversations, and GET, PATCH, DELETE /conversations/{appID}: the caller's own
conversations, as a person sees them (docs/api.md).

Every statement behind them is keyed by (the caller's owner_id, the appID)
(db/conversation_records.py), so another owner's appID is not found: 404, the same answer
as an appID never used, never a 403 that would say it exists.

Listing needs a user (401 without one): the anonymous namespace holds the conversations of
every caller who sends no credentials, and a list of them would hand out every appID.  One
anonymous appID is readable, titled and deletable by whoever names it, which is no more
than it already is: the model repeats it back, /llmprep wipes it.
"""

import base64
import binascii
import datetime
from typing import Any, Optional

import jsonfmt
from db import conversation_records as records
from db.conversations import ANONYMOUS
from handlers.base import BaseHandler, JSONBodyHandler
from handlers.validation import ClientError, check_json
from handlers.llm_request import valid_app_id

DEFAULT_PAGE = 50
MAX_PAGE = 200


def iso(moment: Optional[datetime.datetime]) -> Optional[str]:
    return moment.isoformat() if moment is not None else None


def summary(row: Any) -> dict:
    """A conversation as GET /conversations lists it."""
    return {"appID": row["appid"], "title": row["title"], "model": row["model"],
            "messages": row["messages"], "updated_at": iso(row["updated_at"])}


def cursor(row: Any) -> str:
    """The `before` of the page after *row*: opaque to clients (its time and appID)."""
    raw = jsonfmt.dumpb([row["updated_at"].isoformat(), row["appid"]])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def parse_cursor(text: str) -> tuple[datetime.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        moment, app_id = jsonfmt.loads(raw)
        if not isinstance(moment, str) or not isinstance(app_id, str):
            raise ValueError("not a cursor")
        when = datetime.datetime.fromisoformat(moment)
        if when.tzinfo is None:
            raise ValueError("no time zone")
        return when, valid_app_id(app_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, ClientError):
        raise ClientError(422, "before must be a cursor from this endpoint's Link header") from None


def page_size(text: Optional[str]) -> int:
    if text is None:
        return DEFAULT_PAGE
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PAGE):
        raise ClientError(422, f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(text)


class ConversationsHandler(BaseHandler):
    """GET /conversations?limit=&before=: the caller's conversations, newest first."""

    async def get(self) -> None:
        if self.owner_id == ANONYMOUS:
            raise ClientError(401, "listing conversations needs a user: log in or send an API "
                                   "token (without one, a conversation is read by its appID)")
        limit = page_size(self.get_query_argument("limit", None))
        before = self.get_query_argument("before", None)
        rows = await records.list_conversations(self.pool, self.owner_id, limit + 1,
                                                parse_cursor(before) if before else None)
        if len(rows) > limit:  # there is another page
            rows = rows[:limit]
            self.set_header("Link", f'<{self.request.path}?limit={limit}'
                                    f'&before={cursor(rows[-1])}>; rel="next"')
        self.send_json([summary(r) for r in rows])


class ConversationHandler(JSONBodyHandler):
    """GET, PATCH {"title"}, DELETE /conversations/{appID} (the appID URL-encoded)."""

    def decode_argument(self, value: bytes, name: Optional[str] = None) -> str:
        # The path's appID comes here URL-decoded (name None); Tornado's own refusal of bad
        # UTF-8 would be a 400 that does not say which part.
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ClientError(422, f"{name or 'appID'} is not valid UTF-8 once URL-decoded") from None

    def app(self, app_id: str) -> str:
        self.app_id = valid_app_id(app_id)  # (also for the access log)
        return self.app_id

    async def get(self, app_id: str) -> None:
        found = await records.read_conversation(self.pool, self.owner_id, self.app(app_id))
        if found is None:
            raise self.not_found()
        self.send_json(found)

    async def patch(self, app_id: str) -> None:
        app_id = self.app(app_id)
        body = self.json_object()
        check_json(body)
        if "title" not in body:
            raise ClientError(422, "title is required (a string, or null to remove it)")
        title = body["title"]
        if title is not None:
            if not isinstance(title, str):
                raise ClientError(422, "title must be a string, or null to remove it")
            if len(title) > records.MAX_TITLE:
                raise ClientError(422, f"title is longer than {records.MAX_TITLE} characters")
        row = await records.set_title(self.pool, self.owner_id, app_id, title)
        if row is None:
            raise self.not_found()
        self.send_json(summary(row))

    async def delete(self, app_id: str) -> None:
        app_id = self.app(app_id)
        outcome = await records.delete_conversation(self.pool, self.owner_id, app_id)
        if outcome == "missing":
            raise self.not_found()
        if outcome == "running":
            raise ClientError(409, "a turn of this conversation is running; delete it once "
                                   "that turn has ended")
        self.application.turns.forget(self.owner_id, app_id)
        self.set_status(204)
        self.finish()

    def not_found(self) -> ClientError:
        return ClientError(404, "no such conversation")
