"""Reading a user's data file (models, prices): its bytes as UTF-8 TOML or JSON, or one reason
why not, in the words every such file's error uses."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["read_data_file"]


def read_data_file(
    path: str | os.PathLike[str], fail: Callable[[str], Exception], *, json_suffix: bool = False
) -> Any:
    """The document at `path`: TOML, or JSON when `json_suffix` and the name ends in .json.
    Anything that stops it is raised as `fail(reason)`."""
    is_json = json_suffix and Path(path).suffix.lower() == ".json"
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise fail(f"cannot read the file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
        return json.loads(text) if is_json else tomllib.loads(text)
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        # tomllib.TOMLDecodeError and json.JSONDecodeError both say where (line, column).
        raise fail(f"not valid {'JSON' if is_json else 'TOML'}: {exc}") from None
