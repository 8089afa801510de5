"""Prometheus metrics, served at GET /metrics.

A private registry keeps each Application's numbers its own (tests build many);
in production there is one per process, which Prometheus scrapes per process.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("chatterd_requests_total", "HTTP requests by route and status",
                   ["route", "method", "status"], registry=REGISTRY)
ACTIVE_STREAMS = Gauge("chatterd_active_streams", "Chat turns being relayed now", registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram(
    "chatterd_time_to_first_token_seconds", "From the request to the first reply text",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
STREAM_DURATION = Histogram(
    "chatterd_stream_duration_seconds", "Whole chat turn, by how it ended", ["outcome"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800), registry=REGISTRY)
TOKENS = Counter("chatterd_tokens_relayed_total", "Reply tokens relayed to clients", registry=REGISTRY)
UPSTREAM_ERRORS = Counter("chatterd_upstream_errors_total", "Failed upstream requests", ["kind"],
                          registry=REGISTRY)
CLIENT_DISCONNECTS = Counter("chatterd_client_disconnects_total",
                             "Chat turns whose client left before the end", registry=REGISTRY)
DB_LATENCY = Histogram("chatterd_db_query_seconds", "Database operation latency", ["operation"],
                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
                       registry=REGISTRY)
TURN_WAITS = Counter("chatterd_turn_waits_total",
                     "Turns that found their appID busy, by how the wait ended", ["outcome"],
                     registry=REGISTRY)
STORE_RETRIES = Counter("chatterd_store_retries_total",
                        "Retries of storing a turn's end while the database was away",
                        registry=REGISTRY)
RESENDS_REPLAYED = Counter("chatterd_resends_replayed_total",
                           "Resent turns answered from storage instead of being stored twice",
                           registry=REGISTRY)
STREAMS_WRITTEN = Counter("chatterd_streams_written_total",
                          "Streamed turns whose events were written to PostgreSQL for a resume, by "
                          "why (client_left, asked, stopped, large, shutdown)", ["reason"],
                          registry=REGISTRY)
CONTEXT_SENT_TOKENS = Histogram(
    "chatterd_context_sent_tokens", "Tokens of conversation sent to the model per chat turn "
    "(as counted: learned from the upstream, else estimated)",
    buckets=(256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072), registry=REGISTRY)
CONTEXT_CUT_TURNS = Counter("chatterd_context_cut_turns_total",
                            "Chat turns that left older messages out to fit the context budget",
                            registry=REGISTRY)
CONTEXT_OMITTED_MESSAGES = Counter("chatterd_context_omitted_messages_total",
                                   "Older messages left out of chat turns to fit the budget",
                                   registry=REGISTRY)
CONTEXT_OMITTED_TOKENS = Counter("chatterd_context_omitted_tokens_total",
                                 "Tokens of older messages left out of chat turns",
                                 registry=REGISTRY)
CONTEXT_UPSTREAM_CUT = Counter(
    "chatterd_context_upstream_cut_total",
    "Turns for which the upstream counted fewer prompt tokens than were sent (it cut the prompt)",
    registry=REGISTRY)
# Per upstream (label "<index>:<URL without credentials>", a fixed set from --upstreams).
EARLY_UPSTREAM = Counter("chatterd_early_upstream_total",
                         "Chat turns sent upstream while they began (--early-upstream), by "
                         "whether begin_turn confirmed the request or it was cancelled",
                         ["outcome"], registry=REGISTRY)
UPSTREAM_REQUESTS = Counter("chatterd_upstream_requests_total",
                            "Requests sent to each upstream (failover attempts included)",
                            ["upstream"], registry=REGISTRY)
UPSTREAM_FAILURES = Counter("chatterd_upstream_failures_total",
                            "Requests an upstream failed: unreachable, 5xx/429 before the "
                            "stream (then the next upstream is tried), or broken mid-stream",
                            ["upstream"], registry=REGISTRY)
UPSTREAM_HEALTHY = Gauge("chatterd_upstream_healthy",
                         "1 unless the upstream failed within --upstream-cooldown seconds",
                         ["upstream"], registry=REGISTRY)
