"""The ledger on an object store: ordered segment objects, merged by one reader, compacted."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

from ..errors import LedgerError

log = logging.getLogger(__name__)

# A segment is `<folder>/<seq>.jsonl`, one per group commit; a merged one covers a run of
# them, `<folder>/<first>-<last>.jsonl`. Sequence numbers continue across runs, so the
# names sort in the order their lines were written.
_NAME = re.compile(r"(\d{12})(?:-(\d{12}))?\.jsonl")
# Merge when this many pieces of one tier are in a row: a tier holds pieces of FANOUT**t
# segments or more, so a ledger of S segments stays under FANOUT x log(S) objects.
FANOUT = 8
_CHUNK = 1 << 20
# A reader lists, then reads: a compaction finishing between the two removes what was
# listed. It lists again (the merged object is there by then) this many times.
_RELISTS = 5


@dataclass(frozen=True, slots=True)
class Piece:
    """One ledger object: the segments it covers, by sequence number."""

    first: int
    last: int

    @property
    def tier(self) -> int:
        """Its size class: 0 for one segment, t for FANOUT**t segments or more."""
        count, tier = self.last - self.first + 1, 0
        while count >= FANOUT:
            count //= FANOUT
            tier += 1
        return tier

    @property
    def filename(self) -> str:
        """Its object's name in the ledger's folder."""
        if self.first == self.last:
            return f"{self.first:012d}.jsonl"
        return f"{self.first:012d}-{self.last:012d}.jsonl"


def parse_piece(name: str) -> Piece | None:
    """The piece a name stands for (None for a name that is not one)."""
    match = _NAME.fullmatch(name.rpartition("/")[2])
    if match is None:
        return None
    first = int(match[1])
    last = int(match[2]) if match[2] else first
    return Piece(first, last) if last >= first else None


def covering(pieces: Iterable[Piece]) -> tuple[list[Piece], list[Piece]]:
    """The pieces that hold the log in order, and those a merged piece covers (left by a
    compaction that stopped before removing them)."""
    chosen: list[Piece] = []
    covered: list[Piece] = []
    until = -1
    # A merged piece sorts before the first segment it covers: it is preferred.
    for piece in sorted(set(pieces), key=lambda p: (p.first, -p.last)):
        if piece.last <= until:
            covered.append(piece)
        elif piece.first > until:
            chosen.append(piece)
            until = piece.last
        else:
            # Never written by one writer at a time: its lines are not read, and said so.
            log.error("ledger segment %s overlaps another in part: not read", piece.filename)
    return chosen, covered


def merge_plan(tiers: Sequence[int]) -> int | None:
    """Where the first FANOUT pieces in a row of one tier start (they are merged), or None."""
    start = 0
    for at in range(1, len(tiers) + 1):
        if at == len(tiers) or tiers[at] != tiers[start]:
            if at - start >= FANOUT:
                return start
            start = at
    return None


def _free() -> None:
    """No lock to keep: every write may go ahead."""


class ObjectFiles(Protocol):
    """What the segment log needs from an fsspec filesystem."""

    def find(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool: ...
    def open(self, path: str, mode: str = "rb") -> Any: ...
    def pipe_file(self, path: str, value: bytes) -> None: ...
    def put_file(self, lpath: str, rpath: str) -> None: ...
    def rm(self, path: list[str]) -> None: ...


def _copy_whole_lines(source: IO[bytes], target: IO[bytes]) -> int:
    """Copy `source` to `target` up to its last newline (a torn tail is dropped); bytes copied."""
    copied = 0
    held = b""
    while chunk := source.read(_CHUNK):
        data = held + chunk
        cut = data.rfind(b"\n") + 1
        target.write(data[:cut])
        copied += cut
        held = data[cut:]
    if held:
        log.warning("dropped a torn line at the end of a ledger segment (%d bytes)", len(held))
    return copied


def list_pieces(fs: ObjectFiles, base: str) -> list[Piece]:
    """Every piece under `base`, in no particular order."""
    try:
        found = fs.find(base)
    except FileNotFoundError:
        return []
    return [p for p in map(parse_piece, found) if p is not None]


def merge_into(
    fs: ObjectFiles, base: str, target: IO[bytes]
) -> tuple[list[tuple[Piece, int, int]], list[Piece], int]:
    """Write the log's whole lines in order to `target`: each chosen piece with its byte
    range there, the covered pieces, and the highest sequence number seen."""
    for _ in range(_RELISTS):
        pieces = list_pieces(fs, base)
        chosen, covered = covering(pieces)
        target.seek(0)
        target.truncate()
        placed: list[tuple[Piece, int, int]] = []
        start = 0
        try:
            for piece in chosen:
                with fs.open(f"{base}/{piece.filename}", "rb") as source:
                    end = start + _copy_whole_lines(source, target)
                placed.append((piece, start, end))
                start = end
        except FileNotFoundError:
            continue  # merged and removed meanwhile: list again
        last = max((p.last for p in pieces), default=0)
        return placed, covered, last
    raise OSError(f"the ledger under {base} kept changing while it was read")


class SegmentLog:
    """The ledger as segment objects, with a local copy of all of it that readers use."""

    # Each append puts one segment (whole, as objects appear) and adds its lines to the local
    # copy, so the ledger index reads lines back by offset as it does from a local ledger.

    # Blocking network calls: the ledger writer calls `append` in a worker thread.
    on_loop = False

    def __init__(
        self, fs: ObjectFiles, base: str, copy: str, *, guard: Callable[[], None] = _free
    ) -> None:
        self.fs = fs
        self.base = base
        # Raises once this run lost the output's lock: then it writes no segment.
        self._may_write = guard
        self.path = copy
        self._copy = open(copy, "w+b")  # noqa: SIM115 - closed by close()
        try:
            placed, covered, last = merge_into(fs, base, self._copy)
            self._copy.flush()
        except BaseException:
            self._copy.close()
            raise
        self._pieces = placed
        self._next = last + 1
        self.compactions = 0
        # Compaction runs in a thread of its own, so an append never waits for a large merge;
        # `_guard` keeps the list of pieces whole between the two threads.
        self._guard = threading.Lock()
        self._compactor: threading.Thread | None = None
        # Covered pieces are removed only by the run that holds the lock.
        self._remove(covered)
        self._start_compaction()

    def __repr__(self) -> str:
        return f"<SegmentLog {self.base!r} pieces={len(self._pieces)} next={self._next}>"

    def append(self, data: bytes, sync: bool) -> int | None:
        """Put `data` as the next segment, then add it to the local copy; the copy's size."""
        piece = Piece(self._next, self._next)
        self._may_write()
        name = self._object(piece)
        if self.fs.exists(name):
            # Another run numbered a segment from the same listing (two runs took the lock
            # at once): writing would replace its lines. Stop instead.
            raise LedgerError(f"another run wrote the ledger segment {piece.filename}: stopping")
        self.fs.pipe_file(name, data)
        self._next += 1
        start = self._copy.seek(0, os.SEEK_END)
        self._copy.write(data)
        self._copy.flush()
        end = start + len(data)
        with self._guard:
            self._pieces.append((piece, start, end))
        self._start_compaction()
        return end

    def close(self, sync: bool) -> None:
        """Let a compaction under way finish, catch up on merges due, close the local copy."""
        # Waited for: a merge finishing after the lock is released could race the next run's.
        try:
            if self._compactor is not None:
                self._compactor.join()
            self._compact()
        finally:
            self._copy.close()

    def _object(self, piece: Piece) -> str:
        return f"{self.base}/{piece.filename}"

    def _plan(self) -> int | None:
        with self._guard:
            return merge_plan([p.tier for p, _, _ in self._pieces])

    def _start_compaction(self) -> None:
        """Start merging in the compaction thread if a merge is due and none is under way."""
        if self._compactor is not None and self._compactor.is_alive():
            return
        if self._plan() is None:
            return
        self._compactor = threading.Thread(
            target=self._compact, name="cometbatch-compaction", daemon=True
        )
        self._compactor.start()

    def _compact(self) -> None:
        """Merge FANOUT pieces of one tier in a row into one object, while any are due."""
        # The merged object is complete before the pieces it covers are removed, and a reader
        # prefers it, so a crash at any point loses no line and repeats none. Appends only add
        # pieces at the end, so the ones merged are still where they were found.
        try:
            with open(self.path, "rb") as source:
                while (at := self._plan()) is not None:
                    with self._guard:
                        parts = self._pieces[at : at + FANOUT]
                    merged = Piece(parts[0][0].first, parts[-1][0].last)
                    start, end = parts[0][1], parts[-1][2]
                    self._put_range(source, merged, start, end)
                    with self._guard:
                        self._pieces[at : at + FANOUT] = [(merged, start, end)]
                        self.compactions += 1
                    self._remove([p for p, _, _ in parts])
        except Exception as exc:
            # Only the object count suffers; the segments still hold every line.
            log.warning("could not compact the ledger under %s: %s", self.base, exc)

    def _put_range(self, source: IO[bytes], piece: Piece, start: int, end: int) -> None:
        """Upload bytes [start, end) of the local copy as `piece`, through a temporary file."""
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(self.path)) as part:
            source.seek(start)
            left = end - start
            while left > 0:
                chunk = source.read(min(_CHUNK, left))
                if not chunk:
                    break
                part.write(chunk)
                left -= len(chunk)
            part.flush()
            self._may_write()
            self.fs.put_file(part.name, self._object(piece))

    def _remove(self, pieces: Sequence[Piece]) -> None:
        if not pieces:
            return
        try:
            self._may_write()
            self.fs.rm([self._object(p) for p in pieces])
        except (OSError, LedgerError) as exc:
            log.warning("could not remove merged ledger segments under %s: %s", self.base, exc)


_TEMP: list[str] = []


def temp_folder() -> str:
    """A folder for local copies of remote ledgers, removed when the process exits."""
    if not _TEMP:
        import atexit

        folder = tempfile.mkdtemp(prefix="cometbatch-ledger-")
        atexit.register(shutil.rmtree, folder, True)
        _TEMP.append(folder)
    return _TEMP[0]


def copy_log(fs: ObjectFiles, base: str) -> str | None:
    """A local file holding the log's whole lines in order (None when it has no piece)."""
    handle, path = tempfile.mkstemp(suffix=".jsonl", dir=temp_folder())
    with open(handle, "w+b") as target:
        placed, _, _ = merge_into(fs, base, target)
    if not placed:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    return path
