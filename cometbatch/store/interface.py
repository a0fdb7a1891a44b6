"""The storage seam: the few operations the sink, the ledger and verify need from OUT."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

__all__ = ["AppendLog", "Entry", "RunLock", "Store"]

# Names are relative to the store's root with "/" separators ("images/<job>/0.png",
# "ledger.jsonl"), whatever the backend: a local folder or an object store's prefix.


@dataclass(frozen=True, slots=True)
class Entry:
    """What `Store.stat` tells of a name: its size, and whether it is a plain file (object)."""

    size: int
    is_file: bool


class AppendLog(Protocol):
    """An open append-only log (the ledger): whole lines in, in order; one writer at a time."""

    # A local file holding the whole log as appended so far (the log itself on a disk; a
    # copy beside segment objects on an object store): the ledger's one reader reads it.
    path: str
    # Whether `append(data, False)` is quick enough for the event loop (a local file's
    # buffered write); False when every append is a network call.
    on_loop: bool

    def append(self, data: bytes, sync: bool) -> int | None:
        """Add `data` (whole lines) at the end, durable when `sync`; the new size if known."""
        ...

    def close(self, sync: bool) -> None:
        """Make what was appended durable (when `sync`) and let go of the log. Blocking."""
        ...


class RunLock(Protocol):
    """One run per output at a time (a file lock here; a leased lock object on a store)."""

    def acquire(self) -> None:
        """Take the lock, or raise LedgerError naming the holder (OSError if it cannot tell)."""
        ...

    def release(self) -> None:
        """Give it up (a no-op when not held)."""
        ...


class Store(Protocol):
    """Where one output lives: objects appear whole or not at all, on any backend."""

    # So an image that a ledger line names is complete there before that line is appended.
    # Blocking methods are called from worker threads; only `put` is a coroutine: it is on
    # every image's path, and each backend knows best how to wait for its writes.

    @property
    def local_folder(self) -> str | None:
        """The local folder OUT is, or None for a store reached over the network (where a
        look at each file costs a request, and files are not on this machine's disk)."""
        ...

    @property
    def root(self) -> str:
        """Where the output is, as a person would name it in a message (a path or a URL)."""
        ...

    async def put(self, name: str, data: bytes, *, sync: bool = False) -> None:
        """Write `data` as the whole object `name`, replacing any there; durable when `sync`."""
        # All or nothing, also when the caller is cancelled: a cancelled put waits for a write
        # under way and leaves no object of it (an earlier object at `name` stays as it was if
        # the new one never took its place).
        ...

    async def put_file(self, name: str, source: str, *, sync: bool = False) -> None:
        """Store the local file `source` as the whole object `name`, then remove `source`."""
        # Moved where it can be, uploaded in parts elsewhere; the same promises as `put`.
        # For images too large to hold in memory (streamed downloads): `source` is a finished
        # local file that the caller hands over.
        ...

    def stat(self, name: str) -> Entry:
        """Size and kind of `name`; FileNotFoundError when there is none."""
        ...

    def open_read(self, name: str) -> BinaryIO:
        """`name` opened for reading in parts (a shard too large to hold); the caller closes it.
        FileNotFoundError when there is none."""
        ...

    def names(self, folder: str) -> list[str]:
        """The names of the objects under `folder` (at any depth), sorted; none if it is missing."""
        ...

    def read(self, name: str) -> bytes:
        """The whole content of `name`; FileNotFoundError when there is none."""
        ...

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        """Move each (source, target), replacing the target; refuse all if any cannot move."""
        # Names that cannot take part: a local store's symbolic links.
        ...

    def remove(self, name: str) -> None:
        """Delete `name`; FileNotFoundError when there is none."""
        ...

    def escapes(self, name: str, folder: str) -> bool:
        """Whether `name`, inside `folder` by its name, reaches outside it (a symbolic link)."""
        ...

    def check_writable(self, folder: str) -> None:
        """Raise OSError unless a new object can be written under `folder`."""
        ...

    def clean(self, folder: str) -> int:
        """Remove what writes cut short by a crash left under `folder`; how many."""
        # Temporary files on a disk; run before writing, by the one run that holds the lock.
        ...

    def open_log(self, name: str, *, sync: bool) -> AppendLog:
        """Open the append-only log `name`, created when missing (durably when `sync`)."""
        ...

    def log_copy(self, name: str) -> str | None:
        """A local file holding the whole log `name` (a merged copy on an object store)."""
        # None when there is no such log. Blocking.
        ...

    def has_log(self, name: str) -> bool:
        """Whether the log `name` is there, without reading it. Blocking."""
        ...

    def lock(self) -> RunLock:
        """The lock that keeps a second run out of this output."""
        ...

    def within(self, folder: str) -> Store:
        """The output rooted at `folder` under this one, on the same backend (a cluster's shard)."""
        ...
