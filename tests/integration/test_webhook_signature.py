"""What a webhook receiver can trust: the signature checked by the README's own snippet (taken
from the README, so the two cannot drift) on webhooks the worker really sent, replays refused
by its tolerance; no redirect followed to anywhere; TLS certificates verified.

Deliveries go to real HTTP(S) receivers on loopback, through ``webhooks.deliver_due`` with an
injected clock."""

from __future__ import annotations

import re
import ssl
import subprocess
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.clock import LEASE, POLICY, T0
from tests.support.factories import P1, escalate, queued_webhooks, track
from tests.support.receiver import SECRET, Hit, Receiver
from worker import bounded_http, db, webhooks
from worker.clock import host_now

ROOT = Path(__file__).resolve().parents[2]
CUTOFF_AT = T0 + POLICY.cutoff
DELIVERY_ID = "escalation-1-SIG-1"

Verify = Callable[..., bool]


def readme_verifier() -> tuple[Verify, int]:
    """The README's verification snippet, run as a receiver would paste it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Verifying a webhook's signature", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, "the README shows no Python snippet under its heading"
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    return namespace["verify_receipts_signature"], namespace["TOLERANCE"]


def deliver(
    url: str, *, at: Callable[[], datetime] = lambda: CUTOFF_AT, secret: str | None = SECRET
) -> webhooks.DeliveryReport:
    with bounded_http.new_session() as http:
        return webhooks.deliver_due(
            session_factory=db.session_scope,
            http=http,
            url=url,
            secret=secret,
            now=at,
            lease=LEASE,
            retry_base=timedelta(minutes=1),
            retry_cap=timedelta(minutes=30),
            timeout=5,
        )


def escalated(now: datetime = CUTOFF_AT) -> None:
    """One escalation webhook queued, due at ``now``."""
    sent_at = now - POLICY.cutoff
    track({"account_id": 1, "session_no": "SIG-1", "phones": [P1], "sent_at": sent_at}, now=sent_at)
    assert len(escalate(now)) == 1


def one_hit(receiver: Receiver) -> Hit:
    hits = receiver.hits()
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.usefixtures("database")
def test_the_readme_snippet_accepts_a_real_webhook_and_refuses_replays_and_forgeries() -> None:
    verify, tolerance = readme_verifier()
    assert tolerance == 300
    escalated()
    with Receiver() as receiver:
        assert deliver(receiver.url).delivered == 1
    hit = one_hit(receiver)
    assert hit.signed_at == int(CUTOFF_AT.timestamp()), "t is the injected clock's"
    body, header, t = hit.body, str(hit.signature), CUTOFF_AT.timestamp()

    assert verify(SECRET, body, header, now=t)
    # Within the tolerance either way (a receiver's clock a little off)...
    assert verify(SECRET, body, header, now=t + tolerance)
    assert verify(SECRET, body, header, now=t - tolerance)
    # ...and not beyond: the same request replayed later is refused.
    assert not verify(SECRET, body, header, now=t + tolerance + 1)
    assert not verify(SECRET, body, header, now=t - tolerance - 1)
    # Forgeries: another body, another secret, a t moved to now without re-signing.
    assert not verify(SECRET, body.replace(b"SIG-1", b"SIG-2"), header, now=t)
    assert not verify(SECRET + "x", body, header, now=t)
    later = int(t) + 3600
    moved = re.sub(r"t=\d+", f"t={later}", header)
    assert not verify(SECRET, body, moved, now=later)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "sha256=00",  # the old form, without a timestamp
        "t=,v1=00",
        "t=abc,v1=00",
        "t=²,v1=00",  # a digit to str.isdigit(), not to int()
        "t=1764504000",
        "t=1764504000,t=1764504000,v1=00",
        "t=1764504000,v1=é",  # compare_digest refuses non-ASCII str: encoded first
    ],
)
def test_the_readme_snippet_refuses_malformed_headers_without_raising(header: str | None) -> None:
    verify, _ = readme_verifier()
    assert verify(SECRET, b"{}", header, now=1764504000) is False


@pytest.mark.usefixtures("database")
def test_the_readme_snippet_reads_this_hosts_clock_by_default() -> None:
    """The worker signs with its clock (the database's in production): a receiver on a host
    whose clock agrees accepts the webhook without passing ``now``."""
    verify, _ = readme_verifier()
    now = host_now()
    escalated(now)
    with Receiver() as receiver:
        assert deliver(receiver.url, at=host_now).delivered == 1
    hit = one_hit(receiver)
    assert verify(SECRET, hit.body, hit.signature)


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_attempt_never_followed(status: int) -> None:
    escalated()
    with Receiver() as elsewhere, Receiver(status=status, location=elsewhere.url) as receiver:
        assert deliver(receiver.url) == webhooks.DeliveryReport(delivered=0, failed=1)
        assert len(receiver.hits()) == 1
        assert elsewhere.hits() == [], "the signed body went nowhere else"
    row = queued_webhooks()[DELIVERY_ID]
    assert row["delivered_at"] is None and row["attempts"] == 1
    assert row["last_error"] == (
        f"HTTP {status}: a redirect, not followed (webhooks follow none): set the webhook URL "
        "to the address that answers"
    )
    # The Location (which may carry a token, like the URL) is not shown.
    assert "127.0.0.1" not in row["last_error"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, trusted by nobody until told."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.mark.usefixtures("database")
def test_tls_certificates_are_verified(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    escalated()
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with Receiver(tls=context) as receiver:
        assert receiver.url.startswith("https://")
        # A certificate nobody vouches for: refused before a byte of the webhook is sent.
        assert deliver(receiver.url) == webhooks.DeliveryReport(delivered=0, failed=1)
        assert receiver.hits() == []
        row = queued_webhooks()[DELIVERY_ID]
        assert row["delivered_at"] is None
        assert "SSLError" in row["last_error"], row["last_error"]
        assert "CERTIFICATE_VERIFY_FAILED" in row["last_error"], row["last_error"]

        # Trusted through REQUESTS_CA_BUNDLE (as the README says), the same receiver takes it.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        assert deliver(receiver.url, at=lambda: CUTOFF_AT + timedelta(minutes=1)).delivered == 1
        assert one_hit(receiver).signed()


def test_no_code_turns_tls_verification_off() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "worker").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"verify\s*=\s*False|CERT_NONE|check_hostname\s*=\s*False", line)
    ]
    assert offenders == []
