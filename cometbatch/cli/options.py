"""What every command shares: the stderr console, one-line errors, logging, common options."""

# The machinery (engine, ledger, views, simulator) is imported inside the commands that use it,
# so that `--help` and a bad option answer at once (bench/startup.py measures it).
from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import annotated_types
import click
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from ..errors import (
    AuthenticationError,
    CometBatchError,
    ConfigError,
    LedgerError,
    ManifestError,
    OutputError,
)
from ..settings import DEFAULT_CONCURRENCY, KEY_ENV, Settings
from ..textsafe import PrintableFormatter, printable
from ..validation import first_problem

if TYPE_CHECKING:
    from ..engine.summary import Summary
    from ..store.interface import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUDGET, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Errors about the input or the folder (the user must change something) exit 2.
USAGE_ERRORS = (ManifestError, ConfigError, LedgerError, AuthenticationError, OutputError)

F = TypeVar("F", bound=Callable[..., Any])
# Settings owns the defaults; the options only show them.
DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}

_console: Console | None = None
# Characters of an internal error's repr that its one line shows.
MAX_SHOWN = 300


def console() -> Console:
    """The stderr console, made on first use (so NO_COLOR is read when a command runs)."""
    from .progress import make_console

    global _console
    if _console is None:
        _console = make_console()
    return _console


def reset_console() -> Console:
    """A fresh stderr console for this command (NO_COLOR and the stream read again)."""
    from .progress import make_console

    global _console
    _console = make_console()
    return _console


def say(*lines: str) -> None:
    """A message on stderr, one line per argument, as is, with controls escaped (\\n stays)."""
    # Messages quote server and ledger text: an escape code in it must not reach the terminal,
    # and a newline in it must not forge a line of its own.
    console().print("\n".join(map(printable, lines)), markup=False, soft_wrap=True)


def fail(
    exc: CometBatchError, *, json_output: bool = False, summary: dict[str, Any] | None = None
) -> NoReturn:
    """Print one clear error (a line per thing it lists) and the JSON scripts wait for; exit."""
    lines = exc.lines()
    if isinstance(exc, AuthenticationError) and exc.status is not None:
        lines = [f"the API rejected the key ({exc.status}: {exc}); check {KEY_ENV}"]
    if json_output:
        # Scripts read one JSON object from stdout, also when the run could not finish.
        click.echo(json.dumps({**(summary or {}), "error": "\n".join(lines)}))
    console().print("[red]error:[/red] ", end="", soft_wrap=True)
    say(*lines)
    sys.exit(EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILED)


def internal_error(exc: Exception, *, json_output: bool = False) -> NoReturn:
    """A bug of ours: one plain line (the traceback only with -vv), exit 1."""
    logging.getLogger("cometbatch").debug("internal error", exc_info=True)
    shown = repr(exc)
    if len(shown) > MAX_SHOWN:  # an error may carry a whole file: the traceback has it
        shown = shown[: MAX_SHOWN - 1] + "\u2026"
    message = (
        f"internal error (a bug in cometbatch, please report it): {shown}; every recorded "
        "result is safe in the ledger, so rerunning resumes; -vv shows the traceback"
    )
    if json_output:
        click.echo(json.dumps({"error": message}))
    say(message)
    sys.exit(EXIT_FAILED)


@contextlib.contextmanager
def reported_errors(writing: str) -> Iterator[None]:
    """For a command that writes a file: any error becomes one line and an exit code."""
    try:
        yield
    except CometBatchError as exc:
        fail(exc)
    except OSError as exc:
        say(f"error: cannot write {writing}: {exc.strerror or exc}")
        sys.exit(EXIT_USAGE)
    except Exception as exc:
        internal_error(exc)


def setup_logging(verbose: int, quiet: bool) -> None:
    """-v: info (each retry with its reason), -vv: debug, --quiet: errors only."""
    err = reset_console()
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
        handler.setFormatter(PrintableFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PrintableFormatter("cometbatch: %(levelname)s: %(message)s"))
    root = logging.getLogger("cometbatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def reporting_options(command: F) -> F:
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


def budget_options(command: F) -> F:
    """--max-images and --max-cost: caps over the whole output folder."""
    command = click.option(
        "--max-cost",
        type=float,
        metavar="USD",
        help="Stop before the folder's spend (list-price estimates, usage tokens where "
        f"answered; requests in flight counted) would pass USD; exit {EXIT_BUDGET}. Counts "
        "earlier runs too: rerun with a higher cap to continue." + shown_bounds("max_cost"),
    )(command)
    return click.option(
        "--max-images",
        type=int,
        metavar="N",
        help="Stop before the folder would hold more than N generated images (earlier runs "
        f"and requests in flight counted); exit {EXIT_BUDGET}. Rerun with a higher cap to "
        "continue." + shown_bounds("max_images"),
    )(command)


def run_exit_code(summary: Summary) -> int:
    """`run`'s exit code for a run that ended without an error."""
    from ..costs.budget import BUDGET_REASONS

    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.stopped in BUDGET_REASONS:
        return EXIT_BUDGET
    return EXIT_OK if summary.complete else EXIT_FAILED


def concurrency_option(text: str) -> Callable[[F], F]:
    """--concurrency N for commands without an adaptive level."""
    return click.option(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=text + shown_bounds("concurrency", default=DEFAULT_CONCURRENCY),
    )


def raise_open_file_limit(concurrency: int, simulate: bool) -> None:
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
            "this process may open only %d files, fewer than %d requests in flight need (%d); "
            "lower --concurrency (--max-concurrency with --rpm/--ipm) or raise the limit "
            "(ulimit -n)",
            target,
            concurrency,
            wanted,
        )


def parse_concurrency(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> int | str | None:
    """--concurrency: a number of requests in flight, or "auto" (None: not given)."""
    if value is None:
        return None
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a whole number nor 'auto'") from None


def output_folder(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> Path | str | None:
    """--out as a Path, or a store's URL as it is; an empty value is refused (it would name
    the current folder)."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter(
            "is empty: name an output folder (without --out, the folder is out/<manifest name>)"
        )
    return value if _URL.match(value) else Path(value)


def output_argument(
    exists: bool = False, optional: bool = False
) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """The OUT argument's check: a local folder as click.Path checks it, or a store's URL."""
    folder = click.Path(file_okay=False, exists=exists, path_type=Path)

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | str | None:
        if value is None and optional:
            return None
        assert value is not None  # click gives a required argument
        return value if _URL.match(value) else folder.convert(value, param, ctx)

    return convert


# As store.urls.is_url, without importing the store here (startup time).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


def storage_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--storage-option KEY=VALUE (repeatable): an option of the object store's filesystem."""
    return click.option(
        "--storage-option",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="An option for the object store's filesystem (e.g. endpoint_url=...), repeatable; "
        "with the [storage] table of the settings file. Values are never printed.",
    )(command)


def output_store(
    out: Path | str, pairs: Sequence[str], config_path: Path | None = None
) -> Path | Store:
    """What a command reads or writes: a local folder as it is, or the store a URL names
    (options from the settings file's [storage] table, then --storage-option)."""
    if not isinstance(out, str) or not _URL.match(out):
        if pairs:
            raise ConfigError("--storage-option applies to an object store's URL only")
        return Path(out)
    from ..store.urls import open_store

    return open_store(out, storage_settings(pairs, config_path))


def storage_settings(pairs: Sequence[str], config_path: Path | None = None) -> dict[str, Any]:
    """An object store's options: the settings file's [storage] table, then --storage-option."""
    from ..store.urls import parse_storage_options
    from .config import load_config

    return {**load_config(config_path).get_storage(), **parse_storage_options(pairs)}


def concurrency_fields(
    concurrency: int | str | None, min_concurrency: int | None, max_concurrency: int | None
) -> dict[str, Any]:
    """The Settings fields for --concurrency N|auto, --min-concurrency and --max-concurrency."""
    fields: dict[str, Any] = {}
    if concurrency == "auto":
        fields["auto_concurrency"] = True
    elif concurrency is not None:
        fields["concurrency"] = concurrency
    if max_concurrency is not None:
        fields["max_concurrency"] = max_concurrency
    if min_concurrency is not None:
        fields["min_concurrency"] = min_concurrency
    return fields


def shown_bounds(name: str, *, default: object = None) -> str:
    """A Settings field's bounds (and a default) as click shows a range: "  [default: 8; 1<=x]"."""
    low: tuple[str, object] | None = None
    high: tuple[str, object] | None = None
    for bound in Settings.model_fields[name].metadata:
        if isinstance(bound, annotated_types.Ge):
            low = ("<=", bound.ge)
        elif isinstance(bound, annotated_types.Gt):
            low = ("<", bound.gt)
        elif isinstance(bound, annotated_types.Le):
            high = ("<=", bound.le)
        elif isinstance(bound, annotated_types.Lt):
            high = ("<", bound.lt)
    # Click's own wording: "1<=x<=100" with both bounds, "x>=1" or "x>0" with one.
    if low and high:
        shown = f"{low[1]}{low[0]}x{high[0]}{high[1]}"
    elif low:
        shown = f"x{low[0].replace('<', '>')}{low[1]}"
    else:
        shown = f"x{high[0]}{high[1]}" if high else ""
    extra = [f"default: {default}"] if default is not None else []
    extra += [shown] if shown else []
    return f"  [{'; '.join(extra)}]" if extra else ""


def make_settings(fields: Mapping[str, Any], flags: Collection[str] = ()) -> Settings:
    """Settings from these fields; one ConfigError naming the first bad one (as --flag if given)."""
    try:
        return Settings(**fields)
    except ValidationError as exc:
        names = {name: "--" + name.replace("_", "-") for name in flags}
        raise ConfigError(str(first_problem(exc, names))) from None
