"""Engine settings: one frozen object, validated once, safe to print (the key is a SecretStr)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

# "end": flushed to the OS per write, fsynced at close (a crash loses nothing; a power loss may
# lose the last lines); "batch": each group of lines fsynced before its appends return;
# "always": "batch", and every image fsynced before its line is written.
FsyncPolicy = Literal["end", "batch", "always"]

DEFAULT_BASE_URL = "https://api.cometapi.com/v1"
KEY_ENV = "COMETAPI_KEY"
BASE_URL_ENV = "COMETAPI_BASE_URL"
# Requests in flight with no concurrency, rpm or ipm given.
DEFAULT_CONCURRENCY = 16
# The most requests in flight unless max_concurrency says otherwise: auto concurrency, and the
# level that follows rpm/ipm (at 60 s a generation, 1,000/min needs 1,000 in flight).
AUTO_MAX_CONCURRENCY = 256
RATE_MAX_CONCURRENCY = 1000
ConcurrencyMode = Literal["fixed", "auto", "rate"]
# How OUT holds the images: files (images/<job>/<k>.<ext> and metadata.jsonl), or shards.
Layout = Literal["files", "webdataset", "parquet"]
DEFAULT_SHARD_SIZE = 1000
SHARD_LAYOUTS = ("webdataset", "parquet")


def _default_base_url() -> str:
    return os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL


def is_loopback_host(host: str | None) -> bool:
    """True for localhost and loopback addresses (where plain http is acceptable)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str, *, allow_insecure_http: bool) -> None:
    """Refuse a base URL that is not http(s), or plain http off this machine unless allowed."""
    # Plain http to another host would carry the key in clear text.
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"base URL must be http(s)://host[/path], got {base_url!r}")
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"refusing to send the API key in clear text to {parts.hostname}: use https, "
            "or allow it explicitly (--allow-insecure-http, Settings(allow_insecure_http=True))"
        )


def concurrency_mode(concurrency: int | None, auto: bool, rate: bool) -> ConcurrencyMode:
    """ "auto" when asked; "rate" with a rate and no concurrency; else "fixed"."""
    if auto:
        return "auto"
    return "rate" if concurrency is None and rate else "fixed"


def most_in_flight(concurrency: int | None, mode: ConcurrencyMode, bound: int | None) -> int:
    """The hard cap on requests in flight: a fixed concurrency, else the mode's bound, else 16."""
    if concurrency is not None:
        return concurrency
    if mode == "fixed":
        return DEFAULT_CONCURRENCY
    return bound or (AUTO_MAX_CONCURRENCY if mode == "auto" else RATE_MAX_CONCURRENCY)


class Settings(BaseModel):
    """How the engine sends: limits, retries, timeouts, where, and with which key."""

    # The one place each setting's bounds live: the CLI and the settings file are checked by
    # this model. protected_namespaces=(): pydantic before 2.10 warns at import about any
    # field named model_* (model_overrides), as if it could shadow a BaseModel method.
    # allow_inf_nan=False: no setting works at infinity (aiohttp cannot time out at inf, a
    # pacing bucket cannot hold inf requests).
    model_config = ConfigDict(
        frozen=True, extra="forbid", protected_namespaces=(), allow_inf_nan=False
    )

    # COMETAPI_BASE_URL, when set, replaces the default (a proxy, a gateway, the simulator).
    base_url: str = Field(default_factory=_default_base_url)
    # A plain str is accepted for convenience and stored as a SecretStr (hidden in reprs).
    api_key: SecretStr | str | None = Field(default=None, repr=False)
    # Most requests in flight, a hard cap. None: with rpm or ipm, rate x measured latency (with
    # headroom, up to max_concurrency), so the limit is used at any latency; without, 16.
    concurrency: int | None = Field(default=None, ge=1, le=10_000)
    min_concurrency: int = Field(default=1, ge=1, le=10_000)
    # Concurrency finds its own level: it starts at 16 (or min_concurrency, if higher) and grows
    # while latency and errors hold, up to `concurrency` (else max_concurrency, else 256);
    # 429s and timeouts back it off.
    auto_concurrency: bool = False
    # The bound of auto concurrency and of the level that follows the rate (None: 256 for
    # auto, 1,000 for the rate); a fixed `concurrency` is its own bound.
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000)
    # The pacer lets whole requests through: at one a minute or less it has nothing to pace.
    rpm: float | None = Field(default=None, gt=1)
    ipm: float | None = Field(default=None, gt=1)
    max_attempts: int = Field(default=8, ge=1, le=100)
    # Retry timeouts and dropped connections that happen after the request was sent (the
    # image may have been generated and billed), and send again requests an earlier run sent
    # and never heard back about (a crash or a hard stop); off: those are held back.
    retry_ambiguous: bool = True
    # When ledger lines (and images) reach the disk itself: see Ledger for each policy.
    fsync: FsyncPolicy = "end"
    timeout: float = Field(default=600.0, gt=0)
    connect_timeout: float = Field(default=30.0, gt=0)
    download_timeout: float = Field(default=120.0, gt=0)
    max_download_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # The largest answer read into memory: room for 10 base64 images of about 19 MB each.
    max_response_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_retry_after: float = Field(default=120.0, ge=0)
    backoff_base: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    # Stop the run when the API has been failing with no success for this long.
    outage_limit: float = Field(default=300.0, gt=0)
    retry_failed: bool = False
    # Regenerate jobs whose request changed since the ledger recorded them; their old images
    # are moved to OUT/replaced/<run_id>/ first. Off: such a run is refused, naming the jobs.
    regenerate_changed: bool = False
    # A models file (models.toml's shape) merged over the built-in models; then model_overrides.
    models_file: str | None = None
    model_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Plain http to a non-loopback host sends the key in clear text; refuse unless allowed.
    allow_insecure_http: bool = False
    # Grace period for in-flight requests after a stop is asked (Ctrl-C).
    grace_period: float = Field(default=60.0, ge=0)
    # Budget caps over the output folder (what its ledger records plus this run, in flight
    # included): no request starts that could cross one; the run stops as "max_images" or
    # "max_cost" instead. None: no cap.
    max_images: int | None = Field(default=None, gt=0)
    max_cost: float | None = Field(default=None, gt=0)
    # files, or images packed into shards/NNNNN.tar (webdataset) or .parquet, shard_size each.
    layout: Layout = "files"
    shard_size: int = Field(default=DEFAULT_SHARD_SIZE, ge=1, le=100_000)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base URL must be http(s)://host[/path], got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        if self.rpm is not None and self.ipm is not None and self.rpm <= 2:
            # Pacing both holds one request a minute back from the rpm bucket (see Limiter).
            raise ValueError(
                f"rpm (--rpm) must be more than 2 when ipm (--ipm) is set too, got {self.rpm:g}"
            )
        if self.max_concurrency is not None and self.concurrency_mode == "fixed":
            raise ValueError(
                "max_concurrency (--max-concurrency) bounds auto concurrency and the level "
                "that follows rpm/ipm; a fixed concurrency (16 without rpm/ipm) is its own "
                "maximum"
            )
        if self.min_concurrency > self.max_in_flight:
            raise ValueError(
                f"min_concurrency (--min-concurrency) {self.min_concurrency} is above the "
                f"maximum concurrency ({self.max_in_flight})"
            )
        return self

    @property
    def concurrency_mode(self) -> ConcurrencyMode:
        """ "auto" (auto_concurrency), "rate" (rpm or ipm and no concurrency), else "fixed"."""
        rate = self.rpm is not None or self.ipm is not None
        return concurrency_mode(self.concurrency, self.auto_concurrency, rate)

    @property
    def max_in_flight(self) -> int:
        """The most requests ever in flight: the hard cap of this concurrency mode."""
        return most_in_flight(self.concurrency, self.concurrency_mode, self.max_concurrency)

    @field_validator("api_key")
    @classmethod
    def _hide_key(cls, value: SecretStr | str | None) -> SecretStr | None:
        return SecretStr(value) if isinstance(value, str) else value

    def resolved_key(self) -> str | None:
        """The key from the settings, else from COMETAPI_KEY; stripped and checked."""
        if isinstance(self.api_key, SecretStr):
            key = self.api_key.get_secret_value()
        else:
            key = os.environ.get(KEY_ENV, "")
        # A key pasted from a CRLF .env file ends in "\r": harmless to drop, fatal to send.
        key = key.strip()
        if any(ch.isspace() or not ch.isprintable() for ch in key):
            raise ConfigError(
                f"the API key contains spaces or control characters; check {KEY_ENV} "
                "(the key is not shown)"
            )
        return key or None

    def public(self) -> dict[str, Any]:
        """Settings as they go into the ledger's run event: never the key."""
        return self.model_dump(mode="json", exclude={"api_key"})


def check_fields(values: Mapping[str, Any]) -> None:
    """Check some Settings fields on their own, strictly (no "60" for 60): ValidationError."""
    try:
        Settings.model_validate(values, strict=True)
    except ValidationError as exc:
        # A check across fields waits for the whole settings: other sources may complete them.
        if exc.errors()[0]["loc"]:
            raise
