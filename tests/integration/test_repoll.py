"""An operator's repoll of escalated sessions records late receipts and resolves them late."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tests.support.databases import Configure
from tests.support.servers import free_port
from worker import db, poller, track_many
from worker.cli import main
from worker.client import UspeedoClient
from worker.config import get_settings
from worker.models import sessions_table
from worker.simulator import Simulator


def _state(session_no: str) -> dict[str, object]:
    with db.session_scope() as session:
        row = (
            session.execute(
                sa.select(sessions_table).where(sessions_table.c.session_no == session_no)
            )
            .mappings()
            .one()
        )
        return dict(row)


@pytest.mark.usefixtures("database")
def test_repoll_resolves_an_escalated_session_late_and_leaves_others_alone(
    configure: Configure,
) -> None:
    with Simulator(step=0.1) as sim:
        configure(
            RECEIPTS_API_URL=sim.url,
            RECEIPTS_ACCESS_KEY_ID="demo",
            RECEIPTS_ACCESS_KEY_SECRET="demo-secret",
        )
        settings = get_settings()
        sent = time.time() - 60  # long past the 10 s cutoff: escalated, never polled
        sim.register(
            [
                {
                    "account_id": 1,
                    "session_no": "late",
                    "phones": ["85255311111"],
                    "scenario": "slow_final",
                    "sent_at": sent,
                },
                {
                    "account_id": 1,
                    "session_no": "pending",
                    "phones": ["85255311112"],
                    "scenario": "quick_success",
                    "sent_at": time.time(),
                },
            ]
        )
        track_many(
            [
                {
                    "account_id": 1,
                    "session_no": "late",
                    "phones": ["(852)55311111"],
                    "sent_at": datetime.fromtimestamp(sent, UTC),
                },
                {"account_id": 1, "session_no": "pending", "phones": ["(852)55311112"]},
            ]
        )
        report = poller.tick(
            session_factory=db.session_scope,
            clock=lambda: datetime.now(UTC),
            policy=settings.poll_policy(),
            dispatch=lambda claim: None,
            lease=settings.lease,
            tick_every=settings.tick,
        )
        assert report.escalated == 1
        escalated_at = _state("late")["escalated_at"]
        assert escalated_at is not None

        client = UspeedoClient(
            api_url=sim.url, access_key_id="demo", access_key_secret="demo-secret"
        )
        result = poller.repoll_escalated(
            ["late", "pending", "unknown"],
            account_id=None,
            session_factory=db.session_scope,
            client=client,
            clock=lambda: datetime.now(UTC),
            policy=settings.poll_policy(),
            rng=random.Random(1),
            budget=timedelta(seconds=5),
        )
        client.close()
        assert (result.polled, result.resolved, result.api_calls) == (1, 1, 1)
        late = _state("late")
        assert late["state"] == "resolved"
        assert late["escalated_at"] == escalated_at
        assert late["resolved_at"] is not None
        assert _state("pending")["state"] == "pending", "pending sessions follow the schedule"
        asked = [c["session_nos"] for c in sim.calls() if c["action"] == "GetUSMSSendReceipt"]
        assert asked == [["late"]]

        # From the command line: nothing escalated left among these, so it says so.
        outcome = CliRunner().invoke(main, ["repoll", "late", "pending"])
        assert outcome.exit_code == 1
        assert "none of these sessions is escalated" in outcome.output


@pytest.mark.usefixtures("database")
def test_repoll_with_failures_exits_1(configure: Configure) -> None:
    """A repoll that got no answer for some sessions used to exit 0: a script or cron could
    not tell it from one that worked."""
    configure(
        RECEIPTS_API_URL=f"http://127.0.0.1:{free_port()}/api",  # nothing listens
        RECEIPTS_ACCESS_KEY_ID="demo",
        RECEIPTS_ACCESS_KEY_SECRET="demo-secret",
        RECEIPTS_API_MAX_ATTEMPTS="1",
    )
    settings = get_settings()
    track_many(
        [{"account_id": 1, "session_no": "R1", "sent_at": datetime.now(UTC) - timedelta(minutes=1)}]
    )
    escalated = poller.tick(
        session_factory=db.session_scope,
        clock=lambda: datetime.now(UTC),
        policy=settings.poll_policy(),
        dispatch=lambda claim: None,
        lease=settings.lease,
        tick_every=settings.tick,
    ).escalated
    assert escalated == 1
    outcome = CliRunner().invoke(main, ["repoll", "R1"])
    assert outcome.exit_code == 1, outcome.output
    assert outcome.stdout == "repolled 1 escalated session(s) in 1 call(s): 0 resolved, 1 failed\n"
    assert _state("R1")["last_error"]
