"""What `run` takes from its flags, the environment and the settings file, checked by Settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..costs.prices import PriceTable, load_prices
from ..errors import ConfigError
from ..models.registry import ModelRegistry, load_registry, parse_overrides
from ..settings import Settings, check_base_url
from .config import FileConfig, load_config, merge_options, model_overrides, settings_fields
from .options import concurrency_fields, make_settings


@dataclass(frozen=True, slots=True)
class RunSetup:
    """A run's checked settings, models, prices and job defaults."""

    settings: Settings
    registry: ModelRegistry
    prices: PriceTable
    model: str | None
    size: str | None
    n: int | None


def run_settings(
    opts: Mapping[str, Any],
    given: set[str],
    config: FileConfig,
    overrides: dict[str, dict[str, Any]],
    models_file: Path | None,
) -> Settings:
    """Settings from the merged options; an error names a flag as the user typed it."""
    fields: dict[str, Any] = {
        **settings_fields(config),
        **concurrency_fields(opts["concurrency"], opts["min_concurrency"], opts["max_concurrency"]),
        "rpm": opts["rpm"],
        "ipm": opts["ipm"],
        "max_attempts": opts["max_attempts"],
        "timeout": opts["timeout"],
        "retry_failed": opts["retry_failed"],
        "regenerate_changed": opts["regenerate_changed"],
        "retry_ambiguous": not opts["no_retry_ambiguous"],
        "fsync": opts["fsync"],
        "allow_insecure_http": opts["allow_insecure_http"],
        # Recorded absolute, so that status, export and gallery find it from any folder.
        "models_file": None if models_file is None else str(Path(models_file).resolve()),
        "model_overrides": overrides,
        "max_images": opts["max_images"],
        "max_cost": opts["max_cost"],
        "layout": opts["layout"],
        "shard_size": opts["shard_size"],
    }
    if opts["base_url"]:
        fields["base_url"] = opts["base_url"]
    # A value the file gave was checked when the file was read, naming the file.
    settings = make_settings(fields, flags=given)
    # Checked here too so that a dry run refuses what the real run would refuse.
    check_base_url(settings.base_url, allow_insecure_http=settings.allow_insecure_http)
    return settings


def run_setup(options: Mapping[str, Any], given: set[str], environ: Mapping[str, str]) -> RunSetup:
    """The run's setup from its options (`given`: those typed); ConfigError if any is bad."""
    config = load_config(options["config_path"])
    if {"simulate", "base_url"} <= given:
        # The simulated API has its own address: one of the two flags is a mistake.
        raise ConfigError(
            "--simulate and --base-url cannot be used together: --simulate sends to the "
            "built-in simulated API; drop one of them"
        )
    opts = merge_options(options, given, config, environ)
    overrides = model_overrides(config, parse_overrides(opts["model_override"]))
    models_file = opts["models_path"] or config.models_file()
    return RunSetup(
        settings=run_settings(opts, given, config, overrides, models_file),
        registry=load_registry(models_file, overrides),
        prices=load_prices(opts["prices_path"]) if opts["prices_path"] else config.prices(),
        model=opts["model"],
        size=opts["size"],
        n=opts["n"],
    )
