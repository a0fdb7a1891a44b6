"""Commands around a run: fetch (downloads left over) and simulate (the simulated API)."""

# The machinery (engine, ledger, views, simulator) is imported inside the commands that use it,
# so that `--help` and a bad option answer at once (bench/startup.py measures it).
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from ..errors import CometBatchError, ConfigError
from ..settings import KEY_ENV
from ..simulator.config import SimConfig
from ..validation import first_problem
from .options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    concurrency_option,
    fail,
    make_settings,
    output_argument,
    output_store,
    reporting_options,
    say,
    setup_logging,
    storage_option,
)

# A share of requests, 0 to 1: click names the option when a value is out of range.
FRACTION = click.FloatRange(0, 1)
# SimConfig's fields as `simulate` spells them.
_SIM_OPTIONS = {name: "--" + name.replace("_", "-") for name in SimConfig.model_fields}


@click.command()
@click.argument("out_dir", callback=output_argument(exists=True), metavar="OUT")
@concurrency_option("Downloads at a time.")
@reporting_options
@storage_option
def fetch(
    out_dir: Path | str,
    concurrency: int,
    json_output: bool,
    quiet: bool,
    verbose: int,
    storage_options: tuple[str, ...],
) -> None:
    """Download again the images a run generated but could not download (no key needed).

    Nothing is generated, so nothing is paid again. Image links expire (often within an
    hour): a link that no longer works (gone, its downloads failed in 3 runs, or it is over 24
    hours old) counts as a failed generation, which `run --retry-failed` generates again.
    """
    from ..engine.fetch import fetch_pending
    from .report import fetch_lines, summary_data

    setup_logging(verbose, quiet)
    try:
        settings = make_settings({"concurrency": concurrency}, flags={"concurrency"})
        target = output_store(out_dir, storage_options)
        summary = asyncio.run(fetch_pending(target, settings))
    except CometBatchError as exc:
        fail(exc, json_output=json_output)
    except KeyboardInterrupt:
        say("interrupted; run the same command again to resume")
        sys.exit(EXIT_INTERRUPTED)
    if json_output:
        click.echo(json.dumps(summary_data(summary, out_dir)))
    else:
        for line in fetch_lines(summary, out_dir):
            say(line)
    sys.exit(EXIT_OK if summary.complete else EXIT_FAILED)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds per generation.",
)
@click.option(
    "--rate-429", type=FRACTION, default=0.0, help="Fraction answered 429 with Retry-After."
)
@click.option(
    "--rate-429-bare", type=FRACTION, default=0.0, help="Fraction answered 429 without it."
)
@click.option("--rate-5xx", type=FRACTION, default=0.0, help="Fraction answered 5xx.")
@click.option("--rate-drop", type=FRACTION, default=0.0, help="Fraction of dropped connections.")
@click.option("--rate-malformed", type=FRACTION, default=0.0, help="Fraction of truncated bodies.")
@click.option(
    "--rate-short", type=FRACTION, default=0.0, help="Fraction of n>1 requests answered half."
)
@click.option(
    "--rpm-limit", type=click.IntRange(min=1), help="Requests per minute the server allows."
)
@click.option(
    "--ipm-limit", type=click.IntRange(min=1), help="Images per minute the server allows."
)
@click.option(
    "--retry-after",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds in the Retry-After header of injected 429s.",
)
@click.option(
    "--content-policy-marker",
    metavar="TEXT",
    help="Refuse prompts containing TEXT as a content-policy violation (400).",
)
@click.option("--seed", type=int, help="Seed for the injected faults (repeatable runs).")
@click.option(
    "--api-key-env", default=None, help=f"Require the key from this variable (e.g. {KEY_ENV})."
)
def simulate(
    host: str,
    port: int,
    latency: float,
    rate_429: float,
    rate_429_bare: float,
    rate_5xx: float,
    rate_drop: float,
    rate_malformed: float,
    rate_short: float,
    rpm_limit: int | None,
    ipm_limit: int | None,
    retry_after: float,
    content_policy_marker: str | None,
    seed: int | None,
    api_key_env: str | None,
) -> None:
    """Serve the simulated images API (for trying cometbatch or your own code without a key)."""
    from ..simulator.server import serve

    setup_logging(1, False)
    try:
        config = SimConfig(
            latency=latency,
            rate_429=rate_429,
            rate_429_bare=rate_429_bare,
            rate_5xx=rate_5xx,
            rate_drop=rate_drop,
            rate_malformed=rate_malformed,
            rate_short=rate_short,
            rpm_limit=rpm_limit,
            ipm_limit=ipm_limit,
            retry_after=retry_after,
            content_policy_marker=content_policy_marker,
            seed=seed,
            api_key=os.environ.get(api_key_env) if api_key_env else None,
            record_requests=False,
        )
    except ValidationError as exc:
        # The options' own ranges catch most values; what is left (the fault rates adding up
        # to more than 1) is named by its options, never by pydantic's field names.
        fail(ConfigError(str(first_problem(exc, _SIM_OPTIONS))))
    try:
        asyncio.run(serve(config, host, port))
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except OSError as exc:
        fail(ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"))
