"""uspeedo-receipts: poll Uspeedo SMS delivery receipts into SQL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.errors import (
    AckError,
    AnswerTooLarge,
    ApiError,
    CredentialsError,
    DatabaseMissing,
    MalformedResponse,
    ParameterError,
    ParkedBatchError,
    PollWindowClosed,
    ReceiptsError,
    RejectedTrackError,
    ServerError,
    SessionNotFound,
    SettingsError,
    TrackError,
    TrackInterrupted,
    TransportError,
    UspeedoError,
)

if TYPE_CHECKING:
    from worker.api import acknowledge, history, status, track, track_many
    from worker.records import (
        PhoneReceipt,
        ReceiptChange,
        SessionChange,
        SessionHistory,
        SessionStatus,
    )
    from worker.tracking import TrackResult

__all__ = [
    "AckError",
    "AnswerTooLarge",
    "ApiError",
    "CredentialsError",
    "DatabaseMissing",
    "MalformedResponse",
    "ParameterError",
    "ParkedBatchError",
    "PhoneReceipt",
    "PollWindowClosed",
    "ReceiptChange",
    "ReceiptsError",
    "RejectedTrackError",
    "ServerError",
    "SessionChange",
    "SessionHistory",
    "SessionNotFound",
    "SessionStatus",
    "SettingsError",
    "TrackError",
    "TrackInterrupted",
    "TrackResult",
    "TransportError",
    "UspeedoError",
    "acknowledge",
    "history",
    "status",
    "track",
    "track_many",
]


_RECORDS = ("SessionStatus", "PhoneReceipt", "SessionHistory", "ReceiptChange", "SessionChange")


def __getattr__(name: str) -> Any:
    # Lazy, so that `import worker.celery` in a worker does not pull the sender API's imports
    # and `import worker` stays cheap for senders (the errors module imports only the standard
    # library).
    if name in ("track", "track_many", "acknowledge", "status", "history"):
        from worker import api

        return getattr(api, name)
    # One call, worker.status(), gives a session with its receipts: a worker.receipts()
    # function could not exist, since importing the module worker.receipts (the API answers'
    # parser, which the status read itself imports) replaces the package's attribute.
    if name in _RECORDS:
        from worker import records

        return getattr(records, name)
    if name == "TrackResult":
        from worker import tracking

        return tracking.TrackResult
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
