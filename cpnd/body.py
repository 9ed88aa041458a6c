"""The user's request body: read once, kept (up to a bound) for a retry on another instance."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import h11

from .errors import HttpError
from .h1 import H11Stream, next_event_within
from .plane import HttpLimits

MAX_REPLAY_BYTES = 1024 * 1024


class BodySource:
    """The client's request body, read once, kept (up to a bound) for a retry."""

    def __init__(self, client: H11Stream, limits: HttpLimits) -> None:
        self.client = client
        self.limits = limits
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.replayable = True
        self.consumed = False
        self._pending: Any = None  # an event take_buffered read but left for iterate() (too big to keep)

    async def iterate(self) -> AsyncIterator[bytes]:
        if self.consumed and not self.replayable:
            raise RuntimeError("body already streamed and too large to replay")
        self.consumed = True
        for chunk in list(self.chunks):
            yield chunk
        if self._pending is not None:
            event, self._pending = self._pending, None
            chunk = self._take(event)
            if chunk is not None:
                yield chunk
        while not self.done:
            chunk = self._take(await next_event_within(self.client, self.limits.body_idle_timeout_s))
            if chunk is not None:
                yield chunk

    def take_buffered(self) -> bool:
        """Take in what of the body has already arrived, without waiting; True if that is all of it.

        A small request usually arrives whole with its head: it then goes upstream in one
        write, with no task to stream it.
        """
        while not self.done and self._pending is None:
            event = self.client.next_event_nowait()
            if event is None:
                return False
            if self.replayable and isinstance(event, h11.Data) and self.size + len(event.data) > MAX_REPLAY_BYTES:
                # Taking it would drop the replay copy of what nobody has sent yet: iterate() takes it.
                self._pending = event
                return False
            self._take(event)
        return self.done

    def whole(self) -> bytes:
        """The body, once ``take_buffered`` said it is all here."""
        return b"".join(self.chunks)

    def _take(self, event: Any) -> bytes | None:
        if isinstance(event, h11.Data):
            self.size += len(event.data)
            if self.size > self.limits.max_body_bytes:
                raise HttpError(413, "body_too_large", f"request body exceeds {self.limits.max_body_bytes} bytes",
                                close=True)
            if self.replayable:
                self.chunks.append(event.data)
                if self.size > MAX_REPLAY_BYTES:
                    self.replayable = False
                    self.chunks = []
            return event.data
        if isinstance(event, h11.EndOfMessage):
            self.done = True
            return None
        raise HttpError(400, "bad_request", f"unexpected {type(event).__name__} in request body")
