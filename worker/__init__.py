"""uspeedo-receipts: poll Uspeedo SMS delivery receipts into SQL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.api import acknowledge, track, track_many
    from worker.tracking import TrackError, TrackResult

__all__ = ["TrackError", "TrackResult", "acknowledge", "track", "track_many"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import worker.celery` in a worker does not pull the sender API's imports
    # and `import worker` stays cheap for senders.
    if name in ("track", "track_many", "acknowledge"):
        from worker import api

        return getattr(api, name)
    if name in ("TrackError", "TrackResult"):
        from worker import tracking

        return getattr(tracking, name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
