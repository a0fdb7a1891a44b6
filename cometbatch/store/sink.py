"""The image sink: checks, hashes and atomically writes image bytes under OUT/images/."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import errno
import functools
import hashlib
import itertools
import os
import queue
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pybase64

from cometbatch.errors import ImageDataError, OutputError
from cometbatch.paths import fsync_folder, image_relpath, link_error, refuse_link
from cometbatch.store.imagecheck import check_image, detect_format

__all__ = ["ImageRecord", "Sink", "decode_b64", "detect_format"]

_TEMP_SUFFIX = ".tmp"
# Characters of base64 decoded at a time (a multiple of 4): about a millisecond of work.
_B64_SLICE = 256 * 1024
_T = TypeVar("_T")
# Job folders a sink remembers having seen, so their images skip the mkdir.
_KNOWN_FOLDERS = 1024


def _a2b_strict(body: str) -> bytes:
    """Strict base64 decoding, in slices when large.

    binascii holds the GIL while it decodes (about 5 ms per MB): slices of _B64_SLICE
    characters let the event loop's thread in between, so a large image decoded in a worker
    thread does not stall the loop for the whole of it.
    """
    if len(body) < 2 * _B64_SLICE:
        return binascii.a2b_base64(body, strict_mode=True)
    # Whole slices first; the last one (one to two slices long) holds the end of the data,
    # where strict mode's rules about padding apply, exactly as in a single call.
    last = (len(body) // _B64_SLICE - 1) * _B64_SLICE
    if body.find("=", 0, last) >= 0:
        raise binascii.Error("padding before the end of the data")
    out = bytearray()
    for start in range(0, last, _B64_SLICE):
        out += binascii.a2b_base64(body[start : start + _B64_SLICE], strict_mode=True)
    out += binascii.a2b_base64(body[last:], strict_mode=True)
    return bytes(out)


def decode_b64(text: str, *, simd: bool = False) -> bytes:
    """Decode strict base64 image data, allowing a `data:...;base64,` prefix and line breaks.

    `simd` (for worker threads): try pybase64 first. It lets go of the GIL on every call, which
    on the event loop's thread can cost a wait of up to the switch interval, so the loop
    decodes its small images with binascii alone; the accepted data is the same either way.
    """
    body = text.strip()
    if body[:5].lower() == "data:":
        header, comma, rest = body.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageDataError("invalid base64 image data", retryable=False)
        body = rest
    if simd:
        try:
            # pybase64 decodes a 2 MB image in about 0.3 ms where binascii takes 10+: it never
            # accepts what binascii's strict mode refuses, but refuses a few odd paddings that
            # strict mode accepts, which the exact path below then settles.
            data = pybase64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if data:
            return data
    try:
        # Strict mode rejects whitespace; the usual answer has none, so it is decoded in one
        # pass without first copying a multi-megabyte string.
        data = _a2b_strict(body)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        # Wrapped base64 (MIME style) is still valid data: decode it without the breaks.
        try:
            data = _a2b_strict("".join(body.split()))
        except (binascii.Error, ValueError) as exc:
            raise ImageDataError("invalid base64 image data", retryable=False) from exc
    if not data:
        raise ImageDataError("invalid base64 image data", retryable=False)
    return data


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image written to disk, as the ledger's `images` list records it."""

    index: int
    path: str
    format: str
    bytes: int
    sha256: str
    revised_prompt: str | None = None
    # The (redacted) link the image was downloaded from; None for an image that came inline.
    # While the link works, a run downloads a lost image again instead of generating it.
    url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ledger's image object (the fields, in order; `url` only when there is one)."""
        # Spelled out: dataclasses.asdict deep-copies generically, a cost paid per image.
        image = {
            "index": self.index,
            "path": self.path,
            "format": self.format,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "revised_prompt": self.revised_prompt,
        }
        if self.url is not None:
            image["url"] = self.url
        return image


def _describe(job_id: str, index: int, data: bytes) -> tuple[str, str, str]:
    """The image's format, its path relative to OUT and its hex sha256; raises ImageDataError
    for bytes that are not a whole image (checked, not sniffed: see imagecheck)."""
    fmt = check_image(data)
    return fmt, image_relpath(job_id, index, fmt), hashlib.sha256(data).hexdigest()


class _Trip:
    """One image's trip through a worker thread, which its caller may call off meanwhile."""

    __slots__ = ("called_off", "finished", "folder_known", "placed", "waiter")

    def __init__(self, folder_known: bool) -> None:
        # Whether the job's folder was there a moment ago (then it is not made again).
        self.folder_known = folder_known
        self.called_off = False
        # Set on the event loop once the thread is done with it; a cancelled caller waits
        # for that on `waiter`.
        self.finished = False
        self.waiter: asyncio.Future[None] | None = None
        # The final path, once the file was renamed there.
        self.placed: str | None = None

    def report(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """Hand the thread's outcome to `future` (on the event loop), unless it was cancelled."""
        self.finished = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if future.cancelled():
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)

    def place(self, temp: str, final: str) -> None:
        """Rename `temp` onto `final` unless the write was called off (in the worker thread)."""
        if self.called_off:
            raise _CalledOff
        # Replacing is deliberate: a regenerated request overwrites its earlier image.
        os.replace(temp, final)
        self.placed = final


class _CalledOff(Exception):
    """The write was called off before its rename (its caller was cancelled)."""


# A write handed to the writer threads: the loop to report to, what to call, and the
# callback (run on that loop) that takes its result or its exception.
_Report = Callable[[Any, "BaseException | None"], None]
_Work = tuple[asyncio.AbstractEventLoop, Callable[..., Any], tuple[Any, ...], _Report]


class _Writers:
    """A few threads that write images for every sink in the process.

    Cheaper per write than a thread-pool future, and each thread wakes the event loop once
    per batch of finished writes rather than once per write (each wake-up is a system call
    on the loop's thread, which then has to win the GIL back). Threads start on demand and
    leave after a few idle seconds; they are daemons, so an idle one never holds up exit
    (every write is awaited by its request, and an interrupted one leaves only a temp file).
    """

    def __init__(self, size: int, idle: float) -> None:
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._size = size
        self._idle_timeout = idle
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def __repr__(self) -> str:
        return f"<_Writers threads={self._threads}/{self._size} idle={self._idle}>"

    def forget_threads(self) -> None:
        """In a forked child: the parent's threads (and its queued writes) did not come along."""
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = 0

    def submit(self, func: Callable[..., Any], args: tuple[Any, ...], report: _Report) -> None:
        """Run `func(*args)` in a writer thread, then `report(result, exc)` on this loop."""
        self._queue.put((asyncio.get_running_loop(), func, args, report))
        with self._lock:
            if self._idle == 0 and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._serve, name="cometbatch-writer", daemon=True).start()

    def _serve(self) -> None:
        left = False
        try:
            while (batch := self._take()) is not None:
                self._run(batch)
            left = True
        finally:
            if not left:
                # Leaving on an unexpected error: make room for a new thread.
                with self._lock:
                    self._threads -= 1

    def _take(self) -> list[_Work] | None:
        """The next writes (up to _BATCH at once); None when idle long enough to leave."""
        work = self._queue
        while True:
            with self._lock:
                self._idle += 1
            try:
                first = work.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    # Checked under the lock that submit() takes after queueing: a write
                    # queued after this check finds no idle thread and starts one.
                    if work.empty():
                        self._threads -= 1
                        return None
                continue
            with self._lock:
                self._idle -= 1
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < _BATCH:
                    batch.append(work.get_nowait())
            return batch

    def _run(self, batch: list[_Work]) -> None:
        """Do the writes of `batch`, then wake each event loop once with their outcomes."""
        done: dict[asyncio.AbstractEventLoop, list[tuple[_Report, Any, Any]]] = {}
        for loop, func, args, report in batch:
            try:
                outcome: tuple[_Report, Any, Any] = (report, func(*args), None)
            except BaseException as exc:
                outcome = (report, None, exc)
            done.setdefault(loop, []).append(outcome)
        for loop, outcomes in done.items():
            # A loop already closed has nobody left waiting.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_report_all, outcomes)


def _report_all(outcomes: list[tuple[_Report, Any, Any]]) -> None:
    """Hand finished writes their outcomes (on the event loop)."""
    for report, result, exc in outcomes:
        report(result, exc)


# Writes at most one thread takes at a time (so the others get some of a burst).
_BATCH = 8
_WRITERS = _Writers(size=4, idle=5.0)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WRITERS.forget_threads)


class Sink:
    """Writes images atomically under OUT/images/ so a file either is complete or is absent.

    Each image costs one trip to a writer thread: temp file, write, (fsync,) rename, and the
    job's folder made by its first image. Images (and base64) of `offload_bytes` or more are
    also decoded (with SIMD) and hashed on that trip, so large payloads never stall the loop.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        offload_bytes: int = 64 * 1024,
        fsync: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.offload_bytes = offload_bytes
        self.fsync = fsync
        self.written = 0
        self.written_bytes = 0
        self._in_flight = 0
        # Jobs whose folder this sink made or wrote to lately (insertion-ordered, bounded).
        self._folders: dict[str, None] = {}
        # Temporary names: unique per sink and write, with no system call to draw them.
        self._temp_prefix = secrets.token_hex(4)
        self._serial = itertools.count()

    def __repr__(self) -> str:
        return (
            f"<Sink out_dir={str(self.out_dir)!r} written={self.written} "
            f"bytes={self.written_bytes} in_flight={self._in_flight}>"
        )

    async def write(
        self, job_id: str, index: int, data: bytes, *, revised_prompt: str | None = None
    ) -> ImageRecord:
        """Check, hash and atomically write one image; return what the ledger records."""
        if len(data) >= self.offload_bytes:
            record = await self._in_thread(job_id, self._store, job_id, index, data, revised_prompt)
        else:
            # Small images are hashed here: less work for the writer threads means shorter
            # waits for the GIL whenever the event loop's thread lets go of it.
            fmt, relpath, digest = _describe(job_id, index, data)
            await self._in_thread(job_id, self._write_atomic, relpath, index, data)
            record = ImageRecord(index, relpath, fmt, len(data), digest, revised_prompt)
        self.written += 1
        self.written_bytes += record.bytes
        return record

    async def decode_and_write(
        self, job_id: str, index: int, b64: str, *, revised_prompt: str | None = None
    ) -> ImageRecord:
        """Decode a base64 image (in the writing thread when large) and write it."""
        if len(b64) < self.offload_bytes:
            data = decode_b64(b64)
            return await self.write(job_id, index, data, revised_prompt=revised_prompt)
        # Decoded, hashed and written in one trip to a worker thread.
        record = await self._in_thread(
            job_id, self._decode_and_store, job_id, index, b64, revised_prompt
        )
        self.written += 1
        self.written_bytes += record.bytes
        return record

    def _decode_and_store(
        self, job_id: str, index: int, b64: str, revised_prompt: str | None, trip: _Trip
    ) -> ImageRecord:
        """Decode, check, hash and write a large image (in a worker thread)."""
        return self._store(job_id, index, decode_b64(b64, simd=True), revised_prompt, trip)

    def _store(
        self,
        job_id: str,
        index: int,
        data: bytes,
        revised_prompt: str | None,
        trip: _Trip,
    ) -> ImageRecord:
        """Check, hash and write a large image (in a worker thread)."""
        fmt, relpath, digest = _describe(job_id, index, data)
        self._write_atomic(relpath, index, data, trip)
        return ImageRecord(index, relpath, fmt, len(data), digest, revised_prompt)

    async def _in_thread(self, job_id: str, func: Callable[..., _T], /, *args: Any) -> _T:
        """Run `func(*args, trip)` in a worker thread for an image of `job_id`; a cancelled
        call leaves no file.

        A thread cannot be interrupted: a cancelled call tells it to drop its temporary file
        instead of renaming it, waits for it, and removes the file if it was renamed anyway,
        so no file of the write is left once the cancellation is through.
        """
        trip = _Trip(job_id in self._folders)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._in_flight += 1
        try:
            _WRITERS.submit(func, (*args, trip), functools.partial(trip.report, future))
            try:
                # Awaited directly, not through asyncio.shield: a shield costs the caller an
                # extra turn of the event loop on every write.
                result = await future
            except asyncio.CancelledError:
                trip.called_off = True
                if not trip.finished:
                    trip.waiter = loop.create_future()
                    await _wait_out(trip.waiter)
                if trip.placed is not None:
                    # Complete, but its request will not be recorded: it must not stay behind.
                    with contextlib.suppress(OSError):
                        os.unlink(trip.placed)
                raise
        finally:
            self._in_flight -= 1
        folders = self._folders
        if job_id not in folders:
            folders[job_id] = None
            if len(folders) > _KNOWN_FOLDERS:
                del folders[next(iter(folders))]
        return result

    def _write_atomic(self, relpath: str, index: int, data: bytes, trip: _Trip) -> None:
        """Write to a temporary name in the final folder, then rename it into place (in a
        worker thread). An OSError keeps its type and errno; its reason names the folder.

        Every system call here gives up the GIL and must win it back, which takes up to a
        switch interval when other threads are busy: the write makes as few as it can (no
        buffering, no existence checks; a job's folder is made once, by trying).
        """
        final = os.path.join(self.out_dir, relpath)
        folder = os.path.dirname(final)
        # Same folder as the final name: os.replace is atomic only within one filesystem.
        serial = next(self._serial)
        temp = os.path.join(folder, f".{index}.{self._temp_prefix}{serial:x}{_TEMP_SUFFIX}")
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
                    view = memoryview(data)
                    while view:
                        # An unbuffered write may take less than it is given.
                        written = handle.write(view)
                        if not written:
                            raise OSError(errno.EIO, os.strerror(errno.EIO), temp)
                        view = view[written:]
                    if self.fsync:
                        os.fsync(handle.fileno())
                trip.place(temp, final)
                if self.fsync:
                    # The rename (and a new job folder) must outlive a power loss too.
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

    def check_writable(self) -> None:
        """Raise OutputError unless OUT/images/ takes a new file: checked before the first
        request is paid for, so an unwritable folder costs nothing."""
        images = self.out_dir / "images"
        try:
            images.mkdir(parents=True, exist_ok=True)
            refuse_link(images)
            handle, name = tempfile.mkstemp(prefix=".probe.", suffix=_TEMP_SUFFIX, dir=images)
            os.close(handle)
            os.unlink(name)
        except OSError as exc:
            raise OutputError(
                f"cannot write images in {self.out_dir}: {exc.strerror or exc} ({images})"
            ) from exc

    def discard(self, records: Iterable[ImageRecord]) -> None:
        """Remove images that will not be recorded (their request failed to store); best effort."""
        for record in records:
            with contextlib.suppress(OSError):
                os.unlink(self.out_dir / record.path)

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files left under OUT/images/ by a crash; call before writing.

        Raises OutputError when the images folder cannot be read or cleaned.
        """
        images = self.out_dir / "images"
        removed = 0
        try:
            folders = os.scandir(images)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _cleanup_error(images, exc) from exc
        try:
            with folders:
                for folder in folders:
                    if folder.is_dir(follow_symlinks=False):
                        removed += _remove_temp_files(folder.path)
                    elif folder.is_symlink():
                        # Before anything is written or moved aside: no job folder is a link.
                        linked = link_error(folder.path)
                        raise OutputError(
                            f"cannot write images in {self.out_dir}: {linked.strerror} "
                            f"({folder.path})"
                        )
        except OSError as exc:
            raise _cleanup_error(images, exc) from exc
        return removed


def _make_folder(folder: str) -> bool:
    """Make a job's image folder (and OUT/images/ if need be); False if it was there."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        # Met once per job and sink: a link here would put the job's images out of OUT.
        refuse_link(folder)
        return False
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    return True


async def _wait_out(done: asyncio.Future[Any]) -> None:
    """Wait until `done` is settled, through any further cancellations (re-raised by the
    caller afterwards), and mark its outcome as seen."""
    while not done.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({done})
    if not done.cancelled():
        done.exception()


def _remove_temp_files(folder: str) -> int:
    """Delete the temporary files directly inside `folder` and return how many."""
    with os.scandir(folder) as entries:
        stale = [
            e.path
            for e in entries
            if e.name.endswith(_TEMP_SUFFIX) and e.is_file(follow_symlinks=False)
        ]
    removed = 0
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed


def _cleanup_error(images: Path, exc: OSError) -> OutputError:
    """The run-stopping error for an images folder that cannot be scanned or cleaned."""
    where = f" ({exc.filename})" if exc.filename else ""
    return OutputError(
        f"cannot clean up unfinished image files in {images}: {exc.strerror or exc}{where}"
    )
