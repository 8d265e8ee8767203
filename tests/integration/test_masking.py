"""Minimisation: ``worker/masking.py`` and ``receipts mask``, at function level with an injected
clock, on PostgreSQL and SQLite. What is masked (receipts, history, tracked phones, escalation
detail, webhook payloads) and what is not (pending and recent sessions); late receipts, pushed
or repolled, still matching their masked rows; the dry run; reruns; a masking interrupted; two
at once and a locked session on PostgreSQL; the command, the daily task and the settings."""

from __future__ import annotations

import logging
import random
import threading
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.cli import invoke, ok
from tests.support.clock import POLICY, T0
from tests.support.factories import P1, P2, P3, escalate, poll, receipt, track
from tests.support.threads import at_once
from worker import db, masking, push, store
from worker.domain import ReceiptSource, Result, phone_key
from worker.models import (
    metadata,
    outbox_table,
    purge_counts_table,
    receipt_events_table,
    receipts_table,
    sessions_table,
)

FIRST = T0 + POLICY.first_delay
LATE = T0 + POLICY.cutoff + timedelta(minutes=1)
AGE = timedelta(days=30)
NOW = T0 + timedelta(days=31)
KEY = "test-phone-hash-key-0123456789abcdef"
HASH = masking.PhoneHash.of(KEY)
# What must never be left in clear once masked: the digits of P1, P2 and P3 before their last
# four ((852)5531111x).
CLEAR = "8525531"
# A phone of sessions that are not masked.
OTHER = "(852)66600001"


def masked_key(phone: str) -> str:
    return HASH(phone_key(phone))


def resolved(*session_nos: str, phones: tuple[str, ...] = (P1, P2)) -> None:
    """Sessions of account 1 resolved by one poll, every phone Success."""
    track(*({"account_id": 1, "session_no": s, "phones": list(phones)} for s in session_nos))
    poll(
        1,
        [receipt(s, p, Result.SUCCESS, FIRST) for s in session_nos for p in phones],
        FIRST,
    )


def escalated(session_no: str) -> None:
    """A session of account 2, P1 Unknow and P2 never seen, escalated at LATE (webhook
    queued)."""
    track({"account_id": 2, "session_no": session_no, "phones": [P1, P2]})
    poll(2, [receipt(session_no, P1, Result.UNKNOW, FIRST)], FIRST)
    escalate(LATE)


def run(*, batch_size: int = 1000, now: Any = NOW) -> masking.MaskReport:
    return masking.mask(
        db.session_scope, now=now, older_than=AGE, phone_hash=HASH, batch_size=batch_size
    )


def dump() -> str:
    """Every row of every table, as text."""
    with db.session_scope() as session:
        return "\n".join(
            repr(list(session.execute(sa.select(table)).all())) for table in metadata.sorted_tables
        )


def session_row(session_no: str) -> dict[str, Any]:
    with db.session_scope() as session:
        row = session.execute(
            sa.select(sessions_table).where(sessions_table.c.session_no == session_no)
        ).one()
        return dict(row._mapping)


def receipts_of(session_no: str) -> list[dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(
            sa.select(receipts_table)
            .where(receipts_table.c.session_no == session_no)
            .order_by(receipts_table.c.phone_key)
        )
        return [dict(row._mapping) for row in rows]


def history_of(session_no: str) -> list[dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(
            sa.select(receipt_events_table)
            .where(receipt_events_table.c.session_no == session_no)
            .order_by(receipt_events_table.c.id)
        )
        return [dict(row._mapping) for row in rows]


def masked_counts() -> dict[str, int]:
    with db.session_scope() as session:
        rows = session.execute(
            sa.select(purge_counts_table.c.table_name, purge_counts_table.c.masked)
        )
        return {str(name): int(n) for name, n in rows if n}


def pushed(*receipts: Any, now: Any = NOW) -> push.PushOutcome:
    with db.session_scope() as session:
        return push.record_push(session, list(receipts), now=now)


@pytest.fixture
def hash_key(database: str, configure: Any) -> None:
    """The workers' RECEIPTS_PHONE_HASH_KEY, which the write path reads for masked sessions."""
    configure(RECEIPTS_PHONE_HASH_KEY=KEY)


@pytest.mark.usefixtures("database")
class TestWhatIsMasked:
    def test_every_phone_of_a_finished_session_keeps_only_its_last_four_digits(self) -> None:
        resolved("R")
        escalated("E")
        track({"account_id": 3, "session_no": "P", "phones": [OTHER]})  # pending
        assert CLEAR in dump()
        report = run()
        assert (report.sessions, report.receipts, report.outbox) == (2, 3, 1)
        assert report.history == 3
        # Nothing of P1, P2 but their last four digits is left anywhere.
        assert CLEAR not in dump()
        for session_no in ("R", "E"):
            row = session_row(session_no)
            assert row["phones"] == ["*******1111", "*******1112"]
            assert row["masked_phone_keys"] == [masked_key(P1), masked_key(P2)]
            assert row["phones_masked_at"] == NOW
        assert [(r["phone"], r["phone_key"]) for r in receipts_of("R")] == sorted(
            [("*******1111", masked_key(P1)), ("*******1112", masked_key(P2))],
            key=lambda pair: pair[1],
        )
        assert {(h["phone"], h["phone_key"]) for h in history_of("E")} == {
            ("*******1111", masked_key(P1))
        }
        detail = session_row("E")["escalation_detail"]
        assert detail["phones"] == [
            {"phone": "*******1111", "last_result": "Unknow"},
            {"phone": "*******1112", "last_result": None},
        ]
        with db.session_scope() as session:
            payload = session.scalar(sa.select(outbox_table.c.payload))
        assert payload["unresolved_phones"] == detail["phones"]
        assert "*******1111 (Unknow)" in payload["text"]
        # Reporting still works: results, costs, times are kept.
        assert [r["result"] for r in receipts_of("R")] == ["Success", "Success"]
        # What had no escalation detail still has none (not a JSON null).
        assert session_row("R")["escalation_detail"] is None
        with db.session_scope() as session:
            assert session.scalar(
                sa.select(sa.func.count()).where(
                    sessions_table.c.session_no == "R",
                    sessions_table.c.escalation_detail.is_(None),
                )
            )
        # The pending session is not masked.
        assert session_row("P")["phones"] == [OTHER]
        assert session_row("P")["phones_masked_at"] is None
        assert masked_counts() == {
            "sms_sessions": 2,
            "sms_receipts": 3,
            "sms_receipt_events": 3,
            "escalation_outbox": 1,
        }

    def test_not_before_the_age(self) -> None:
        resolved("R")
        assert run(now=T0 + timedelta(days=29)).sessions == 0
        assert session_row("R")["phones_masked_at"] is None
        assert CLEAR in dump()

    def test_a_rerun_masks_nothing_more_and_changes_nothing(self) -> None:
        resolved("R")
        escalated("E")
        run()
        before = dump()
        again = run(now=NOW + timedelta(days=1))
        assert again.sessions == 0
        assert dump() == before

    def test_batches_each_their_own_transaction(self) -> None:
        resolved(*(f"S{i}" for i in range(5)))
        report = run(batch_size=2)
        assert (report.sessions, report.batches) == (5, 3)
        assert CLEAR not in dump()

    def test_an_interrupted_masking_keeps_its_batch_whole_and_resumes(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        names = [f"S{i}" for i in range(4)]
        resolved(*names)
        real = masking.mask_batch
        calls = 0

        def crashing(session: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            result = real(session, **kwargs)
            if calls == 2:  # after its updates, before its commit
                raise RuntimeError("killed")
            return result

        monkeypatch.setattr(masking, "mask_batch", crashing)
        with pytest.raises(RuntimeError):
            run(batch_size=2)
        masked = {s: session_row(s)["phones_masked_at"] is not None for s in names}
        assert masked == {"S0": True, "S1": True, "S2": False, "S3": False}
        # The rolled back batch left its sessions whole, in clear.
        assert [r["phone_key"] for r in receipts_of("S2")] == sorted([phone_key(P1), phone_key(P2)])
        monkeypatch.setattr(masking, "mask_batch", real)
        assert run(batch_size=2).sessions == 2
        assert CLEAR not in dump()

    def test_a_masked_session_tracked_again_stays_as_it_is(self) -> None:
        resolved("R", phones=(P1,))
        run()
        before = session_row("R")
        result = track({"account_id": 1, "session_no": "R", "phones": [P1, P3]}, now=NOW)
        assert result.unchanged == 1
        after = session_row("R")
        assert (after["phones"], after["state"]) == (before["phones"], "resolved")
        assert CLEAR not in dump()


@pytest.mark.usefixtures("hash_key")
class TestLateReceipts:
    def test_a_late_push_matches_the_masked_row_and_resolves_the_escalation(self) -> None:
        escalated("E")
        run()
        outcome = pushed(
            receipt("E", P1, Result.SUCCESS, NOW),
            receipt("E", "+852 5531 1112", Result.FAIL, NOW),
        )
        assert outcome.resolved == ("E",)
        rows = receipts_of("E")
        # One row per phone: the masked row of P1 updated, P2's new row masked too.
        assert sorted((r["phone"], r["phone_key"], r["result"]) for r in rows) == sorted(
            [
                ("*******1111", masked_key(P1), "Success"),
                ("*******1112", masked_key(P2), "Fail"),
            ]
        )
        assert all(r["source"] == "push" for r in rows)
        row = session_row("E")
        assert row["state"] == "resolved"
        assert row["escalated_at"] == LATE  # resolved late
        # Its history goes on, masked, under the same keys.
        assert {h["phone_key"] for h in history_of("E")} == {masked_key(P1), masked_key(P2)}
        assert CLEAR not in dump()

    def test_a_late_receipt_never_downgrades_a_final_one_nor_adds_a_row(self) -> None:
        resolved("R")
        run()
        before = receipts_of("R")
        history = len(history_of("R"))
        pushed(receipt("R", P1, Result.UNKNOW, NOW))
        after = receipts_of("R")
        assert after == before
        # The losing receipt is kept in the history (applied false), masked.
        added = history_of("R")[history:]
        assert [(h["phone"], h["phone_key"], h["applied"]) for h in added] == [
            ("*******1111", masked_key(P1), False)
        ]
        # Repeated, it adds nothing more.
        pushed(receipt("R", P1, Result.UNKNOW, NOW))
        assert len(history_of("R")) == history + 1
        assert CLEAR not in dump()

    def test_a_receipt_for_an_untracked_phone_is_stored_masked(self) -> None:
        resolved("R", phones=(P1,))
        run()
        pushed(receipt("R", P3, Result.SUCCESS, NOW))
        assert {(r["phone"], r["phone_key"]) for r in receipts_of("R")} == {
            ("*******1111", masked_key(P1)),
            ("*******1113", masked_key(P3)),
        }
        assert CLEAR not in dump()

    def test_a_repoll_answer_matches_the_masked_rows(self) -> None:
        escalated("E")
        run()
        with db.session_scope() as session:
            targets = store.escalated_targets(session, ["E"], account_id=2, now=NOW)
            outcome = store.record_answer(
                session,
                targets=targets,
                receipts=[
                    receipt("E", P1, Result.SUCCESS, NOW),
                    receipt("E", P2, Result.SUCCESS, NOW),
                ],
                problems={},
                now=NOW,
                policy=POLICY,
                rng=random.Random(1),
                source=ReceiptSource.REPOLL,
            )
        assert outcome.resolved == ("E",)
        assert len(receipts_of("E")) == 2
        assert {r["phone_key"] for r in receipts_of("E")} == {masked_key(P1), masked_key(P2)}
        assert session_row("E")["state"] == "resolved"
        assert CLEAR not in dump()

    def test_a_session_masked_while_its_answer_was_in_flight_is_keyed_under_its_lock(
        self,
    ) -> None:
        """The targets read before the masking (clear phones) are read again under the lock:
        the answer is keyed by the hash, not by the digits the targets held."""
        escalated("E")
        with db.session_scope() as session:
            targets = store.escalated_targets(session, ["E"], account_id=2, now=NOW)
        assert targets[0].phones == (P1, P2)
        run()
        with db.session_scope() as session:
            store.record_receipts(
                session,
                targets=targets,
                receipts=[receipt("E", P1, Result.SUCCESS, NOW)],
                now=NOW,
                source=ReceiptSource.REPOLL,
            )
        assert {r["phone_key"]: r["result"] for r in receipts_of("E")} == {
            masked_key(P1): "Success"
        }
        assert CLEAR not in dump()


@pytest.mark.usefixtures("database")
def test_without_the_key_late_receipts_of_masked_sessions_are_dropped_not_stored_in_clear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolved("R", phones=(P1,))
    track({"account_id": 3, "session_no": "P", "phones": [OTHER]})
    run()
    before = receipts_of("R")
    with caplog.at_level(logging.WARNING, logger="worker.store"):
        pushed(receipt("R", P3, Result.SUCCESS, NOW), receipt("P", OTHER, Result.SUCCESS, NOW))
    assert receipts_of("R") == before
    assert CLEAR not in dump()
    # The other session's receipt is stored as ever.
    assert [r["result"] for r in receipts_of("P")] == ["Success"]
    assert "RECEIPTS_PHONE_HASH_KEY is not set" in caplog.text


@pytest.mark.usefixtures("database")
def test_with_another_key_late_receipts_of_masked_sessions_are_dropped_not_added(
    configure: Any, caplog: pytest.LogCaptureFixture
) -> None:
    resolved("R", phones=(P1,))
    escalated("E")
    # Tracked without phones: its receipts' keys tell.
    track({"account_id": 4, "session_no": "N"})
    poll(4, [receipt("N", p, Result.SUCCESS, FIRST) for p in (P1, P2)], FIRST)
    run()
    before = {s: receipts_of(s) for s in ("R", "E", "N")}
    assert [r["phone"] for r in before["N"]] == ["*******1111", "*******1112"]
    configure(RECEIPTS_PHONE_HASH_KEY="another-phone-hash-key-0123456789ab")
    with caplog.at_level(logging.WARNING, logger="worker.store"):
        outcome = pushed(
            receipt("R", P3, Result.SUCCESS, NOW),
            receipt("E", P1, Result.SUCCESS, NOW),
            receipt("E", P2, Result.SUCCESS, NOW),
            receipt("N", P1, Result.FAIL, NOW + timedelta(seconds=1)),
        )
    # No second row under the other key, and the escalation is not resolved by it.
    assert outcome.resolved == ()
    assert {s: receipts_of(s) for s in ("R", "E", "N")} == before
    assert session_row("E")["state"] == "escalated"
    assert "masked under another RECEIPTS_PHONE_HASH_KEY" in caplog.text
    assert CLEAR not in dump()


def test_two_maskings_at_once_mask_each_session_once(pg: str) -> None:
    names = [f"S{i:02d}" for i in range(30)]
    resolved(*names)
    reports = at_once(lambda: run(batch_size=3), lambda: run(batch_size=3))
    assert sum(r.sessions for r in reports) == 30
    assert sum(r.receipts for r in reports) == 60
    assert masked_counts()["sms_receipts"] == 60
    assert CLEAR not in dump()


def test_a_locked_session_is_skipped_not_waited_for(pg: str) -> None:
    resolved("A", "B")
    engine = db.get_engine()
    with engine.connect() as holder, holder.begin():
        holder.execute(
            sa.select(sessions_table.c.id)
            .where(sessions_table.c.session_no == "A")
            .with_for_update()
        )
        assert run().sessions == 1
    assert session_row("A")["phones_masked_at"] is None
    assert run().sessions == 1
    assert CLEAR not in dump()


# --- the command, the daily task -----------------------------------------------------------


@pytest.fixture
def cli_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's now is NOW: no test depends on today's date."""
    monkeypatch.setattr("worker.runtime.utcnow", lambda: NOW)


@pytest.mark.usefixtures("database", "cli_now")
def test_dry_run_counts_by_state_and_month_and_masks_nothing(configure: Any) -> None:
    resolved("R1", "R2")
    escalated("E")
    track({"account_id": 3, "session_no": "P", "phones": [OTHER]})
    before = dump()
    result = ok(invoke("mask", "--older-than", "30d", "--dry-run"))
    assert result.output.splitlines() == [
        "escalated  2026-11  1 session(s)",
        "resolved   2026-11  2 session(s)",
        "total: 3 session(s) would be masked",
    ]
    assert dump() == before
    # The dry run needs no key; the masking does.
    result = invoke("mask", "--older-than", "30d")
    assert result.exit_code == 2
    assert result.output.startswith("error: set RECEIPTS_PHONE_HASH_KEY")
    assert dump() == before
    configure(RECEIPTS_MASK_PHONES_AFTER="30d", RECEIPTS_PHONE_HASH_KEY=KEY)
    result = ok(invoke("mask"))
    assert result.output.startswith("masked 3 session(s): 5 receipt(s)")
    assert CLEAR not in dump()
    assert ok(invoke("mask")).output.startswith("masked 0 session(s)")


@pytest.mark.usefixtures("database")
def test_the_command_without_an_age_says_what_to_give() -> None:
    result = invoke("mask")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: give --older-than (e.g. 90d) or set RECEIPTS_MASK_PHONES_AFTER"
    )
    # Not within the cutoff (the test settings' RECEIPTS_CUTOFF is 10 s).
    result = invoke("mask", "--older-than", "5s")
    assert result.exit_code == 2
    assert "must be longer than RECEIPTS_CUTOFF" in result.output


@pytest.mark.usefixtures("database", "cli_now")
def test_the_daily_task_masks_with_the_setting(configure: Any) -> None:
    from worker import tasks
    from worker.celery import beat_schedule
    from worker.config import get_settings

    resolved("R")
    assert tasks.purge_finished() == {"sessions": 0, "masked": 0}
    assert "receipts-purge" not in beat_schedule(get_settings())
    configure(RECEIPTS_MASK_PHONES_AFTER="30d", RECEIPTS_PHONE_HASH_KEY=KEY)
    assert beat_schedule(get_settings())["receipts-purge"]["task"] == "receipts.purge"
    assert tasks.purge_finished() == {"sessions": 0, "masked": 1}
    assert CLEAR not in dump()
    # With a retention too, the purge goes first: what it deletes is not masked.
    resolved("OLD")
    with db.session_scope() as session:
        session.execute(
            sa.update(sessions_table)
            .where(sessions_table.c.session_no == "OLD")
            .values(sent_at=NOW - timedelta(days=100))
        )
    configure(
        RECEIPTS_MASK_PHONES_AFTER="30d", RECEIPTS_PHONE_HASH_KEY=KEY, RECEIPTS_RETENTION="90d"
    )
    assert tasks.purge_finished() == {"sessions": 1, "masked": 0}


def test_a_masking_racing_late_pushes_leaves_one_row_per_phone_and_no_phone_in_clear(
    pg: str, configure: Any
) -> None:
    """Late receipts pushed while the masking runs: whichever commits first, each phone keeps
    one row (a push keys by the hash once its session is masked, read under the session's
    lock), no final receipt is downgraded, and once a last run took the sessions the pushes
    held, no phone is left in clear."""
    configure(RECEIPTS_PHONE_HASH_KEY=KEY)
    names = [f"S{i:02d}" for i in range(40)]
    resolved(*names)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def masker() -> None:
        try:
            start.wait(timeout=10)
            run(batch_size=3)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    def pusher() -> None:
        try:
            start.wait(timeout=10)
            for name in names:
                pushed(
                    receipt(name, P1, Result.UNKNOW, NOW), receipt(name, P3, Result.SUCCESS, NOW)
                )
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=masker), threading.Thread(target=pusher)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    run()  # the sessions a push held when the masking passed them
    assert CLEAR not in dump()
    for name in names:
        rows = {r["phone_key"]: r["result"] for r in receipts_of(name)}
        assert rows == {
            masked_key(P1): "Success",
            masked_key(P2): "Success",
            masked_key(P3): "Success",
        }, name
