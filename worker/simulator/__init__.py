"""A fake of the Uspeedo SMS API, served over real HTTP on loopback for tests, demos and benchmarks.

It speaks ``POST /api`` as the real service does (requests signed as ``worker/signing.py`` signs
them, nonce replay protection, ``GetUSMSSendReceipt`` and ``SendBatchUSMSMessage``), plays
scripted delivery *scenarios* for registered sessions, injects faults on demand, records every
call, and tells the truth about what each session will eventually report, so that a test can
compare what the worker stored with what it should have stored.

It also pushes each report, when it shows, to a callback URL as Uspeedo's Callback API does
(batches, retried every second three times then dropped, a share lost), when switched on.

Control endpoints (no auth, loopback clients only): ``POST /_sim/sessions``, ``POST /_sim/faults``,
``POST /_sim/push``, ``GET /_sim/pushes``, ``GET /_sim/calls``, ``GET /_sim/truth``,
``POST /_sim/reset``; each has a direct method on :class:`Simulator` for in-process use.

Time is measured in ``step`` seconds after a session's ``sent_at``; the clock is injectable so tests
can move time without sleeping.

Modules: ``scenarios`` (what each session reports and when, and the truth), ``faults`` (what can
go wrong on a call), ``service`` (the API without its transport), ``pusher`` (the push of
reports), ``http`` (the server, the :class:`Simulator` that runs it, and ``serve``), ``wire``
(actions, RetCodes and replies).
"""

from worker.simulator.faults import FAULT_KINDS
from worker.simulator.http import Simulator, serve
from worker.simulator.scenarios import SCENARIOS
from worker.simulator.service import FakeUspeedo

__all__ = ["FAULT_KINDS", "SCENARIOS", "FakeUspeedo", "Simulator", "serve"]
