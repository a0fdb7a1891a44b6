"""Local staging for streamed downloads: each goes to a file, hashed as it comes, then stored."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .imagecheck import check_image
from .interface import Store
from .local import remove_temp_files

__all__ = ["STAGING_FOLDER", "Staged", "Staging", "check_file"]

# Under a local OUT: the same filesystem as its images, so handing one over is a rename.
STAGING_FOLDER = ".staging/downloads"
_SUFFIX = ".part"


@dataclass(frozen=True, slots=True)
class Staged:
    """A download written whole to a local file: where, how long, and its sha256."""

    path: str
    size: int
    sha256: str


class Staging:
    """A local folder that takes downloads as they stream in; one run uses it at a time."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._made = False

    def __repr__(self) -> str:
        return f"<Staging {self.folder!r}>"

    @classmethod
    def for_store(cls, store: Store) -> Staging:
        """OUT's own staging folder for a local store; a temporary folder for any other."""
        if store.local_folder is not None:
            return cls(os.path.join(store.local_folder, *STAGING_FOLDER.split("/")))
        # One folder per output: the run lock that keeps a second run out of the output
        # also keeps it out of this folder, so the next run may clean it.
        digest = hashlib.sha256(store.root.encode()).hexdigest()[:16]
        return cls(os.path.join(tempfile.gettempdir(), "cometbatch-staging", digest))

    async def receive(self, head: bytes | bytearray, rest: AsyncIterator[bytes]) -> Staged:
        """Write `head`, then each chunk of `rest`, to a new file; removed if anything fails."""
        import aiofiles  # not at import time: `import cometbatch` stays light

        if not self._made:
            await asyncio.to_thread(os.makedirs, self.folder, exist_ok=True)
            self._made = True
        path = os.path.join(self.folder, f"{secrets.token_hex(8)}{_SUFFIX}")
        digest = hashlib.sha256(head)
        size = len(head)
        try:
            async with aiofiles.open(path, "xb") as handle:
                await handle.write(head)
                async for chunk in rest:
                    digest.update(chunk)
                    size += len(chunk)
                    await handle.write(chunk)
        except BaseException:
            # Also when cancelled: a download that is not whole leaves no file behind.
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return Staged(path, size, digest.hexdigest())

    def remove_folder(self) -> None:
        """Remove the staging folder if nothing is left in it (at a run's end); blocking."""
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)
        self._made = False

    def clean(self) -> int:
        """Remove what downloads cut short by a crash left here; how many. Blocking."""
        try:
            return remove_temp_files(self.folder, _SUFFIX)
        except FileNotFoundError:
            return 0


def check_file(path: str) -> str:
    """The format of the whole image in the file at `path`, checked in place; blocking."""
    # Mapped, not read into memory; ImageDataError when it is not a whole image.
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return check_image(b"")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return check_image(data)
