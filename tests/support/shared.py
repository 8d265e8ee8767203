"""The machine's shared PostgreSQL and Redis, as the test settings name them.

``RECEIPTS_TEST_PG_URL``: an administrative connection to the shared PostgreSQL; each run creates
its own databases there and drops only those. ``RECEIPTS_TEST_REDIS_URL``: a Redis db to use as
this run's own; unset, the run takes an empty db of the shared Redis for itself
(tests/support/redis_db.py).
"""

from __future__ import annotations

import os

PG_ADMIN_URL = os.environ.get(
    "RECEIPTS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL_GIVEN = os.environ.get("RECEIPTS_TEST_REDIS_URL") or None
# The server the run's Redis db lives on; its db number is claimed, not fixed.
REDIS_SERVER_URL = REDIS_URL_GIVEN or "redis://127.0.0.1:6379/0"
