"""An operator's handling of parked event batches, on PostgreSQL and SQLite: ``receipts events
parked`` lists them, ``replay`` has the destination's next delivery round send them again
(before the stream, the events read again from the history) and close them once
acknowledged, keeping them open with their error while the destination still fails;
``dismiss`` closes them unsent; both all or none, naming each id that cannot be handled."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_events import BASE, WINDOW, Recorder, deliver, history, parked
from tests.support.cli import invoke, ok
from tests.support.clock import POLICY, T0
from worker import ParkedBatchError, db, events
from worker.api import replay_parked
from worker.domain import EventType

pytestmark = pytest.mark.usefixtures("database")

AT = T0 + POLICY.cutoff
LATE = AT + WINDOW + 2 * BASE


def park_two() -> tuple[Recorder, list[int]]:
    """The history's four events in two batches of two, both parked; the sender then works."""
    history()
    sent = Recorder()
    sent.fail = "HTTP 500: down"
    deliver(sent, AT, batch_size=2)
    deliver(sent, LATE, batch_size=2)  # parks the first, fails the second afresh
    deliver(sent, LATE + WINDOW + 2 * BASE, batch_size=2)  # parks the second
    batches = parked()
    assert [b["state"] for b in batches] == ["parked", "parked"]
    sent.fail = None
    return sent, [b["id"] for b in batches]


def test_parked_lists_the_open_batches_with_their_range_and_error() -> None:
    _sent, ids = park_two()
    shown = ok(invoke("events", "parked")).output
    assert "2 open parked event batch(es)" in shown
    assert "HTTP 500: down" in shown
    listed = json.loads(ok(invoke("events", "parked", "--json")).stdout)
    assert [(row["id"], row["state"], row["events"]) for row in listed] == [
        (ids[0], "parked", 2),
        (ids[1], "parked", 2),
    ]


def test_a_replayed_batch_is_sent_again_before_the_stream_then_closed() -> None:
    sent, ids = park_two()
    assert "1 parked batch(es) to be replayed" in ok(invoke("events", "replay", str(ids[0]))).output
    with db.session_scope() as session:
        # The clock queues a round for it although no event waits after the cursor.
        assert events.waiting(session, ["webhook"], now=LATE + 3 * WINDOW) == ["webhook"]
    report = deliver(sent, LATE + 3 * WINDOW, batch_size=2)
    assert (report.replayed, report.delivered) == (1, 0)
    [batch] = sent.batches
    assert [e["type"] for e in batch] == [EventType.RECEIPT_FINAL, EventType.RECEIPT_FINAL]
    assert all(parked_id_range(ids[0], e["id"]) for e in batch)
    states = {b["id"]: b["state"] for b in parked()}
    assert states == {ids[0]: "replayed", ids[1]: "parked"}
    assert "1 open parked event batch(es)" in ok(invoke("events", "parked")).output
    # Closed: neither replayed again nor dismissed.
    refused = invoke("events", "replay", str(ids[0]), str(ids[1]))
    assert refused.exit_code != 0
    assert f"parked batch {ids[0]} is replayed" in refused.output
    assert {b["id"]: b["state"] for b in parked()}[ids[1]] == "parked", "all or none"


def parked_id_range(batch_id: int, event_id: int) -> bool:
    [row] = [b for b in parked() if b["id"] == batch_id]
    return bool(row["after_id"] < event_id <= row["through_id"])


def test_a_replay_that_fails_stays_open_with_its_error_and_is_tried_again() -> None:
    sent, ids = park_two()
    ok(invoke("events", "replay", str(ids[1])))
    sent.fail = "HTTP 503: still down"
    assert deliver(sent, LATE + 3 * WINDOW, batch_size=2).replayed == 0
    [row] = [b for b in parked() if b["id"] == ids[1]]
    assert (row["state"], row["last_error"]) == ("replay", "HTTP 503: still down")
    sent.fail = None
    assert deliver(sent, LATE + 3 * WINDOW + BASE, batch_size=2).replayed == 1
    assert {b["id"]: b["state"] for b in parked()}[ids[1]] == "replayed"


def test_dismiss_closes_unsent_and_unknown_ids_change_nothing() -> None:
    sent, ids = park_two()
    refused = invoke("events", "dismiss", str(ids[0]), "999999")
    assert refused.exit_code != 0 and "parked batch 999999 does not exist" in refused.output
    assert [b["state"] for b in parked()] == ["parked", "parked"]
    assert "dismissed 2 parked batch(es)" in ok(invoke("events", "dismiss", *map(str, ids))).output
    assert "no open parked event batches" in ok(invoke("events", "parked")).output
    everything = json.loads(ok(invoke("events", "parked", "--all", "--json")).stdout)
    assert [row["state"] for row in everything] == ["dismissed", "dismissed"]
    assert all(row["closed_at"] for row in everything)
    assert deliver(sent, LATE + 3 * WINDOW, batch_size=2).replayed == 0
    assert sent.batches == []


def test_the_api_names_the_error() -> None:
    with pytest.raises(ParkedBatchError, match="parked batch 5 does not exist"):
        replay_parked([5])
