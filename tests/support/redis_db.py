"""A Redis db number of the shared server, taken by one test run (or benchmark) for itself.

Several people's test runs share the machine's Redis. Each takes a db that was empty when it
looked, marks it with a key that only it knows the value of, empties only that db (key by key,
the mark excepted, so the db never looks free to another run while it is in use) and gives it
back empty. Nothing here runs FLUSHDB or FLUSHALL, and db 0 (applications) and db 15 (the suite's
canary, see tests/support/untouched.py) are never taken.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import redis

MARK = "receipts-tests:claim"
# Keys under this prefix belong to the test machinery (the mark, the canary): never emptied.
RESERVED_PREFIX = b"receipts-tests:"
CANDIDATES = range(1, 15)
# Long enough for any run; a run killed without cleaning up frees its db when the mark expires.
CLAIM_TTL_MS = 6 * 3600 * 1000

# One step each, so that no other client slips in between the look and the mark.
_CLAIM_IF_EMPTY = """
if redis.call('DBSIZE') == 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
_RENEW_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""
_RELEASE_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"""


class ClaimError(RuntimeError):
    """No db could be taken, or the one taken was taken over by someone else."""


def with_db(url: str, db: int) -> str:
    """``url`` (a redis:// URL) pointing at db number ``db``."""
    return urlsplit(url)._replace(path=f"/{db}").geturl()


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)


def empty(url: str) -> int:
    """Delete every key of the db at ``url`` except the test machinery's own; returns how
    many. For a db this run owns only: it is the one place keys are deleted wholesale."""
    client = _client(url)
    removed = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(count=500):
            if not key.startswith(RESERVED_PREFIX):
                batch.append(key)
            if len(batch) >= 500:
                removed += int(client.unlink(*batch))
                batch.clear()
        if batch:
            removed += int(client.unlink(*batch))
    finally:
        client.close()
    return removed


class Claim:
    """A db of the shared Redis for this process: its URL, kept marked, given back empty.

    ``token`` None: a db the user named (``RECEIPTS_TEST_REDIS_URL``): it is theirs to give,
    so it is emptied key by key like a claimed one but carries no mark.
    """

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token

    @property
    def db(self) -> int:
        return int(urlsplit(self.url).path.strip("/") or 0)

    def renew(self) -> None:
        """Fail loudly if the mark is gone or changed: someone else emptied or took the db."""
        if self.token is None:
            return
        client = _client(self.url)
        try:
            mine = client.eval(_RENEW_IF_MINE, 1, MARK, self.token, CLAIM_TTL_MS)
        finally:
            client.close()
        if not mine:
            raise ClaimError(
                f"Redis db {self.db} ({self.url}) was taken by this test run, but its mark "
                f"{MARK!r} is gone or changed: something else emptied or took that db"
            )

    def empty(self) -> None:
        """Delete this db's keys (the mark excepted), after checking it is still ours."""
        self.renew()
        empty(self.url)

    def release(self) -> None:
        """Empty the db and remove the mark, if it is still ours; nothing otherwise."""
        if self.token is None:
            empty(self.url)
            return
        client = _client(self.url)
        try:
            if client.get(MARK) != self.token.encode():
                return
            empty(self.url)
            client.eval(_RELEASE_IF_MINE, 1, MARK, self.token)
        finally:
            client.close()


def claim(server_url: str, candidates: Sequence[int] = CANDIDATES) -> Claim:
    """Take the first db of ``candidates`` that is empty, marking it atomically."""
    token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
    busy = []
    for db in candidates:
        client = _client(with_db(server_url, db))
        try:
            if client.eval(_CLAIM_IF_EMPTY, 1, MARK, token, CLAIM_TTL_MS):
                return Claim(with_db(server_url, db), token)
            busy.append(db)
        except redis.ResponseError:
            break  # past the server's last db ("databases" in redis.conf)
        finally:
            client.close()
    raise ClaimError(
        f"no empty Redis db to take on {server_url} (busy: {busy}); "
        "set RECEIPTS_TEST_REDIS_URL to a db of your own"
    )


@contextlib.contextmanager
def claimed(server_url: str, candidates: Sequence[int] = CANDIDATES) -> Iterator[Claim]:
    """A claimed db for the length of the block, given back empty afterwards."""
    taken = claim(server_url, candidates)
    try:
        yield taken
    finally:
        taken.release()
