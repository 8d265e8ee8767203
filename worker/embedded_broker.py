"""The embedded broker: kombu's filesystem transport, with every message written whole.

kombu's own transport creates a message's file and only then writes into it, while a reader
takes any file whose name matches its queue. Under load (a worker's tick and beat writing,
its main process reading) a reader took a file still empty, failed to decode it, lost the
message, and the worker stopped on an "Unrecoverable error" (seen at 5,000 sessions over 500
accounts with `receipts run`). Here a message is written under a name no reader takes and
renamed into its queue once complete, which is atomic on one filesystem; a reader claims a
file by renaming it into the processed folder (inside the broker folder, so that rename is
atomic too: two readers never get the same message), waits for a file that kombu's own
writer (another codebase sharing the folder) is still writing, and sets a file that still
cannot be decoded aside with an error instead of stopping the worker.

Names sort in the order messages were written: the system's monotonic clock in nanoseconds,
zero-padded (kombu's milliseconds leave the messages of one millisecond in random order, and
sort out of order each time they gain a digit).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections import deque
from functools import cached_property
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import JSONEncoder, object_hook

log = logging.getLogger(__name__)

# A file being written ends in this, so that no queue's name pattern matches it.
WRITING_SUFFIX = ".writing"
# A file that could not be decoded is kept in the processed folder under this suffix.
UNREADABLE_SUFFIX = ".unreadable"
# A message's name starts with the monotonic clock in nanoseconds, zero-padded to this width.
NAME_DIGITS = 20
# A message named this far after a listing began was named on another machine's clock.
OTHER_CLOCK_NS = 10 * 1_000_000_000
# How long a reader waits for a message file that another process is still writing.
WRITER_PATIENCE = 1.0


class Channel(filesystem.Channel):
    """kombu's filesystem channel with atomic writes and reads."""

    # The parent names the message ``payload``, its own base ``message``: keep the parent's.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put a message onto ``queue``: write it aside, then rename it into the queue."""
        data = json.dumps(payload, cls=JSONEncoder).encode("utf-8")
        name = f"{time.monotonic_ns():0{NAME_DIGITS}d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        writing = final + WRITING_SUFFIX
        try:
            with open(writing, "wb") as handle:
                handle.write(data)
            os.replace(writing, final)
        except OSError as exc:
            raise ChannelError(f"cannot add message {name!r} to {queue}") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """The oldest message of ``queue``.

        The folder is listed when this channel's list of the queue's messages has run out,
        not for every message (a listing of 3,000 messages took 8 ms, a message 0.2 ms): a
        message written since comes after those listed anyway, as its name sorts after theirs.
        """
        names = self._listed.setdefault(queue, deque())
        if not names:
            names.extend(self._list(queue))
        while names:
            message = self._take(names.popleft())
            if message is not None:
                return message
        raise Empty()

    def _list(self, queue: str) -> list[str]:
        """The names of ``queue``'s messages, oldest first.

        A listing of a folder that changes meanwhile may show a file added during it and miss
        an older one added just before it; so it keeps only the messages named before it
        began. Each of those was renamed into the folder after every earlier message of its
        writer, all there for the whole listing, so none is read ahead of its predecessors.
        (Names not of this module's form, from kombu's own writer, are all kept.)
        """
        began = time.monotonic_ns()
        wanted = f"{queue}.msg"
        return sorted(
            name
            for name in os.listdir(self.data_folder_in)
            if name.partition(".")[2] == wanted and not _named_since(name, began)
        )

    @cached_property
    def _listed(self) -> dict[str, deque[str]]:
        """Per queue, the names of its messages at the last listing, oldest first."""
        return {}

    def _take(self, name: str) -> Any:
        """The message in file ``name``, taken by renaming it into the processed folder (None
        when another reader took it first, or when it cannot be decoded: it is then set
        aside with an error, never handed to a task)."""
        taken = Path(self.processed_folder) / name
        try:
            os.replace(os.path.join(self.data_folder_in, name), taken)
        except FileNotFoundError:
            return None
        try:
            message = json.loads(_read_whole(taken), object_hook=object_hook)
        except (OSError, ValueError) as exc:
            aside = taken.with_name(name + UNREADABLE_SUFFIX)
            with contextlib.suppress(OSError):
                taken.replace(aside)
            log.error("set aside an unreadable broker message %s: %s", aside, exc)
            return None
        if not self.store_processed:
            taken.unlink()
        return message


def _named_since(name: str, instant: int) -> bool:
    """Whether a message of this module was named at or after ``instant`` (monotonic ns) on
    this machine. A stamp further ahead than any listing lasts comes from another machine's
    clock (a folder shared over the network): waiting for it could take days, so it counts
    as older, as does any name of another form."""
    stamp, underscore, _ = name.partition("_")
    if not underscore or len(stamp) != NAME_DIGITS or not stamp.isdigit():
        return False
    return instant <= int(stamp) < instant + OTHER_CLOCK_NS


def _read_whole(path: Path) -> bytes:
    """A message file's bytes once its writer is done with it.

    This module's writer renames a file into the queue only once it is complete. kombu's own
    (another codebase sending ``receipts.track`` into this folder) creates the file, then
    locks it and writes: wait for its lock, and for a file still empty to fill, at most
    ``WRITER_PATIENCE`` seconds.
    """
    deadline = time.monotonic() + WRITER_PATIENCE
    with path.open("rb") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                data = b""
            else:
                handle.seek(0)
                data = handle.read()
                fcntl.flock(handle, fcntl.LOCK_UN)
            if data or time.monotonic() >= deadline:
                return data
            time.sleep(0.005)


class Transport(filesystem.Transport):
    Channel = Channel
