"""Pure naming of output files: a job id becomes one safe folder name under OUT/images/."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sys
from pathlib import PurePosixPath

__all__ = [
    "EXTENSIONS",
    "MAX_COMPONENT",
    "PLAIN_COMPONENT",
    "image_relpath",
    "link_error",
    "refuse_link",
    "safe_component",
    "unlinked",
]

# Output format (as the API and `detect_format` name it) -> file extension.
EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}

# Long enough for readable ids, short enough that OUT/images/<id>/<k>.<ext> stays far below
# the 255-byte name limit of common filesystems and Windows' 260-char path habit.
MAX_COMPONENT = 80

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SUFFIX_LEN = 9  # "-" + 8 hex chars
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)


# A name safe_component keeps as it is: safe characters, no dot at either end, not a Windows
# device name, not too long (one regex match instead of the steps below, for the usual id).
PLAIN_COMPONENT = re.compile(
    rf"(?!\.)(?!(?:CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(?:\.|\Z))[A-Z0-9._-]{{0,{MAX_COMPONENT - 1}}}"
    r"[A-Z0-9_-]",
    re.ASCII | re.IGNORECASE,
)


def _is_windows_reserved(name: str) -> bool:
    """Whether Windows treats the name as a device, which it does whatever the extension."""
    return name.split(".", 1)[0].upper() in _WINDOWS_RESERVED


def safe_component(job_id: str) -> str:
    """Return `job_id` as one folder name that cannot escape, collide or misbehave on any OS."""
    return job_id if PLAIN_COMPONENT.fullmatch(job_id) else _renamed(job_id)


def _renamed(job_id: str) -> str:
    """safe_component step by step (for a name that is not plain)."""
    name = _UNSAFE.sub("_", job_id)
    # A leading dot hides the folder (and makes "." and ".."); Windows drops trailing dots.
    stripped = name.lstrip(".")
    name = "_" * (len(name) - len(stripped)) + stripped
    stripped = name.rstrip(".")
    name = stripped + "_" * (len(name) - len(stripped))
    if not name:
        name = "_"
    if _is_windows_reserved(name):
        stem, dot, ext = name.partition(".")
        name = f"{stem}_{dot}{ext}"
    if name == job_id and len(name) <= MAX_COMPONENT:
        return name
    # Any change loses information, so a hash of the original keeps distinct ids distinct
    # ("a/b" and "a_b" would otherwise share a folder).
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{name[: MAX_COMPONENT - _SUFFIX_LEN]}-{digest}"


def image_relpath(job_id: str, index: int, fmt: str) -> str:
    """Return `images/<safe id>/<index>.<ext>`, relative to OUT with POSIX separators."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"image index must be a non-negative integer, not {index!r}")
    try:
        ext = EXTENSIONS[fmt]
    except KeyError:
        raise ValueError(f"unknown image format {fmt!r}") from None
    return f"images/{safe_component(job_id)}/{index}.{ext}"


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make the entries of `folder` durable (a rename, a new file); a no-op on Windows."""
    if sys.platform == "win32":
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# Nothing below OUT is reached through a symbolic link: a job folder that is a link to another
# place would have images written, moved or shown out there.
_LINK = "a symbolic link, and cometbatch follows none below the output folder (make it a folder)"


def link_error(path: str | os.PathLike[str]) -> OSError:
    """The error for a symbolic link at `path` below OUT (ELOOP, naming it)."""
    return OSError(errno.ELOOP, _LINK, os.fspath(path))


def refuse_link(path: str | os.PathLike[str]) -> None:
    """Raise `link_error(path)` if `path` is a symbolic link."""
    if os.path.islink(path):
        raise link_error(path)


def unlinked(out_dir: str | os.PathLike[str], relpath: str) -> bool:
    """Whether OUT/`relpath` is reached through no symbolic link (a missing part is none)."""
    path = os.fspath(out_dir)
    for part in PurePosixPath(relpath).parts:
        path = os.path.join(path, part)
        if os.path.islink(path):
            return False
    return True
