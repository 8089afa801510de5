"""Operations endpoints: GET /healthz (liveness), /readyz (readiness), /metrics (Prometheus)."""

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import metrics
from db.pool import DatabaseUnavailable, ping
from handlers.base import BaseHandler
from upstreams.errors import UpstreamError


class HealthHandler(BaseHandler):
    public = True

    def get(self) -> None:
        self.send_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """Ready when the database answers and we are not draining.

    Ollama (and every other upstream) is reported but does not fail readiness: every
    process shares the same upstreams, so taking them all out of rotation would help no one.
    """

    public = True

    async def get(self) -> None:
        body: dict = {"status": "ready"}
        status = 200
        try:
            await ping(self.pool)
            body["database"] = {"ok": True}
        except DatabaseUnavailable as e:
            body["database"] = {"ok": False, "error": str(e)}
            body["status"], status = "unavailable", 503
        first = next((m for m in self.upstreams.members if m.dialect == "ollama"), None)
        if first is not None:
            try:
                version = await first.client.version()
                body["ollama"] = {"ok": True, "url": first.name, "version": version}
            except UpstreamError as e:
                body["ollama"] = {"ok": False, "url": first.name, "error": e.message}
        body["upstreams"] = await self.upstreams.status()
        if self.application.draining:
            body["status"], status = "draining", 503
        self.send_json(body, status)


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.REGISTRY))
