"""The clock of the timing rules is the database's: a host's wrong wall clock moves nothing on
PostgreSQL, a reading costs no round trip between resyncs, and a database away for a moment
does not stop it. On SQLite the database is on this host, so the host's clock is its clock."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.support.databases import Configure
from worker import clock, db

SKEW = timedelta(minutes=2)


def _database_now() -> datetime:
    with db.get_engine().connect() as connection:
        value: datetime = connection.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
    return value


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
@pytest.mark.parametrize("skew", [SKEW, -SKEW], ids=["host-fast", "host-slow"])
def test_a_skewed_host_reads_the_database_s_time(
    monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    monkeypatch.setattr(clock, "host_now", lambda: datetime.now(clock.UTC) + skew)
    reading = clock.DatabaseClock(db.get_engine)()
    assert abs(reading - _database_now()) < timedelta(milliseconds=250)


class _Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_one_round_trip_per_resync_and_monotonic_time_in_between() -> None:
    engine = db.get_engine()
    queries: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    monotonic = _Monotonic()
    database_clock = clock.DatabaseClock(lambda: engine, resync=60, monotonic=monotonic)
    first = database_clock()
    monotonic.now += 59
    assert database_clock() - first == timedelta(seconds=59)
    assert len(queries) == 1
    monotonic.now += 2
    database_clock()
    assert len(queries) == 2, "read again once the reading is older than the resync period"


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_a_database_away_for_a_moment_does_not_stop_the_clock() -> None:
    engines = [db.get_engine()]
    monotonic = _Monotonic()
    database_clock = clock.DatabaseClock(lambda: engines[-1], resync=60, monotonic=monotonic)
    first = database_clock()
    # The server stops answering (a closed port stands in for it).
    away = db.create_engine("postgresql://postgres@127.0.0.1:1/none", pool_pre_ping=False)
    engines.append(away)
    monotonic.now += 120
    assert database_clock() - first == timedelta(seconds=120)
    away.dispose()
    # A clock that never read the database cannot guess.
    with pytest.raises(sa.exc.OperationalError):
        clock.DatabaseClock(lambda: away)()


def test_on_sqlite_the_host_is_the_database(
    configure: Configure, sqlite_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(RECEIPTS_DATABASE_URL=sqlite_database)
    fixed = datetime(2024, 6, 1, 12, 0, tzinfo=clock.UTC)
    monkeypatch.setattr(clock, "host_now", lambda: fixed)
    assert clock.DatabaseClock(db.get_engine)() == fixed
