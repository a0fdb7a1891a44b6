"""Which store an output names: a local path, `file://`, or an fsspec URL (s3://, gs://, ...)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from .interface import Store
from .local import LocalStore

__all__ = ["is_url", "open_store", "parse_storage_options", "rooted_at", "store_of"]

# "s3://", "gs://", "memory://", "file://": a scheme of two letters or more, so that a
# Windows drive ("C:\\out") stays a path.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")
# The extra (and its package) that brings each protocol's filesystem.
_EXTRAS: Mapping[str, str] = {
    "s3": "pip install 'cometbatch[s3]'",
    "s3a": "pip install 'cometbatch[s3]'",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
    "abfss": "pip install adlfs",
}


def is_url(out: str | os.PathLike[str]) -> bool:
    """Whether `out` names a store by URL rather than a local path."""
    return isinstance(out, str) and _URL.match(out) is not None


def _local_path(out: str) -> Path | None:
    """The local folder a `file://` URL names (None for other URLs)."""
    parts = urlsplit(out)
    if parts.scheme.lower() != "file":
        return None
    return Path(unquote(parts.netloc + parts.path))


def open_store(out: str | os.PathLike[str], options: Mapping[str, Any] | None = None) -> Store:
    """The store `out` names: a LocalStore for a path or file:// URL, else an object store."""
    if not is_url(out):
        return LocalStore(out)
    text = str(out)
    local = _local_path(text)
    if local is not None:
        return LocalStore(local)
    scheme = text.split("://", 1)[0].lower()
    if "@" in urlsplit(text).netloc:
        # Every message names OUT by its URL: credentials in it would be printed.
        raise ConfigError(
            f"--out {scheme}://... has a user name or password in it: give credentials through "
            "the filesystem's environment (AWS_ACCESS_KEY_ID, ...), --storage-option or the "
            "settings file's [storage] table instead"
        )
    pip = _EXTRAS.get(scheme, "pip install 'cometbatch[s3]'")
    try:
        from .remote import FsspecStore
    except ImportError:
        raise ConfigError(f"--out {scheme}://... needs fsspec: {pip}") from None
    try:
        return FsspecStore.from_url(text, options)
    except ImportError:
        raise ConfigError(
            f"--out {scheme}://... needs the filesystem package for {scheme}: {pip}"
        ) from None
    except (ValueError, TypeError) as exc:
        # The message names the protocol or the option, never an option's value.
        raise ConfigError(f"cannot open --out {scheme}://...: {_quiet(exc, options)}") from None


def _quiet(exc: Exception, options: Mapping[str, Any] | None) -> str:
    """The error's text, with any option value in it blanked out."""
    text = str(exc)
    for value in (options or {}).values():
        if isinstance(value, str) and value:
            text = text.replace(value, "***")
    return text


def rooted_at(store: Store, out: str | os.PathLike[str]) -> Path | str:
    """OUT as the engine names it (a Path, or the store's URL); ConfigError unless `store` is
    rooted there."""
    # Resume reads the ledger at OUT: a store rooted elsewhere would pay for it all again.
    named: Path | str
    if is_url(out):
        same, named = store.root == str(out).rstrip("/"), store.root
    else:
        same = os.path.abspath(store.root) == os.path.abspath(out)
        named = Path(out)
    if not same:
        raise ConfigError(f"the store's root ({store.root}) must be out_dir ({out})")
    return named


def store_of(
    out: Store | str | os.PathLike[str], options: Mapping[str, Any] | None = None
) -> Store:
    """`out` if it is a store already, else the store it names."""
    if isinstance(out, str | os.PathLike):
        return open_store(out, options)
    return out


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE pairs as filesystem options ("true"/"false" as booleans, whole numbers as
    ints); ConfigError naming the key (never the value) of a pair that is not one."""
    options: dict[str, Any] = {}
    for number, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--storage-option #{number} is not KEY=VALUE (its value is not shown)"
            )
        lowered = value.strip().lower()
        if lowered.isdigit():
            # max_concurrency=4 and the like: the filesystems want a number.
            options[key] = int(lowered)
        else:
            options[key] = {"true": True, "false": False}.get(lowered, value)
    return options
