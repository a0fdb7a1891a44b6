"""The command line: parse options, set up logging and progress, call the library, exit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from . import __version__
from .errors import (
    AuthenticationError,
    CometBatchError,
    ConfigError,
    LedgerError,
    ManifestError,
    OutputError,
)
from .events import LEDGER_NAME
from .fetch import fetch_pending
from .manifest import load_manifest
from .models import ModelRegistry, parse_overrides
from .progress import choose_mode
from .report import (
    fetch_lines,
    model_lines,
    plan_data,
    plan_lines,
    status_lines,
    summary_data,
    summary_lines,
)
from .runner import RunOutcome, run_manifest
from .settings import KEY_ENV, Settings, check_base_url
from .simulator import SimConfig, serve
from .state import LedgerState
from .status import read_status

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Errors about the input or the folder (the user must change something) exit 2.
_USAGE_ERRORS = (ManifestError, ConfigError, LedgerError, AuthenticationError, OutputError)

_F = TypeVar("_F", bound=Callable[..., Any])
err = Console(stderr=True, highlight=False)
# Settings owns the defaults; the options only show them.
_DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}
# The upper bound of --concurrency auto unless --max-concurrency says otherwise.
AUTO_MAX_CONCURRENCY = 256


def say(text: str) -> None:
    """One message on stderr, printed as is (no markup, no wrapping)."""
    err.print(text, markup=False, soft_wrap=True)


def _fail(
    exc: CometBatchError, *, json_output: bool = False, summary: dict[str, Any] | None = None
) -> NoReturn:
    message = str(exc)
    if isinstance(exc, AuthenticationError):
        message = f"the API rejected the key ({exc.status}: {exc}); check {KEY_ENV}"
    if json_output:
        # Scripts read one JSON object from stdout, also when the run could not finish.
        click.echo(json.dumps({**(summary or {}), "error": message}))
    err.print("[red]error:[/red] ", end="", soft_wrap=True)
    say(message)
    sys.exit(EXIT_USAGE if isinstance(exc, _USAGE_ERRORS) else EXIT_FAILED)


def _raise_open_file_limit(concurrency: int, simulate: bool) -> None:
    """Let the process hold the sockets its concurrency needs (a CLI's job, never a library's)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    # Up to two sockets a request (generation and download), twice that when the simulated
    # API's own end of each connection lives in this process, plus files and headroom.
    wanted = concurrency * (4 if simulate else 2) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logging.getLogger("cometbatch").warning(
            "this process may open only %d files, fewer than --concurrency %d needs (%d); "
            "lower --concurrency or raise the limit (ulimit -n)",
            target,
            concurrency,
            wanted,
        )


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    if quiet:
        level = logging.ERROR
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cometbatch: %(levelname)s: %(message)s"))
    root = logging.getLogger("cometbatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _reporting_options(command: _F) -> _F:
    """--json, --quiet and --verbose, shared by the commands that do work."""
    command = click.option(
        "--verbose", "-v", count=True, help="-v: each retry with its reason; -vv: debug."
    )(command)
    command = click.option("--quiet", "-q", is_flag=True, help="Only errors and the summary.")(
        command
    )
    return click.option(
        "--json", "json_output", is_flag=True, help="Print one JSON summary on stdout."
    )(command)


def _concurrency_option(text: str) -> Callable[[_F], _F]:
    return click.option(
        "--concurrency",
        type=click.IntRange(1, 10_000),
        default=_DEFAULTS["concurrency"],
        show_default=True,
        help=text,
    )


def _parse_concurrency(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    """--concurrency: a number of requests in flight, or "auto"."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a whole number nor 'auto'") from None
    if not 1 <= number <= 10_000:
        raise click.BadParameter(f"{number} is not in the range 1<=x<=10000")
    return number


def _concurrency_fields(
    concurrency: int | str, min_concurrency: int | None, max_concurrency: int | None
) -> dict[str, Any]:
    """The Settings fields for --concurrency N|auto, --min-concurrency and --max-concurrency."""
    fields: dict[str, Any] = {}
    if concurrency == "auto":
        fields["auto_concurrency"] = True
        fields["concurrency"] = max_concurrency or AUTO_MAX_CONCURRENCY
    else:
        if max_concurrency is not None:
            raise ConfigError(
                "--max-concurrency bounds --concurrency auto; with a fixed --concurrency N, "
                "N is the maximum"
            )
        fields["concurrency"] = concurrency
    if min_concurrency is not None:
        if min_concurrency > fields["concurrency"]:
            raise ConfigError(
                f"--min-concurrency ({min_concurrency}) is above the maximum concurrency "
                f"({fields['concurrency']})"
            )
        fields["min_concurrency"] = min_concurrency
    return fields


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cometbatch")
def main() -> None:
    """Batch image generation through CometAPI: resumable, rate-limit aware."""


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: out/<manifest name>).",
)
@click.option(
    "--base-url",
    help="API base URL (default: $COMETAPI_BASE_URL, else https://api.cometapi.com/v1).",
)
@click.option(
    "--concurrency",
    metavar="N|auto",
    default=str(_DEFAULTS["concurrency"]),
    callback=_parse_concurrency,
    show_default=True,
    help="Requests in flight at most (backed off on 429s), or 'auto': start at 16 (or "
    "--min-concurrency) and grow while latency and errors hold, up to --max-concurrency.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(1, 10_000),
    metavar="N",
    help=f"Upper bound of --concurrency auto (default {AUTO_MAX_CONCURRENCY}).",
)
@click.option(
    "--min-concurrency",
    type=click.IntRange(1, 10_000),
    metavar="N",
    help="Lower bound when concurrency backs off or adapts (default 1).",
)
@click.option("--rpm", type=click.FloatRange(min=1, min_open=False), help="Requests per minute.")
@click.option("--ipm", type=click.FloatRange(min=1, min_open=False), help="Images per minute.")
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 100),
    default=_DEFAULTS["max_attempts"],
    show_default=True,
    help="Attempts per request, the first included.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=_DEFAULTS["timeout"],
    show_default=True,
    help="Seconds to wait for one generation.",
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
    "--no-retry-ambiguous",
    is_flag=True,
    help="Do not retry a request that timed out or lost its connection after it was sent "
    "(it may have been billed); it fails as 'ambiguous' instead.",
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
    "--allow-insecure-http",
    is_flag=True,
    help="Allow an http:// base URL to a non-loopback host (sends the key unencrypted).",
)
@click.option("--dry-run", is_flag=True, help="Validate and show the plan; send nothing.")
@click.option(
    "--simulate", is_flag=True, help="Run against the built-in simulated API (no key, no network)."
)
@_reporting_options
def run(
    manifest: Path,
    out_dir: Path | None,
    base_url: str | None,
    concurrency: int | str,
    max_concurrency: int | None,
    min_concurrency: int | None,
    rpm: float | None,
    ipm: float | None,
    max_attempts: int,
    timeout: float,
    model: str | None,
    size: str | None,
    n: int | None,
    retry_failed: bool,
    regenerate_changed: bool,
    no_retry_ambiguous: bool,
    model_override: tuple[str, ...],
    allow_insecure_http: bool,
    dry_run: bool,
    simulate: bool,
    json_output: bool,
    quiet: bool,
    verbose: int,
) -> None:
    """Generate every image a JSONL manifest asks for; run it again to resume.

    \b
    Examples:
      cometbatch run jobs/demo.jsonl --simulate
      COMETAPI_KEY=sk-... cometbatch run prompts.jsonl --out out/cats --rpm 300
      cometbatch run prompts.jsonl --model gpt-image-1 --n 4 --dry-run
      cometbatch run prompts.jsonl --concurrency auto --max-concurrency 500
    """
    _setup_logging(verbose, quiet)
    out = out_dir or Path("out") / manifest.stem
    outcome: RunOutcome | None = None
    try:
        overrides = parse_overrides(model_override)
        registry = ModelRegistry().with_overrides(overrides)
        # A million-line manifest takes seconds to check: show that something is happening.
        checking = (
            err.status(f"checking {manifest} …")
            if err.is_terminal and not (quiet or json_output)
            else contextlib.nullcontext()
        )
        with checking:
            loaded = load_manifest(manifest, model=model, size=size, n=n, registry=registry)
        fields: dict[str, Any] = {
            **_concurrency_fields(concurrency, min_concurrency, max_concurrency),
            "rpm": rpm,
            "ipm": ipm,
            "max_attempts": max_attempts,
            "timeout": timeout,
            "retry_failed": retry_failed,
            "regenerate_changed": regenerate_changed,
            "retry_ambiguous": not no_retry_ambiguous,
            "allow_insecure_http": allow_insecure_http,
            "model_overrides": overrides,
        }
        if base_url:
            fields["base_url"] = base_url
        try:
            settings = Settings(**fields)
        except ValidationError as exc:
            raise ConfigError(str(exc.errors(include_url=False)[0]["msg"])) from None
        # Checked here too so that a dry run refuses what the real run would refuse.
        check_base_url(settings.base_url, allow_insecure_http=settings.allow_insecure_http)
        if dry_run:
            done = LedgerState.load(out / LEDGER_NAME).counts().get("ok", 0)
            plan = plan_data(loaded.stats.by_model, out, done)
            click.echo(json.dumps(plan) if json_output else "\n".join(plan_lines(plan)))
            return
        _raise_open_file_limit(settings.concurrency, simulate)
        if not simulate and not settings.resolved_key():
            raise ConfigError(
                f"no API key: set {KEY_ENV} (or use --simulate to try the built-in simulated API)"
            )
        outcome = asyncio.run(
            run_manifest(
                loaded,
                settings=settings,
                out_dir=out,
                # Requests are not kept in memory: a simulated run may be millions long.
                simulate=(
                    SimConfig(latency=0.2, latency_jitter=0.6, record_requests=False)
                    if simulate
                    else None
                ),
                progress=choose_mode(quiet=quiet, json_output=json_output),
                console=err,
                say=say,
                handle_signals=True,
            )
        )
        if outcome.error is not None:
            raise outcome.error
    except CometBatchError as exc:
        so_far = summary_data(outcome.summary, out) if outcome is not None else None
        _fail(exc, json_output=json_output, summary=so_far)
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug of ours: say so plainly, keep the details for -vv
        logging.getLogger("cometbatch").debug("internal error", exc_info=True)
        message = (
            f"internal error (a bug in cometbatch, please report it): {exc!r}; every recorded "
            "result is safe in the ledger, so rerunning resumes; -vv shows the traceback"
        )
        if json_output:
            click.echo(json.dumps({"error": message}))
        say(message)
        sys.exit(EXIT_FAILED)
    summary = outcome.summary
    if json_output:
        click.echo(json.dumps(summary_data(summary, out)))
    else:
        for line in summary_lines(summary, out):
            say(line)
    if summary.interrupted:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_OK if summary.complete else EXIT_FAILED)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def status(out_dir: Path, json_output: bool) -> None:
    """Show what an output folder holds (safe while a run is going)."""
    try:
        data = read_status(out_dir).to_dict()
    except CometBatchError as exc:
        _fail(exc)
    click.echo(json.dumps(data) if json_output else "\n".join(status_lines(data)))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@_concurrency_option("Downloads at a time.")
@_reporting_options
def fetch(out_dir: Path, concurrency: int, json_output: bool, quiet: bool, verbose: int) -> None:
    """Download again the images a run generated but could not download (no key needed).

    Nothing is generated, so nothing is paid again. Image links expire (often within an
    hour); a link that no longer works stays failed, and `run --retry-failed` regenerates it.
    """
    _setup_logging(verbose, quiet)
    try:
        summary = asyncio.run(fetch_pending(out_dir, Settings(concurrency=concurrency)))
    except CometBatchError as exc:
        _fail(exc, json_output=json_output)
    except KeyboardInterrupt:
        say("interrupted; run the same command again to resume")
        sys.exit(EXIT_INTERRUPTED)
    if json_output:
        click.echo(json.dumps(summary_data(summary, out_dir)))
    else:
        for line in fetch_lines(summary, out_dir):
            say(line)
    sys.exit(EXIT_OK if summary.complete else EXIT_FAILED)


@main.command()
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def models(json_output: bool) -> None:
    """List the models cometbatch knows and what each accepts."""
    specs = list(ModelRegistry())
    if json_output:
        click.echo(json.dumps([spec.model_dump(mode="json") for spec in specs]))
    else:
        click.echo("\n".join(model_lines(specs)))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--latency", type=float, default=0.0, show_default=True, help="Seconds per generation."
)
@click.option("--rate-429", type=float, default=0.0, help="Fraction answered 429 with Retry-After.")
@click.option("--rate-429-bare", type=float, default=0.0, help="Fraction answered 429 without it.")
@click.option("--rate-5xx", type=float, default=0.0, help="Fraction answered 5xx.")
@click.option("--rate-drop", type=float, default=0.0, help="Fraction of dropped connections.")
@click.option("--rate-malformed", type=float, default=0.0, help="Fraction of truncated bodies.")
@click.option("--rpm-limit", type=int, help="Requests per minute the server allows.")
@click.option("--ipm-limit", type=int, help="Images per minute the server allows.")
@click.option(
    "--retry-after",
    type=float,
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
    rpm_limit: int | None,
    ipm_limit: int | None,
    retry_after: float,
    content_policy_marker: str | None,
    seed: int | None,
    api_key_env: str | None,
) -> None:
    """Serve the simulated images API (for trying cometbatch or your own code without a key)."""
    _setup_logging(1, False)
    try:
        config = SimConfig(
            latency=latency,
            rate_429=rate_429,
            rate_429_bare=rate_429_bare,
            rate_5xx=rate_5xx,
            rate_drop=rate_drop,
            rate_malformed=rate_malformed,
            rpm_limit=rpm_limit,
            ipm_limit=ipm_limit,
            retry_after=retry_after,
            content_policy_marker=content_policy_marker,
            seed=seed,
            api_key=os.environ.get(api_key_env) if api_key_env else None,
            record_requests=False,
        )
    except ValidationError as exc:
        _fail(ConfigError(str(exc.errors(include_url=False)[0]["msg"])))
    try:
        asyncio.run(serve(config, host, port))
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except OSError as exc:
        _fail(ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"))
