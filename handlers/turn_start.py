"""Beginning a turn from a handler (/llmchat, /llmtools, /v1, /llmprep): waiting for the
appID's turn with every refusal a real HTTP status, then saying what of the conversation
the turn sends."""

from typing import Optional

import metrics
from handlers.base import UpstreamHandler
from handlers.early_call import EarlyCall
from handlers.llm_request import LLMRequest
from handlers.validation import ClientError
from turns import Turn, TurnBusy


def announce_window(handler: UpstreamHandler, turn: Turn) -> None:
    """Say what of the conversation the turn sends and leaves out: a response header (the
    SSE stream also starts with it as a comment), the access log, /metrics."""
    window = turn.window
    if window is None:  # a stateless turn (/v1 without an appID)
        return
    handler.context = window.describe()
    handler.set_header("X-Chatterd-Context", handler.context)
    metrics.CONTEXT_SENT_TOKENS.observe(window.sent_tokens)
    if window.omitted_messages:
        metrics.CONTEXT_CUT_TURNS.inc()
        metrics.CONTEXT_OMITTED_MESSAGES.inc(window.omitted_messages)
        metrics.CONTEXT_OMITTED_TOKENS.inc(window.omitted_tokens)


async def begin_turn(handler: UpstreamHandler, request: LLMRequest, replace: bool = False,
                     early: Optional[EarlyCall] = None) -> Turn:
    """Wait for the appID's turn and start it; every refusal is a real HTTP status.

    A chat turn's history is bounded by its context budget (--context-tokens, or the
    request's options.num_ctx); /llmprep (replace) reads none.  *early* is settled by
    the first answer (see turns.Speculation).
    """
    context, budget = (None, None) if replace else \
        request.context_budget(handler.config.context_tokens)
    try:
        return await handler.application.turns.begin(
            handler.owner_id, request.app_id, request.messages, left=handler.left, replace=replace,
            budget=budget, context=context, speculation=early)
    except TurnBusy:
        raise ClientError(409, f"another turn of appID {request.app_id!r} is still running "
                               f"after {handler.application.turns.wait:g} s; retry when it has "
                               "ended") from None
