"""The settings file (`cometbatch.toml` or `[tool.cometbatch]`): below the flags, never the key."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..costs.prices import PriceTable, builtin_prices, load_prices
from ..errors import ConfigError
from ..models.datafile import read_data_file
from ..settings import KEY_ENV, check_fields, concurrency_mode
from ..validation import first_problem

CONFIG_NAME = "cometbatch.toml"
PYPROJECT_NAME = "pyproject.toml"

# Names that would hold a secret: refused outright, whatever their value.
_KEY_NAMES = frozenset({"api_key", "apikey", "key", "cometapi_key", "token", "secret", "password"})


class FileSettings(BaseModel):
    """What the file may set beside Settings fields: job defaults, models, prices."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    # A number (checked by Settings) or "auto", as --concurrency.
    concurrency: int | Literal["auto"] | None = Field(default=None)
    # Job defaults, as --model, --size and --n.
    model: str | None = None
    size: str | None = None
    n: int | None = Field(default=None, ge=1)
    # A price file (relative to this file) or a table of the price file's shape.
    prices: str | dict[str, Any] | None = None
    # A models file (relative to this file), as --models: merged over the built-in models.
    models_file: str | None = None
    # [models.NAME]: per-model capability overrides, as --model-override NAME.FIELD=VALUE.
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # [storage]: options of an object store's filesystem, as --storage-option KEY=VALUE.
    storage: dict[str, Any] = Field(default_factory=dict)


# Settings fields the file sets directly (the rest go through the run options).
SETTINGS_ONLY = (
    "connect_timeout",
    "download_timeout",
    "max_download_bytes",
    "max_response_bytes",
    "max_retry_after",
    "backoff_base",
    "backoff_max",
    "outage_limit",
    "grace_period",
)
# Settings fields the file may set, named as in Settings and checked by it.
SETTINGS_KEYS = (
    "base_url",
    "max_concurrency",
    "min_concurrency",
    "rpm",
    "ipm",
    "max_attempts",
    "timeout",
    "retry_ambiguous",
    "fsync",
    "max_images",
    "max_cost",
    "layout",
    "shard_size",
    *SETTINGS_ONLY,
)


@dataclass(frozen=True, slots=True)
class FileConfig:
    """The settings a file gave (only those it set), and where they came from."""

    source: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """A value the file set, or None."""
        return self.values.get(name)

    def prices(self) -> PriceTable:
        """The built-in prices with the file's own merged over them."""
        given = self.values.get("prices")
        if given is None:
            return builtin_prices()
        assert self.source is not None
        if isinstance(given, str):
            return load_prices(Path(self.source).parent / given)
        return builtin_prices().merged(given, source=f"{self.source} [prices]")

    def get_storage(self) -> dict[str, Any]:
        """The file's [storage] table: options for an object store's filesystem."""
        return dict(self.values.get("storage") or {})

    def models_file(self) -> Path | None:
        """The file's models file, relative to the file itself; None when it names none."""
        given = self.values.get("models_file")
        if given is None:
            return None
        assert self.source is not None
        return Path(self.source).parent / str(given)


def _refuse_keys(data: Mapping[str, Any], source: str, where: str = "") -> None:
    """Refuse anything that names or looks like an API key, without repeating its value."""
    for name, value in data.items():
        path = f"{where}{name}"
        lowered = str(name).lower().replace("-", "_")
        if where != "storage." and (lowered in _KEY_NAMES or lowered.endswith("_key")):
            raise ConfigError(
                f"{source}: {path!r}: the API key is never read from a file; set {KEY_ENV} in "
                "the environment instead (and remove it from the file)"
            )
        if path == "storage":
            # A store's own credentials may be named key or secret (s3fs): they go to the
            # filesystem only, never printed.
            continue
        if isinstance(value, str) and value.strip().startswith("sk-"):
            raise ConfigError(
                f"{source}: {path!r} looks like an API key; keys are never read from a file: "
                f"set {KEY_ENV} in the environment instead (and remove it from the file)"
            )
        if isinstance(value, Mapping) and path != "prices":
            _refuse_keys(value, source, f"{path}.")


def _problem(exc: ValidationError, source: str) -> ConfigError:
    """The first validation problem as one line naming the file and the key."""
    first = first_problem(exc)
    loc = first.where.split(".") if first.where else []
    # A value that may be one of several types reports each branch (concurrency.int): name
    # the key itself, or the model of a [models.NAME] table.
    key = ".".join(loc[:2]) if loc[:1] == ["models"] else (loc[0] if loc else "")
    if first.kind == "extra_forbidden":
        known = [*FileSettings.model_fields, *SETTINGS_KEYS]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"{source}: unknown setting {key!r}{hint}")
    message = first.message
    if key == "concurrency" and len(loc) > 1:
        message = "should be a whole number or 'auto'"
    return ConfigError(f"{source}: {key!r}: {message}")


def parse_config(data: Mapping[str, Any], source: str) -> FileConfig:
    """Validate a config table (a TOML document or `[tool.cometbatch]`); ConfigError if bad."""
    _refuse_keys(data, source)
    shared = {name: value for name, value in data.items() if name in SETTINGS_KEYS}
    try:
        parsed = FileSettings.model_validate({k: v for k, v in data.items() if k not in shared})
        number = {} if parsed.concurrency in (None, "auto") else {"concurrency": parsed.concurrency}
        # The bounds are Settings' own, so a value reads the same here as from a flag.
        check_fields({**shared, **number})
    except ValidationError as exc:
        raise _problem(exc, source) from None
    return FileConfig(source, {**shared, **parsed.model_dump(exclude_unset=True)})


def _read_toml(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = read_data_file(path, lambda reason: ConfigError(f"{path}: {reason}"))
    return data


def _tool_table(data: dict[str, Any]) -> Any:
    tool = data.get("tool")
    return tool.get("cometbatch") if isinstance(tool, dict) else None


def load_config(path: str | Path | None = None, *, cwd: str | Path = ".") -> FileConfig:
    """The config from `path`, else found in `cwd`; an empty FileConfig when there is none."""
    if path is not None:
        given = Path(path)
        data = _read_toml(given)
        if given.name == PYPROJECT_NAME:
            table = _tool_table(data)
            if not isinstance(table, dict):
                raise ConfigError(f"{given}: has no [tool.cometbatch] table")
            return parse_config(table, f"{given} [tool.cometbatch]")
        return parse_config(data, str(given))
    folder = Path(cwd)
    own = folder / CONFIG_NAME
    if own.is_file():
        return parse_config(_read_toml(own), str(own))
    pyproject = folder / PYPROJECT_NAME
    if pyproject.is_file():
        table = _tool_table(_read_toml(pyproject))
        if table is not None:
            if not isinstance(table, dict):
                raise ConfigError(f"{pyproject}: [tool.cometbatch] must be a table")
            return parse_config(table, f"{pyproject} [tool.cometbatch]")
    return FileConfig()


def merge_options(
    flags: Mapping[str, Any], given: set[str], config: FileConfig, environ: Mapping[str, str]
) -> dict[str, Any]:
    """The run options: a given flag, else the environment (base URL), else the file."""
    merged = dict(flags)
    for name, value in config.values.items():
        if name in ("models", "models_file", "prices", "storage", *SETTINGS_ONLY):
            continue
        if name not in merged:
            continue
        if name in given:
            continue
        if name == "base_url" and environ.get("COMETAPI_BASE_URL"):
            continue
        merged[name] = value
    concurrency = merged.get("concurrency")
    auto = concurrency == "auto"
    rate = merged.get("rpm") is not None or merged.get("ipm") is not None
    fixed = concurrency_mode(None if auto else concurrency, auto, rate) == "fixed"
    if fixed and "max_concurrency" in merged:
        # A fixed concurrency is its own maximum, and without a rate there is no level to
        # bound: the file's bound is moot (a --max-concurrency flag still says so).
        merged["max_concurrency"] = flags.get("max_concurrency")
    if "retry_ambiguous" in given:
        if "no_retry_ambiguous" in given:
            raise ConfigError("--retry-ambiguous and --no-retry-ambiguous contradict each other")
        merged["no_retry_ambiguous"] = False
    elif "retry_ambiguous" in config.values and "no_retry_ambiguous" not in given:
        merged["no_retry_ambiguous"] = not config.values["retry_ambiguous"]
    merged.pop("retry_ambiguous", None)
    return merged


def model_overrides(
    config: FileConfig, flags: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per-model overrides: the file's `[models.NAME]` tables, each field replaced by a flag's."""
    merged: dict[str, dict[str, Any]] = {
        name: dict(fields) for name, fields in config.values.get("models", {}).items()
    }
    for name, fields in flags.items():
        merged.setdefault(name, {}).update(fields)
    return merged


def settings_fields(config: FileConfig) -> dict[str, Any]:
    """The Settings fields the file sets that have no run option of their own."""
    return {name: config.values[name] for name in SETTINGS_ONLY if name in config.values}
