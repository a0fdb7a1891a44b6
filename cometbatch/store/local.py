"""The local store: OUT is a folder; each file is written under a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..paths import fsync_folder, link_error, refuse_link, unlinked
from ._writers import Trip, in_writer
from .interface import AppendLog, Entry
from .lock import FolderLock

__all__ = ["LocalLog", "LocalStore"]

TEMP_SUFFIX = ".tmp"
# Folders a store remembers having seen, so that their files skip the mkdir.
_KNOWN_FOLDERS = 1024
# Files smaller than `loop_bytes` are written on the event loop itself when no fsync is
# asked for. Off by default: in whole runs the writer threads were faster, even for small
# files (each system call on the loop's thread gives up the GIL and waits to win it back
# from the ledger's and the decoders' threads); bench/aiofiles_vs_sink.py measures both.
LOOP_BYTES = 0


class LocalStore:
    """A local folder as a store; no name below it is reached through a symbolic link."""

    def __init__(self, root: str | os.PathLike[str], *, loop_bytes: int = LOOP_BYTES) -> None:
        self.path = Path(root)
        self.loop_bytes = loop_bytes
        self._root = os.fspath(self.path)
        # Folders this store made or wrote to lately (insertion-ordered, bounded).
        self._folders: dict[str, None] = {}
        # Temporary names: unique per store and write, with no system call to draw them.
        self._temp_prefix = secrets.token_hex(4)
        self._serial = itertools.count()
        self._in_flight = 0

    def __repr__(self) -> str:
        return f"<LocalStore {self._root!r} in_flight={self._in_flight}>"

    @property
    def root(self) -> str:
        return self._root

    @property
    def local_folder(self) -> str:
        return self._root

    def within(self, folder: str) -> LocalStore:
        return LocalStore(self._local(folder), loop_bytes=self.loop_bytes)

    def _local(self, name: str) -> str:
        return os.path.join(self._root, *name.split("/"))

    async def put(self, name: str, data: bytes, *, sync: bool = False) -> None:
        """Write `data` whole to `name` (see Store.put), in a writer thread."""
        # On the loop instead when smaller than `loop_bytes` and not synced (off by default).
        final = self._local(name)
        folder = os.path.dirname(final)
        trip = Trip(folder in self._folders)
        self._in_flight += 1
        try:
            if not sync and len(data) < self.loop_bytes:
                # No await between the first byte and the rename: nothing can cancel it midway.
                self._write(final, data, sync, trip)
            else:
                await in_writer(self._write, (final, data, sync, trip), trip, len(data))
        finally:
            self._in_flight -= 1
        self._known(folder)

    def _known(self, folder: str) -> None:
        """Remember that `folder` is there: its next files skip the mkdir."""
        folders = self._folders
        if folder not in folders:
            folders[folder] = None
            if len(folders) > _KNOWN_FOLDERS:
                del folders[next(iter(folders))]

    def _write(self, final: str, data: bytes, sync: bool, trip: Trip) -> None:
        """Write to a temporary name in the final folder, then rename it into place."""
        # An OSError keeps its type and errno; its reason names the folder. Every system call
        # here gives up the GIL and must win it back, which takes up to a switch interval when
        # other threads are busy: the write makes as few as it can (no buffering, no
        # existence checks; a folder is made once, by trying).
        folder, base = os.path.split(final)
        # Same folder as the final name: os.replace is atomic only within one filesystem.
        serial = next(self._serial)
        stem = base.partition(".")[0]
        temp = os.path.join(folder, f".{stem}.{self._temp_prefix}{serial:x}{TEMP_SUFFIX}")
        made = False
        try:
            if not trip.folder_known:
                made = _make_folder(folder)
            try:
                handle = open(temp, "xb", buffering=0)  # noqa: SIM115 - closed before the rename
            except FileNotFoundError:
                if made:
                    raise
                # The folder went away since it was seen: make it again.
                made = _make_folder(folder)
                handle = open(temp, "xb", buffering=0)  # noqa: SIM115
            try:
                with handle:
                    _write_all(handle, data, temp)
                    if sync:
                        os.fsync(handle.fileno())
                trip.place(temp, final)
                if sync:
                    # The rename (and a new folder) must outlive a power loss too.
                    fsync_folder(folder)
                    if made:
                        fsync_folder(os.path.dirname(folder))
            except BaseException:
                # Also when called off: no file of a failed write may outlive the attempt.
                for leftover in (temp, trip.placed):
                    if leftover is not None:
                        with contextlib.suppress(OSError):
                            os.unlink(leftover)
                trip.placed = None
                raise
        except OSError as exc:
            if exc.errno is None or exc.strerror is None:
                raise
            # Callers show only the reason: put the folder in it. OSError(errno, ...) builds
            # the matching subclass again (PermissionError for EACCES, ...).
            raise OSError(exc.errno, f"{exc.strerror} ({folder})", exc.filename) from exc

    async def put_file(self, name: str, source: str, *, sync: bool = False) -> None:
        """Move the finished file `source` to `name` (see Store.put_file), in a writer thread."""
        final = self._local(name)
        folder = os.path.dirname(final)
        trip = Trip(folder in self._folders)
        await in_writer(self._place_file, (source, final, sync, trip), trip, 0)
        self._known(folder)

    def _place_file(self, source: str, final: str, sync: bool, trip: Trip) -> None:
        """Rename `source` into place; across filesystems, write a copy as `put` would."""
        folder = os.path.dirname(final)
        if not trip.folder_known:
            _make_folder(folder)
        if sync:
            with open(source, "rb") as handle:
                os.fsync(handle.fileno())
        try:
            trip.place(source, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with open(source, "rb") as handle:
                self._write(final, handle.read(), sync, trip)
            os.unlink(source)
            return
        if sync:
            fsync_folder(folder)

    def stat(self, name: str) -> Entry:
        status = os.stat(self._local(name))
        return Entry(status.st_size, stat.S_ISREG(status.st_mode))

    def read(self, name: str) -> bytes:
        with open(self._local(name), "rb") as handle:
            return handle.read()

    def open_read(self, name: str) -> BinaryIO:
        return open(self._local(name), "rb")

    def names(self, folder: str) -> list[str]:
        """Every file below `folder` (temporary files of unfinished writes left out), sorted."""
        base = self._local(folder)
        found: list[str] = []
        for top, folders, files in os.walk(base):
            folders.sort()
            rel = os.path.relpath(top, self._root).replace(os.sep, "/")
            found.extend(
                f"{rel}/{f}" if rel != "." else f for f in files if not f.endswith(TEMP_SUFFIX)
            )
        return sorted(found)

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        """Move files (see Store.move); OSError (ELOOP), before moving any, for a name
        reached through a symbolic link."""
        for source, target in moves:
            for name in (source, target):
                if not unlinked(self._root, name):
                    raise link_error(self._local(name))
        for source, target in moves:
            destination = self._local(target)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.replace(self._local(source), destination)

    def remove(self, name: str) -> None:
        """Delete the file `name`, and its folder if that is left empty."""
        # As on an object store, where a folder is only a prefix of names.
        path = self._local(name)
        os.unlink(path)
        folder = os.path.dirname(path)
        if folder != self._root:
            # A later put there finds it gone and makes it again (see _write).
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def escapes(self, name: str, folder: str) -> bool:
        real = Path(os.path.realpath(self._local(name)))
        return not real.is_relative_to(os.path.realpath(self._local(folder)))

    def check_writable(self, folder: str) -> None:
        """Make `folder` and write and remove a probe file in it; OSError if that fails."""
        where = Path(self._local(folder))
        where.mkdir(parents=True, exist_ok=True)
        refuse_link(where)
        handle, probe = tempfile.mkstemp(prefix=".probe.", suffix=TEMP_SUFFIX, dir=where)
        os.close(handle)
        os.unlink(probe)

    def clean(self, folder: str) -> int:
        """Delete the temporary files in the subfolders of `folder`; OSError (ELOOP) for a
        subfolder that is a symbolic link, before anything is removed there."""
        try:
            folders = os.scandir(self._local(folder))
        except FileNotFoundError:
            return 0
        removed = 0
        with folders:
            for entry in folders:
                if entry.is_dir(follow_symlinks=False):
                    removed += remove_temp_files(entry.path)
                elif entry.is_symlink():
                    raise link_error(entry.path)
        return removed

    def open_log(self, name: str, *, sync: bool) -> AppendLog:
        """Open `name` for appending; with `sync`, make a new file's name durable too."""
        path = self._local(name)
        # Unbuffered: a write that fails leaves no bytes in a buffer for close() to add later.
        handle = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by LocalLog.close
        if sync:
            try:
                fsync_folder(os.path.dirname(path))
            except BaseException:
                handle.close()
                raise
        return LocalLog(handle)

    def log_copy(self, name: str) -> str | None:
        path = self._local(name)
        return path if os.path.exists(path) else None

    def has_log(self, name: str) -> bool:
        return os.path.isfile(self._local(name))

    def lock(self) -> FolderLock:
        return FolderLock(self.path)


class LocalLog:
    """An append-only file, written unbuffered (see AppendLog)."""

    on_loop = True

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.path = str(handle.name)

    def __repr__(self) -> str:
        return f"<LocalLog {self.handle.name!r}>"

    def append(self, data: bytes, sync: bool) -> int | None:
        _write_all(self.handle, data, str(self.handle.name))
        self._flush(sync)
        try:
            return self.handle.tell()
        except (OSError, ValueError, AttributeError):
            return None

    def close(self, sync: bool) -> None:
        try:
            self._flush(sync)
        finally:
            self.handle.close()

    def _flush(self, sync: bool) -> None:
        """Flush what a (wrapped) file may buffer, and fsync it if asked."""
        self.handle.flush()
        if sync:
            os.fsync(self.handle.fileno())


def _write_all(handle: BinaryIO, data: bytes, name: str) -> None:
    """Write all of `data` to an unbuffered file, which may take less than it is given at once
    (a signal, a nearly full disk)."""
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:
            raise OSError(errno.EIO, os.strerror(errno.EIO), name)
        view = view[written:]


def _make_folder(folder: str) -> bool:
    """Make a file's folder (and its parents if need be); False if it was there."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        # Met once per folder and store: a link here would put the files out of the store.
        refuse_link(folder)
        return False
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    return True


def remove_temp_files(folder: str, suffix: str = TEMP_SUFFIX) -> int:
    """Delete the files ending in `suffix` (unfinished writes) directly inside `folder`; how
    many."""
    with os.scandir(folder) as entries:
        stale = [
            e.path for e in entries if e.name.endswith(suffix) and e.is_file(follow_symlinks=False)
        ]
    removed = 0
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed
