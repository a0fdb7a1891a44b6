"""stdout and stderr that outlive their reader: a closed pipe or a terminal that went away
stops what is printed, never the run (the ledger and the exit code still tell the truth)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import TextIO, cast


class GuardedStream(io.TextIOBase):
    """A text stream whose first failed write (EPIPE, EIO) silences it for good."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.gone = False

    def __repr__(self) -> str:
        return f"<GuardedStream {self.stream!r} gone={self.gone}>"

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.stream.errors

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self.stream.write(text)
            except OSError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError:
                self._silence()

    def _silence(self) -> None:
        self.gone = True
        # What failed is still in the stream's buffer, and Python flushes it at exit: point
        # the descriptor at /dev/null so that this (and any other writer of it) succeeds.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()


def stream_gone(stream: object) -> bool:
    """Whether `stream` is a guarded stream whose reader went away."""
    return isinstance(stream, GuardedStream) and stream.gone


def guard_std_streams() -> None:
    """Guard sys.stdout and sys.stderr (once): every writer of them goes through the guard."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, cast(TextIO, GuardedStream(stream)))
