"""The command line: the `cometbatch` group and `run` (other commands: cli_inspect, cli_tools)."""

# The machinery (engine, ledger, views, simulator) is imported inside the commands that use it,
# so that `--help` and a bad option answer at once (bench/startup.py measures it).
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click
from click.core import ParameterSource

from .._version import __version__
from ..errors import CometBatchError, ConfigError
from ..settings import AUTO_MAX_CONCURRENCY, KEY_ENV, RATE_MAX_CONCURRENCY, FsyncPolicy, Layout
from ..streams import guard_std_streams
from ..textsafe import printable
from .inspect import export, gallery, models, status, verify
from .options import (
    DEFAULTS,
    EXIT_INTERRUPTED,
    budget_options,
    console,
    fail,
    internal_error,
    output_folder,
    output_store,
    parse_concurrency,
    raise_open_file_limit,
    reporting_options,
    run_exit_code,
    say,
    setup_logging,
    shown_bounds,
    storage_option,
)
from .tools import fetch, simulate

if TYPE_CHECKING:
    from ..manifest.reader import Manifest
    from ..store.interface import Store
    from .runner import RunOutcome
    from .setup import RunSetup


def _checked_manifest(manifest: Path, setup: RunSetup, *, spinner: bool) -> Manifest:
    """The manifest read and checked with the run's job defaults and models."""
    from ..manifest.reader import load_manifest

    err = console()
    # A million-line manifest takes seconds to check: show that something is happening.
    checking = (
        err.status(f"checking {manifest} …")
        if spinner and err.is_terminal
        else contextlib.nullcontext()
    )
    with checking:
        return load_manifest(
            manifest, model=setup.model, size=setup.size, n=setup.n, registry=setup.registry
        )


def _dry_run(
    loaded: Manifest, setup: RunSetup, out: Path | str, target: Path | Store, json_output: bool
) -> None:
    """Print the plan: per model the work, what the ledger holds, the cost, the caps' verdict."""
    from ..costs.budget import plan_fit
    from ..engine.forecast import run_forecast
    from ..engine.origin import other_manifest
    from ..engine.unanswered import Unanswered
    from ..ledger.clustered import refuse_cluster_output
    from ..ledger.events import LEDGER_NAME
    from ..ledger.index import LedgerState
    from ..store.urls import store_of
    from .report import plan_data, plan_lines

    settings, prices = setup.settings, setup.prices
    store = store_of(target)
    refuse_cluster_output(store)
    # On an object store: a local copy merged from the ledger's segments (None: no ledger).
    found = store.log_copy(LEDGER_NAME)
    ledger = Path(found) if found is not None else Path(store.root) / LEDGER_NAME
    state = LedgerState.load(ledger)
    plan = run_forecast(loaded, loaded.registry, settings, out, state, prices, store=store)
    send = plan.totals().send_images
    fit = plan_fit(settings, ledger, prices, send, plan.to_send)
    other = other_manifest(state.last_run, loaded.path, loaded.sha256)
    # Requests earlier runs sent and never heard back about ("": no run is under way).
    earlier = Unanswered.of(state, "")
    data = plan_data(
        plan, out, loaded.path, fit=fit, other_manifest=other,
        unanswered=(earlier.requests, earlier.images), retry=settings.retry_ambiguous,
    )  # fmt: skip
    click.echo(json.dumps(data) if json_output else "\n".join(map(printable, plan_lines(data))))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cometbatch")
def main() -> None:
    """Batch image generation through CometAPI: resumable, rate-limit aware."""
    # A reader that goes away (`| head`, a closed terminal) silences the output, never the run.
    guard_std_streams()


@main.command(context_settings={"max_content_width": 100})
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    callback=output_folder,
    help="Output folder, or an object store's URL: s3://bucket/prefix, gs://, az://, "
    "memory:// (default: out/<manifest name>).",
)
@storage_option
@click.option(
    "--base-url",
    help="API base URL (default: $COMETAPI_BASE_URL, else https://api.cometapi.com/v1).",
)
@click.option(
    "--concurrency",
    metavar="N|auto",
    callback=parse_concurrency,
    help="Requests in flight at most (backed off on 429s), or 'auto': start at 16 (or "
    "--min-concurrency) and grow while latency and errors hold, up to --max-concurrency. "
    "Default: with --rpm/--ipm, rate x measured latency (up to --max-concurrency); else 16."
    + shown_bounds("concurrency"),
)
# Bounds are Settings' own, checked there (and shown here); click only parses numbers.
@click.option(
    "--max-concurrency",
    type=int,
    metavar="N",
    help=f"Upper bound of --concurrency auto (default {AUTO_MAX_CONCURRENCY}) and of the level "
    f"that follows --rpm/--ipm (default {RATE_MAX_CONCURRENCY})." + shown_bounds("max_concurrency"),
)
@click.option(
    "--min-concurrency",
    type=int,
    metavar="N",
    help="Lower bound when concurrency backs off or adapts (default 1)."
    + shown_bounds("min_concurrency"),
)
@click.option("--rpm", type=float, help="Requests per minute." + shown_bounds("rpm"))
@click.option("--ipm", type=float, help="Images per minute." + shown_bounds("ipm"))
@click.option(
    "--max-attempts",
    type=int,
    default=DEFAULTS["max_attempts"],
    help="Attempts per request, the first included."
    + shown_bounds("max_attempts", default=DEFAULTS["max_attempts"]),
)
@click.option(
    "--timeout",
    type=float,
    default=DEFAULTS["timeout"],
    help="Seconds to wait for one generation."
    + shown_bounds("timeout", default=DEFAULTS["timeout"]),
)
@click.option("--model", help="Model for lines that name none (default dall-e-3).")
@click.option("--size", help="Size for lines that set none.")
@click.option(
    "--n", "n", type=click.IntRange(min=1), help="Images per job for lines that set none."
)
@click.option(
    "--retry-failed", is_flag=True, help="Also retry permanent failures from earlier runs."
)
@click.option(
    "--regenerate-changed",
    is_flag=True,
    help="Regenerate jobs changed since the ledger recorded them (old images are moved to "
    "OUT/replaced/; paid again).",
)
@click.option(
    "--fsync",
    type=click.Choice(get_args(FsyncPolicy)),
    default=DEFAULTS["fsync"],
    show_default=True,
    help="When results reach the disk itself: 'end' flushes each ledger write to the OS "
    "and fsyncs at the end (a crash loses nothing); 'batch' also fsyncs each write (a power "
    "loss loses nothing); 'always' also fsyncs every image before its line.",
)
@click.option(
    "--layout",
    type=click.Choice(get_args(Layout)),
    default=DEFAULTS["layout"],
    show_default=True,
    help="How OUT holds the images: 'files' (images/ plus metadata.jsonl for imagefolder), "
    "'webdataset' (shards/NNNNN.tar) or 'parquet' (shards/NNNNN.parquet).",
)
@click.option(
    "--shard-size",
    type=int,
    default=DEFAULTS["shard_size"],
    help="Images per shard (webdataset, parquet)."
    + shown_bounds("shard_size", default=DEFAULTS["shard_size"]),
)
@click.option(
    "--no-retry-ambiguous",
    is_flag=True,
    help="Do not retry a request that timed out or lost its connection after it was sent "
    "(it may have been billed); it fails as 'ambiguous' instead. Requests an earlier run sent "
    "and never heard back about (a crash) are held back, not sent.",
)
@click.option(
    "--retry-ambiguous",
    is_flag=True,
    help="Send requests an earlier run sent and never heard back about again (the default; "
    "overrides retry_ambiguous = false in the settings file).",
)
@click.option(
    "--model-override",
    "model_override",
    multiple=True,
    metavar="MODEL.FIELD=VALUE",
    help="Change what a model takes, e.g. dall-e-2.max_n=4 or my-model.sizes='[\"512x512\"]' "
    "(repeatable; a new model name adds that model).",
)
@click.option(
    "--models",
    "models_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Models file (TOML, the shape of the built-in models.toml) merged over the built-in "
    "models: change what a model takes or add models and families without code.",
)
@click.option(
    "--allow-insecure-http",
    is_flag=True,
    help="Allow an http:// base URL to a non-loopback host (sends the key unencrypted).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate, read the ledger and show the plan per model with its estimated cost; "
    "send nothing.",
)
@click.option(
    "--prices",
    "prices_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Price file (TOML, or JSON for .json) merged over the built-in list prices.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Settings file (default: ./cometbatch.toml, else [tool.cometbatch] in "
    "./pyproject.toml). Flags override it.",
)
@click.option(
    "--simulate", is_flag=True, help="Run against the built-in simulated API (no key, no network)."
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Run on a Ray cluster: the manifest is cut into shards, each run by a worker into "
    "OUT/shards/ (pip install 'cometbatch[ray]'). OUT must be an object store's URL or a "
    "folder every node sees.",
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    help="The Ray cluster to join with --ray (default: $RAY_ADDRESS, else a local instance).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Shards run at once with --ray (default: the cluster's CPUs).",
)
@budget_options
@reporting_options
@click.pass_context
def run(ctx: click.Context, /, manifest: Path, **options: Any) -> None:
    """Generate every image a manifest (JSONL, .txt or .csv) asks for; run it again to resume.

    Settings come from flags, then COMETAPI_BASE_URL, then a cometbatch.toml (or
    [tool.cometbatch] in pyproject.toml) in the current folder; the key only ever from
    COMETAPI_KEY.

    \b
    Examples:
      cometbatch run jobs/demo.jsonl --simulate
      COMETAPI_KEY=sk-... cometbatch run prompts.jsonl --out out/cats --rpm 300
      cometbatch run prompts.jsonl --dry-run               # plan, done so far, cost
      cometbatch run prompts.txt --model gpt-image-1 --size 1024x1024 --n 4
      cometbatch run prompts.jsonl --concurrency auto --max-concurrency 500
      cometbatch run prompts.jsonl --config team.toml --prices our-prices.toml
      cometbatch run prompts.jsonl --models our-models.toml  # add or change models
      cometbatch run prompts.jsonl --max-images 500 --max-cost 20   # exit 3 at a cap
    """
    from ..simulator.config import SimConfig
    from .progress import choose_mode
    from .report import summary_data, summary_lines
    from .runner import run_manifest
    from .setup import run_setup

    json_output, quiet = bool(options["json_output"]), bool(options["quiet"])
    setup_logging(int(options["verbose"]), quiet)
    out = options["out_dir"] or Path("out") / manifest.stem
    given = {
        name
        for name in options
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    }
    outcome: RunOutcome | None = None
    try:
        setup = run_setup(options, given, os.environ)
        settings, prices = setup.settings, setup.prices
        loaded = _checked_manifest(manifest, setup, spinner=not (quiet or json_output))
        target = output_store(out, options["storage_options"], options["config_path"])
        if options["use_ray"] or {"ray_address", "workers"} & given:
            from .clusterrun import on_cluster

            on_cluster(loaded, setup, out, target, options)
            return
        if options["dry_run"]:
            _dry_run(loaded, setup, out, target, json_output)
            return
        simulate = bool(options["simulate"])
        raise_open_file_limit(settings.max_in_flight, simulate)
        if not simulate and not settings.resolved_key():
            raise ConfigError(
                f"no API key: set {KEY_ENV} (or use --simulate to try the built-in simulated API)"
            )
        outcome = asyncio.run(
            run_manifest(
                loaded,
                settings=settings,
                out_dir=out,
                store=None if isinstance(target, Path) else target,
                # Requests are not kept in memory: a simulated run may be millions long.
                simulate=(
                    SimConfig(latency=0.2, latency_jitter=0.6, record_requests=False)
                    if simulate
                    else None
                ),
                progress=choose_mode(quiet=quiet, json_output=json_output),
                console=console(),
                say=say,
                handle_signals=True,
                prices=prices,
            )
        )
        if outcome.error is not None:
            raise outcome.error
    except CometBatchError as exc:
        so_far = summary_data(outcome.summary, out, outcome.prices) if outcome else None
        fail(exc, json_output=json_output, summary=so_far)
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug of ours: say so plainly, keep the details for -vv
        internal_error(exc, json_output=json_output)
    summary = outcome.summary
    if json_output:
        click.echo(json.dumps(summary_data(summary, out, outcome.prices)))
    else:
        for line in summary_lines(summary, out, outcome.prices):
            say(line)
    sys.exit(run_exit_code(summary))


for _command in (status, gallery, export, verify, fetch, models, simulate):
    main.add_command(_command)
