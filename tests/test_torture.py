"""No turn-contract violation under faults: two real chatterd processes on one private
PostgreSQL, the Ollama double scripted with faults, clients that leave mid-stream and type again at once,
double sends, a SIGTERM, a SIGKILL mid-stream with resends, a PostgreSQL stop/start; then
an audit from outside of the turn contract (docs/turn-contract.md), and of the shape of every
message list sent upstream (tests/message_shape.py).

CI size by default (a few hundred turns).  Longer runs:

    CHATTERD_TORTURE_TURNS=5000 CHATTERD_TORTURE_APPS=100 pytest -s tests/test_torture.py

CHATTERD_TORTURE_SEED replays a run's random choices (the summary prints the seed).
"""

import asyncio
import os
import sys

import pytest

from tests.torture import Torture

TURNS = int(os.environ.get("CHATTERD_TORTURE_TURNS", "300"))
APPS = int(os.environ.get("CHATTERD_TORTURE_APPS", "30"))
SEED = os.environ.get("CHATTERD_TORTURE_SEED")


@pytest.mark.timeout(max(300, TURNS // 2))
def test_torture_no_contract_violation():
    torture = Torture(turns=TURNS, apps=APPS, seed=int(SEED) if SEED else None)
    report = asyncio.run(torture.run())
    summary = f"seed {torture.seed}\n" + report.summary()
    print(summary, file=sys.stderr)
    assert report.faults["SIGTERM"] and report.faults["SIGKILL mid-stream"] \
        and report.faults["PostgreSQL stop/start"], summary
    assert report.shape_checked >= report.upstream > 0, summary
    assert not report.malformed, summary
    assert report.early["confirmed"] > 0, summary  # the early path ran, through the faults  # every message list sent upstream is well formed
    assert not report.violations, summary
