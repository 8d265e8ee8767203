"""Bad input anywhere gets a clear error and loses nothing already recorded; one SessionNo the
API refuses does not hold back the other 99 of its batch."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery.exceptions import Reject
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.databases import Configure
from worker import db, poller, track, track_many
from worker.cli import main
from worker.client import UspeedoClient
from worker.config import get_settings
from worker.errors import TrackError
from worker.models import sessions_table
from worker.simulator import Simulator


def _snapshot() -> list[tuple[Any, ...]]:
    with db.session_scope() as session:
        return [tuple(r) for r in session.execute(sa.select(sessions_table).order_by("id"))]


# --- poison -------------------------------------------------------------------------------


@pytest.mark.usefixtures("database")
def test_one_refused_session_does_not_block_the_other_99(configure: Configure) -> None:
    with Simulator(step=0.1, seed=1) as sim:
        configure(
            RECEIPTS_API_URL=sim.url,
            RECEIPTS_ACCESS_KEY_ID="demo",
            RECEIPTS_ACCESS_KEY_SECRET="demo-secret",
        )
        sent = time.time() - 2  # due now (first delay is 1 s), receipts visible
        names = [f"s{i:03d}" for i in range(100)]
        sim.register(
            {
                "account_id": 1,
                "session_no": n,
                "phones": [f"85255{i:06d}"],
                "scenario": "poison" if i == 37 else "quick_success",
                "sent_at": sent,
            }
            for i, n in enumerate(names)
        )
        track_many(
            {
                "account_id": 1,
                "session_no": n,
                "phones": [f"85255{i:06d}"],
                "sent_at": datetime.fromtimestamp(sent, UTC),
            }
            for i, n in enumerate(names)
        )
        settings_ = get_settings()
        claims: list[Any] = []
        poller.tick(
            session_factory=db.session_scope,
            clock=lambda: datetime.now(UTC),
            policy=settings_.poll_policy(),
            dispatch=claims.append,
            lease=settings_.lease,
            tick_every=settings_.tick,
        )
        assert [len(c.session_ids) for c in claims] == [100]
        client = UspeedoClient(
            api_url=sim.url, access_key_id="demo", access_key_secret="demo-secret"
        )
        report = poller.poll(
            claims[0],
            session_factory=db.session_scope,
            client=client,
            clock=lambda: datetime.now(UTC),
            policy=settings_.poll_policy(),
            rng=random.Random(1),
            budget=timedelta(seconds=10),
            in_flight=timedelta(seconds=20),
        )
        client.close()
    # Halving isolates the poison in at most 1 + 2 * ceil(log2(100)) calls.
    assert report.api_calls <= 15
    assert (report.polled, report.resolved, report.failed) == (100, 99, 1)
    with db.session_scope() as session:
        rows = {
            r.session_no: r
            for r in session.execute(
                sa.select(
                    sessions_table.c.session_no, sessions_table.c.state, sessions_table.c.last_error
                )
            )
        }
    assert rows["s037"].state == "pending"
    assert "refused by the API" in rows["s037"].last_error
    assert "215392" in rows["s037"].last_error
    assert all(r.state == "resolved" for n, r in rows.items() if n != "s037")


# --- hostile input, property-based --------------------------------------------------------


@pytest.fixture
def recorded(configure: Configure, sqlite_database: str) -> None:
    """SQLite (fast enough for hundreds of examples) with one session already recorded."""
    from tests.support.databases import truncate

    truncate(sqlite_database)
    configure(RECEIPTS_DATABASE_URL=sqlite_database)
    track("KEPT", 7, phones=["(852)55311111"], sent_at=datetime.now(UTC) - timedelta(hours=1))


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)
_quiet = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_quiet
@given(body=st.lists(st.lists(_text, min_size=0, max_size=6), max_size=5))
def test_receipts_track_csv_never_crashes_and_never_half_records(
    recorded: None, tmp_path: Path, body: list[list[str]]
) -> None:
    before = _snapshot()
    lines = ["account_id,session_no,phones,sent_at"] + [
        ",".join('"' + cell.replace('"', '""') + '"' for cell in row) for row in body
    ]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["track", "--csv", str(path)])
    assert result.exit_code in (0, 2), result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    if result.exit_code == 2:
        assert "error" in result.output.lower() or "usage" in result.output.lower()
        assert _snapshot() == before, "a refused call recorded something"
    else:
        # Accepted: what was recorded before is all still there (merged, never dropped).
        keys = {(row[1], row[2]) for row in _snapshot()}
        assert {(row[1], row[2]) for row in before} <= keys


@_quiet
@given(
    session_no=_json_like,
    account_id=_json_like,
    phones=_json_like,
    sent_at=_json_like,
    user_ref=_json_like,
)
def test_track_refuses_anything_malformed_with_a_track_error(
    recorded: None, session_no: Any, account_id: Any, phones: Any, sent_at: Any, user_ref: Any
) -> None:
    before = _snapshot()
    error: TrackError | None = None
    try:
        track(session_no, account_id, phones=phones, sent_at=sent_at, user_ref=user_ref)
    except TrackError as exc:
        error = exc
    if error is not None:
        assert "nothing was recorded" in str(error)
        assert _snapshot() == before


@_quiet
@given(
    kwargs=st.dictionaries(
        st.sampled_from(["session_no", "account_id", "phones", "sent_at", "user_ref"]), _json_like
    )
)
def test_the_track_task_rejects_bad_arguments_without_touching_data(
    recorded: None, kwargs: dict[str, Any]
) -> None:
    from worker.tasks import track as track_task

    before = _snapshot()
    try:
        track_task.run(**kwargs)
    except TypeError:
        # Missing required arguments: Celery reports these for the message itself.
        assert _snapshot() == before
    except Reject:
        assert _snapshot() == before
