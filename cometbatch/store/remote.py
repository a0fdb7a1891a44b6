"""An object store (S3, GCS, Azure, memory, ...) as a store, through fsspec."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

from .interface import Entry
from .lease import LeaseLock
from .lock import LOCK_NAME
from .segments import SegmentLog, copy_log, temp_folder

__all__ = ["FsspecStore"]

_PROBE = ".cometbatch-probe"


class FsspecStore:
    """OUT as a prefix of an object store: each object is put whole, in a worker thread."""

    # Options (credentials among them) go to the filesystem and nowhere else: not in the
    # repr, not in a message.

    def __init__(self, url: str, fs: Any, base: str, secrets: Sequence[str] = ()) -> None:
        self._root = url.rstrip("/")
        self.fs: Any = _OSErrors(fs, secrets)
        self._fs, self._secrets = fs, secrets
        self.base = base.rstrip("/")
        # The lock this store handed out: writes stop once its lease is lost (see check).
        self._lease: LeaseLock | None = None

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any] | None = None) -> FsspecStore:
        """The store at `url`, its filesystem made with `options` (ImportError, ValueError)."""
        from fsspec.core import url_to_fs

        options = dict(options or {})
        if url.partition("://")[0] in ("s3", "s3a"):
            # s3fs reads up to ten 50 MB parts of an upload at once by default: a large shard
            # took 1 GB of memory. One part at a time; the option can still be given.
            options.setdefault("max_concurrency", 1)
        fs, base = url_to_fs(url, **options)
        return cls(url, fs, base, secret_values(options))

    def __repr__(self) -> str:
        return f"<FsspecStore {self._root!r}>"

    @property
    def root(self) -> str:
        return self._root

    @property
    def local_folder(self) -> None:
        return None

    def within(self, folder: str) -> FsspecStore:
        # The same filesystem object: its client, options and credentials are shared.
        return FsspecStore(f"{self._root}/{folder}", self._fs, self._path(folder), self._secrets)

    def _path(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def _check_lease(self) -> None:
        """LedgerError if this store's run lost its lease: another run may own OUT now."""
        if self._lease is not None:
            self._lease.check()

    async def put(self, name: str, data: bytes, *, sync: bool = False) -> None:
        """Put `data` as the whole object `name` (see Store.put), in a worker thread."""
        self._check_lease()
        path = self._path(name)
        await _finish(asyncio.to_thread(self.fs.pipe_file, path, data), self._drop, path)

    async def put_file(self, name: str, source: str, *, sync: bool = False) -> None:
        """Upload the finished file `source` as `name`, then remove it (see Store.put_file)."""
        self._check_lease()
        path = self._path(name)
        await _finish(asyncio.to_thread(self.fs.put_file, source, path), self._drop, path)
        await asyncio.to_thread(os.unlink, source)

    def _drop(self, path: str) -> None:
        """Remove what a put cancelled by its caller wrote after all."""
        with contextlib.suppress(OSError):
            self.fs.rm_file(path)

    def stat(self, name: str) -> Entry:
        try:
            info = self.fs.info(self._path(name))
        except FileNotFoundError:
            raise _missing(name) from None
        return Entry(int(info.get("size") or 0), info.get("type") == "file")

    def names(self, folder: str) -> list[str]:
        """Every object below `folder`, sorted."""
        path = self._path(folder)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        prefix = self.base.lstrip("/") + "/"
        # Objects only: with none left below it, a folder some servers keep is listed itself.
        return sorted(
            name.lstrip("/").removeprefix(prefix)
            for name, info in found.items()
            if name.lstrip("/").startswith(prefix) and info.get("type") != "directory"
        )

    def read(self, name: str) -> bytes:
        try:
            data: bytes = self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            raise _missing(name) from None
        return data

    def open_read(self, name: str) -> BinaryIO:
        """The object as a file read in ranges (s3fs fetches blocks as they are read)."""
        try:
            handle: BinaryIO = self.fs.open(self._path(name), "rb")
        except FileNotFoundError:
            raise _missing(name) from None
        return handle

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        """Move each object (a copy, then a removal, on most object stores)."""
        self._check_lease()
        for source, target in moves:
            self.fs.mv(self._path(source), self._path(target))

    def remove(self, name: str) -> None:
        self._check_lease()
        path = self._path(name)
        # Object stores say nothing when asked to remove a missing object.
        if not self.fs.exists(path):
            raise _missing(name)
        self.fs.rm_file(path)

    def escapes(self, name: str, folder: str) -> bool:
        return False  # no symbolic links in an object store

    def check_writable(self, folder: str) -> None:
        """Put and remove a probe object under `folder`; OSError if that fails."""
        probe = self._path(f"{folder}/{_PROBE}" if folder else _PROBE)
        self.fs.pipe_file(probe, b"")
        self.fs.rm_file(probe)

    def clean(self, folder: str) -> int:
        return 0  # objects appear whole: a crash leaves no partial one

    def open_log(self, name: str, *, sync: bool) -> SegmentLog:
        """The log `name` as segment objects in the folder named for it (ledger.jsonl: ledger/)."""
        self.fs.invalidate_cache(self.base)
        copy = os.path.join(temp_folder(), f"{os.getpid()}-{id(self):x}-{name}")
        return SegmentLog(
            _Listing(self.fs), self._path(_log_folder(name)), copy, guard=self._check_lease
        )

    def log_copy(self, name: str) -> str | None:
        """A local file holding the log `name` merged from its segments; None without any."""
        return copy_log(_Listing(self.fs), self._path(_log_folder(name)))

    def has_log(self, name: str) -> bool:
        """Whether any segment of the log `name` is there (its folder of segments)."""
        return bool(self.names(_log_folder(name)))

    def lock(self) -> LeaseLock:
        path = self._path(LOCK_NAME)
        self._lease = LeaseLock(
            self._root,
            read=lambda: self._read_fresh(path),
            write=lambda data: self.fs.pipe_file(path, data),
            remove=lambda: self.fs.rm_file(path),
            create=self._creator(path),
        )
        return self._lease

    def _creator(self, path: str) -> Callable[[bytes], None] | None:
        """A write of `path` that fails if it exists, on the stores known to offer one."""
        # S3 (and S3-compatible servers) take If-None-Match; memory:// opens with "xb".
        # Elsewhere (gcsfs, adlfs, ...) the lock is written and read back, as before.
        if self._root.partition("://")[0] not in ("s3", "s3a", "memory"):
            return None

        def create(data: bytes) -> None:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise
            except OSError as exc:
                if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc):
                    raise FileExistsError(errno.EEXIST, "the lock object exists") from None
                raise

        return create

    def _read_fresh(self, path: str) -> bytes:
        self.fs.invalidate_cache(path)
        data: bytes = self.fs.cat_file(path)
        return data


class _OSErrors:
    """The filesystem, its library's own errors (credentials, a client's) raised as OSError:
    what every caller of a store already handles, with the library's error as the cause."""

    def __init__(self, fs: Any, secrets: Sequence[str] = ()) -> None:
        self._fs = fs
        self._secrets = secrets

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except OSError as exc:
                if any(secret in str(exc) for secret in self._secrets):
                    raise OSError(exc.errno, quiet(str(exc), self._secrets)) from None
                raise
            except Exception as exc:
                raise OSError(errno.EIO, _said(exc, self._secrets)) from None

        return call


def secret_values(options: Mapping[str, Any] | None) -> list[str]:
    """The option values to blank out of any message (credentials, endpoints, tokens)."""
    return [str(v) for v in (options or {}).values() if isinstance(v, str) and len(v) >= 3]


def quiet(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret in it blanked out."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


# A client built with an option it does not take (s3fs makes its session on first use).
_UNKNOWN_OPTION = re.compile(r"__init__\(\) got an unexpected keyword argument '([^']+)'")


def _said(exc: Exception, secrets: Sequence[str]) -> str:
    """A filesystem library's error as one plain line (an unknown option named as such)."""
    # Not chained: its text may hold an option's value, and a traceback would show it.
    unknown = _UNKNOWN_OPTION.search(str(exc)) if isinstance(exc, TypeError) else None
    if unknown is not None:
        return f"the object store does not take the storage option {unknown.group(1)!r}"
    return quiet(f"{type(exc).__name__}: {exc}", secrets)


def _missing(name: str) -> FileNotFoundError:
    """The error of an object that is not there, with its errno as a local file's has."""
    return FileNotFoundError(errno.ENOENT, "no such object", name)


def _log_folder(name: str) -> str:
    return name.rpartition(".")[0] or name


class _Listing:
    """The filesystem, with listings read fresh (fsspec caches them per instance)."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs

    def find(self, path: str) -> list[str]:
        self._fs.invalidate_cache(path)
        found: list[str] = self._fs.find(path)
        return found

    def exists(self, path: str) -> bool:
        self._fs.invalidate_cache(path)
        return bool(self._fs.exists(path))

    def open(self, path: str, mode: str = "rb") -> Any:
        return self._fs.open(path, mode)

    def pipe_file(self, path: str, value: bytes) -> None:
        self._fs.pipe_file(path, value)

    def put_file(self, lpath: str, rpath: str) -> None:
        self._fs.put_file(lpath, rpath)

    def rm(self, path: list[str]) -> None:
        self._fs.rm(path)


async def _finish(write: Any, drop: Any, path: str) -> None:
    """Await `write`; if the caller is cancelled, let it finish, then undo it."""
    task = asyncio.ensure_future(write)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # The thread cannot be stopped: wait for it, so no object of it appears later.
        with contextlib.suppress(BaseException):
            await task
        if task.done() and not task.cancelled() and task.exception() is None:
            await asyncio.to_thread(drop, path)
        raise
