"""The public board: GET /, POST /postchatt, GET /getchatts."""

from db import chatts
from handlers.base import BaseHandler, JSONBodyHandler
from handlers.validation import ClientError, check_json, valid_text

MAX_NAME = 64


class TopHandler(BaseHandler):
    public = True

    def get(self) -> None:
        self.send_json("EECS Reactive chatterd")


class GetChattsHandler(BaseHandler):
    async def get(self) -> None:
        self.send_json(await chatts.get_chatts(self.pool))


class PostChattHandler(JSONBodyHandler):
    async def post(self) -> None:
        body = self.json_object()
        check_json(body)  # the fields we ignore too: every input is checked, none half-trusted
        # The course renamed "username" to "name"; its older clients still send the former.
        name = body.get("name", body.get("username"))
        message = body.get("message")
        if not isinstance(name, str) or not name:
            raise ClientError(422, "name (or username) is required and must be a non-empty string")
        if len(name) > MAX_NAME:
            raise ClientError(422, f"name is longer than {MAX_NAME} characters")
        valid_text(name, "name")
        valid_text(message, "message")
        # Who posted, when known (always, with --auth required); anonymous posts have no one.
        await chatts.post_chatt(self.pool, name, message, self.owner_id or None)
        self.send_json({})
