"""uspeedo-receipts: poll Uspeedo SMS delivery receipts into SQL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.errors import (
    AckError,
    AnswerTooLarge,
    ApiError,
    CredentialsError,
    MalformedResponse,
    ParameterError,
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
    from worker.api import acknowledge, track, track_many
    from worker.tracking import TrackResult

__all__ = [
    "AckError",
    "AnswerTooLarge",
    "ApiError",
    "CredentialsError",
    "MalformedResponse",
    "ParameterError",
    "PollWindowClosed",
    "ReceiptsError",
    "RejectedTrackError",
    "ServerError",
    "SessionNotFound",
    "SettingsError",
    "TrackError",
    "TrackInterrupted",
    "TrackResult",
    "TransportError",
    "UspeedoError",
    "acknowledge",
    "track",
    "track_many",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import worker.celery` in a worker does not pull the sender API's imports
    # and `import worker` stays cheap for senders (the errors module imports nothing).
    if name in ("track", "track_many", "acknowledge"):
        from worker import api

        return getattr(api, name)
    if name == "TrackResult":
        from worker import tracking

        return tracking.TrackResult
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
