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

__all__ = ["is_url", "open_store", "parse_storage_options", "same_root", "store_of"]

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


def same_root(store: Store, out: str | os.PathLike[str]) -> bool:
    """Whether `store` is the output `out` names (a URL as given, a folder by its path)."""
    if is_url(out):
        return store.root == str(out).rstrip("/")
    return os.path.abspath(store.root) == os.path.abspath(out)


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


def store_of(
    out: Store | str | os.PathLike[str], options: Mapping[str, Any] | None = None
) -> Store:
    """`out` if it is a store already, else the store it names."""
    if isinstance(out, str | os.PathLike):
        return open_store(out, options)
    return out


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE pairs as filesystem options ("true"/"false" as booleans); ConfigError naming
    the key (never the value) of a pair that is not one."""
    options: dict[str, Any] = {}
    for number, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--storage-option #{number} is not KEY=VALUE (its value is not shown)"
            )
        lowered = value.strip().lower()
        options[key] = {"true": True, "false": False}.get(lowered, value)
    return options
