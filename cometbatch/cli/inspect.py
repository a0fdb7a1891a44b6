"""Commands that read an output folder or the registry: status, gallery, export, verify, models."""

# The machinery (engine, ledger, views, simulator) is imported inside the commands that use it,
# so that `--help` and a bad option answer at once (bench/startup.py measures it).
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from ..errors import CometBatchError
from ..settings import DEFAULT_SHARD_SIZE, SHARD_LAYOUTS
from ..textsafe import printable
from ..views import EXPORT_FORMATS
from .config import load_config, model_overrides
from .options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    fail,
    internal_error,
    output_argument,
    output_store,
    reported_errors,
    say,
    setup_logging,
    storage_option,
)

# OUT: a local folder, or an object store's URL (s3://bucket/prefix, ...).
_OUT = output_argument()
_DEST = output_argument(optional=True)
_FILE = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.argument("out_dir", callback=_OUT, metavar="OUT")
@click.option(
    "--manifest",
    type=_FILE,
    help="The manifest, for pending work (default: the one the latest run recorded).",
)
@click.option("--prices", "prices_path", type=_FILE, help="Price file for the spend estimate.")
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@storage_option
def status(
    out_dir: Path | str,
    manifest: Path | None,
    prices_path: Path | None,
    json_output: bool,
    storage_options: tuple[str, ...],
) -> None:
    """Show done / failed / pending per model, failures, spend and retries of an output folder.

    Read-only and without the folder's lock: safe while a run is writing it, and on a folder
    whose run crashed. A cluster run's output (`run --ray`) is shown whole: its shards summed,
    and how many of them are done.

    \b
    Examples:
      cometbatch status out/demo
      cometbatch status out/demo --json | jq .pending_images
    """
    from ..costs.prices import load_prices
    from ..views.clusterstatus import read_output_status
    from .report import status_lines

    setup_logging(0, False)
    try:
        prices = load_prices(prices_path) if prices_path else None
        out = output_store(out_dir, storage_options)
        data = read_output_status(out, manifest=manifest, prices=prices).to_dict()
    except CometBatchError as exc:
        fail(exc, json_output=json_output)
    except Exception as exc:
        internal_error(exc, json_output=json_output)
    # Failure examples and holder info come from the server and the ledger: shown escaped.
    text = json.dumps(data) if json_output else "\n".join(map(printable, status_lines(data)))
    click.echo(text)


@click.command()
@click.argument("out_dir", callback=_OUT, metavar="OUT")
@click.option(
    "--manifest",
    type=_FILE,
    help="The manifest, for prompts and sizes (default: the one the latest run recorded).",
)
@storage_option
def gallery(out_dir: Path | str, manifest: Path | None, storage_options: tuple[str, ...]) -> None:
    """Write OUT/index.html, a self-contained page of the folder's images (of every shard, for a
    cluster run's output); print its path.

    \b
    Example:
      cometbatch gallery out/demo && xdg-open out/demo/index.html
    """
    from ..views.gallery.content import publish_gallery

    setup_logging(0, False)
    with reported_errors(f"the gallery in {out_dir}"):
        page = publish_gallery(output_store(out_dir, storage_options), manifest)
    click.echo(printable(str(page)))


@click.command()
@click.argument("out_dir", callback=_OUT, metavar="OUT")
@click.argument("dest", callback=_DEST, metavar="[DEST]", required=False)
@click.option(
    "--format",
    "format_name",
    type=click.Choice(EXPORT_FORMATS),
    help="openai-batch: Batch API output lines; csv: a table; jsonl: flat JSON records.",
)
@click.option("--output", "-o", "output", type=_FILE, help="Write to this file (default: stdout).")
@click.option(
    "--layout",
    type=click.Choice(SHARD_LAYOUTS),
    help="Pack the images of a files-layout OUT into dataset shards in DEST instead.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(1, 100_000),
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Images per shard (with --layout).",
)
@storage_option
def export(
    out_dir: Path | str,
    dest: Path | str | None,
    format_name: str | None,
    output: Path | None,
    layout: str | None,
    shard_size: int,
    storage_options: tuple[str, ...],
) -> None:
    """Export the ledger, one line per job (reads the ledger only; safe during a run); or,
    with --layout, convert a finished files-layout output into dataset shards in DEST.

    \b
    Examples:
      cometbatch export out/demo --format csv -o results.csv
      cometbatch export out/demo --format openai-batch > batch_output.jsonl
      cometbatch export out/demo out/demo-wds --layout webdataset --shard-size 1000
    """
    setup_logging(0, False)
    if layout is not None:
        if dest is None or format_name is not None or output is not None:
            raise click.UsageError("--layout takes OUT and DEST (and no --format or --output)")
        _convert(out_dir, dest, layout, shard_size, storage_options)
        return
    if format_name is None or dest is not None:
        raise click.UsageError("give --format (one line per job) or DEST --layout (shards)")
    from ..views.export import export as export_ledger

    with reported_errors(str(output)):
        out = output_store(out_dir, storage_options)
        if output is None:
            count = export_ledger(out, format_name, sys.stdout)
        else:
            temporary = output.with_name(f".{output.name}.tmp")
            try:
                # newline="": the CSV writer ends its own lines.
                with temporary.open("w", encoding="utf-8", newline="") as stream:
                    count = export_ledger(out, format_name, stream)
                temporary.replace(output)
            finally:
                temporary.unlink(missing_ok=True)
            say(f"{count} job(s) written to {output}")


def _convert(
    out_dir: Path | str, dest: Path | str, layout: str, shard_size: int, options: tuple[str, ...]
) -> None:
    """export --layout: pack OUT's images into shards in DEST and say what was written."""
    from ..views.convert import convert

    with reported_errors(str(dest)):
        source, target = output_store(out_dir, options), output_store(dest, options)
        done = asyncio.run(convert(source, target, layout=layout, shard_size=shard_size))
    say(f"{done.samples} image(s) in {done.shards} {layout} shard(s) written to {dest}/shards")
    if done.left_out:
        say(f"{done.left_out} request(s) of jobs not in the recorded manifest were left out")


@click.command()
@click.argument("out_dir", callback=_OUT, metavar="OUT")
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@storage_option
def verify(out_dir: Path | str, json_output: bool, storage_options: tuple[str, ...]) -> None:
    """Check every image the ledger records as ok: there, its recorded size and sha256, and
    structurally whole (PNG chunks and CRCs to IEND, JPEG to EOI, WebP's RIFF): a check of
    the file's structure, not a decode of its pixels. Each bad file is named (exit 1) and its
    request marked in the ledger, so that the next run of the manifest generates it again;
    exit 0 when all are good.

    Takes the folder's lock: it refuses while a run is writing the folder. A cluster run's
    output is checked shard by shard, each bad file named by its path under OUT.

    \b
    Example:
      cometbatch verify out/demo || cometbatch run jobs/demo.jsonl --out out/demo
    """
    from ..ledger.verify import report_lines, verify_folder

    setup_logging(0, False)
    try:
        report = asyncio.run(verify_folder(output_store(out_dir, storage_options)))
    except CometBatchError as exc:
        fail(exc, json_output=json_output)
    except KeyboardInterrupt:
        say("interrupted: nothing was marked")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        internal_error(exc, json_output=json_output)
    if json_output:
        click.echo(json.dumps(report.to_dict()))
    else:
        # Paths come from the ledger: shown escaped.
        click.echo("\n".join(map(printable, report_lines(report))))
    sys.exit(EXIT_OK if report.ok else EXIT_FAILED)


@click.command()
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@click.option(
    "--models",
    "models_path",
    type=_FILE,
    help="Models file merged over the built-in models (as `run --models`).",
)
@click.option(
    "--config",
    "config_path",
    type=_FILE,
    help="Settings file (default: ./cometbatch.toml, else [tool.cometbatch] in "
    "./pyproject.toml): its models_file and [models.NAME] tables apply.",
)
def models(json_output: bool, models_path: Path | None, config_path: Path | None) -> None:
    """List the models and model families cometbatch knows, what each accepts, and where
    those rules come from (source and date), as a run here would see them.

    \b
    Examples:
      cometbatch models
      cometbatch models --models our-models.toml --json
    """
    from ..models.registry import load_registry
    from .report import model_data, model_lines

    setup_logging(0, False)
    try:
        config = load_config(config_path)
        registry = load_registry(models_path or config.models_file(), model_overrides(config, {}))
    except CometBatchError as exc:
        fail(exc, json_output=json_output)
    specs, families = list(registry), registry.families
    if json_output:
        click.echo(json.dumps(model_data(specs, families)))
    else:
        # Sources may come from a user's file: shown escaped.
        click.echo("\n".join(map(printable, model_lines(specs, families))))
