"""The answer for a body sent to an endpoint that takes none (see Application.get_handler_delegate)."""

from tornado.web import stream_request_body

from handlers.base import BaseHandler
from handlers.validation import ClientError


@stream_request_body
class BodyTooLargeHandler(BaseHandler):
    """413 as soon as the headers are in: the body is never read, and the connection closes."""

    def initialize(self, route: str, limit: int) -> None:
        self.metric_route = route  # counted under the endpoint that was asked for
        self.limit = limit

    def check_headers(self) -> None:
        raise ClientError(413, f"{self.request.method} {self.request.path} takes no request body "
                               f"(at most {self.limit} bytes)")

    def data_received(self, chunk: bytes) -> None:
        pass  # not reached: prepare() has already answered
