"""Operations endpoints: GET /healthz (liveness), /readyz (readiness), /metrics (Prometheus)."""

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import metrics
from db.pool import DatabaseUnavailable, ping
from handlers.base import BaseHandler
from ollama_client import OllamaError


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.send_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """Ready when the database answers and we are not draining.

    Ollama is reported but does not fail readiness: every process shares the same
    Ollama, so taking them all out of rotation would help no one.
    """

    async def get(self) -> None:
        body: dict = {"status": "ready"}
        status = 200
        try:
            await ping(self.pool)
            body["database"] = {"ok": True}
        except DatabaseUnavailable as e:
            body["database"] = {"ok": False, "error": str(e)}
            body["status"], status = "unavailable", 503
        try:
            version = await self.ollama.version()
            body["ollama"] = {"ok": True, "url": self.ollama.base, "version": version}
        except OllamaError as e:
            body["ollama"] = {"ok": False, "url": self.ollama.base, "error": e.message}
        if self.application.draining:
            body["status"], status = "draining", 503
        self.send_json(body, status)


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.REGISTRY))
