"""`run --ray`: the manifest on a Ray cluster, one live display on the driver, one summary."""

# Imported by `run` only when --ray is given: the work is in cometbatch.cluster.
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from ..cluster.connect import import_ray
from ..cluster.driver import ClusterOutcome, ClusterProgress, cluster_store, run_on_ray
from ..cluster.plan import Shards, plan_shards, shard_out
from ..cluster.summaries import summary_of
from ..errors import ConfigError
from ..manifest.reader import Manifest
from ..store.interface import Store
from ..textsafe import printable
from .options import console, fail, run_exit_code, say, storage_settings
from .progress import Mode, ProgressDisplay, choose_mode
from .report import summary_data, summary_lines
from .runner import STOP_SIGNALS
from .setup import RunSetup
from .snapshot import Snapshot


def on_cluster(
    loaded: Manifest,
    setup: RunSetup,
    out: Path | str,
    target: Path | Store,
    options: dict[str, Any],
) -> None:
    """`run --ray`: the dry run or the run itself on the cluster (cli/clusterrun.py)."""
    if not options["use_ray"]:
        raise ConfigError("--ray-address and --workers go with --ray")
    if options["simulate"]:
        raise ConfigError(
            "--simulate runs in one process: with --ray, start `cometbatch simulate` and pass "
            "its --base-url"
        )
    storage = {} if isinstance(target, Path) else storage_settings(
        options["storage_options"], options["config_path"]
    )  # fmt: skip
    json_output = bool(options["json_output"])
    root = cluster_store(out, storage)
    if options["dry_run"]:
        cluster_dry_run(loaded, out, root, storage, options["workers"], json_output)
        return
    import_ray()  # a missing extra is a clear error before anything is written
    mode = choose_mode(quiet=bool(options["quiet"]), json_output=json_output)
    cluster_run(
        loaded, setup, out, storage, address=options["ray_address"],
        workers=options["workers"], mode=mode, json_output=json_output,
    )  # fmt: skip


def cluster_snapshot(progress: ClusterProgress) -> Snapshot:
    """What the display shows of the whole cluster at one moment."""
    return Snapshot(
        done=progress.images_done,
        failed=progress.images_failed,
        total=progress.images_planned,
        in_flight=progress.in_flight,
        limit=progress.limit,
        retries=progress.retries,
        rate_limited=progress.rate_limited,
        probing=False,
        processed=progress.images_processed,
        workers=progress.workers,
        workers_alive=progress.workers_alive,
    )


class _Latest:
    """The driver's latest figures, read by the display (none yet: RuntimeError)."""

    def __init__(self) -> None:
        self.progress: ClusterProgress | None = None

    def __call__(self) -> Snapshot:
        if self.progress is None:
            raise RuntimeError("no progress yet")
        return cluster_snapshot(self.progress)

    def update(self, progress: ClusterProgress) -> None:
        self.progress = progress


class _Stops:
    """First Ctrl-C (SIGTERM, SIGHUP): the cluster stops taking work; a second: stop at once."""

    def __init__(self, stop: asyncio.Event, grace: float) -> None:
        self.stop, self.grace = stop, grace
        self.driver: asyncio.Task[ClusterOutcome] | None = None
        self.signals = 0

    def __call__(self) -> None:
        self.signals += 1
        if self.signals == 1:
            self.stop.set()
            say(
                f"stopping: the workers let their requests in flight finish (up to "
                f"{self.grace:.0f} s); press Ctrl-C again to quit now"
            )
        elif self.driver is not None:
            self.driver.cancel()


async def _drive(
    loaded: Manifest,
    setup: RunSetup,
    out: Path | str,
    storage: dict[str, Any],
    address: str | None,
    workers: int | None,
    mode: Mode,
) -> ClusterOutcome:
    settings = setup.settings
    stop = asyncio.Event()
    stops = _Stops(stop, settings.grace_period)
    latest = _Latest()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError):  # pragma: no cover - Windows
                loop.add_signal_handler(sig, stops)
                installed.append(sig)
        async with ProgressDisplay(latest, mode=mode, console=console()):
            driving = run_on_ray(
                loaded, out, settings, address=address, workers=workers,
                storage_options=storage, on_progress=latest.update, prices=setup.prices,
                stop=stop,
            )  # fmt: skip
            stops.driver = asyncio.create_task(driving)
            return await stops.driver
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def cluster_run(
    loaded: Manifest,
    setup: RunSetup,
    out: Path | str,
    storage: dict[str, Any],
    *,
    address: str | None,
    workers: int | None,
    mode: Mode,
    json_output: bool,
) -> None:
    """Run on the cluster; print one summary (with `--json`, its cluster figures); exit."""
    try:
        # Ray prints what it hears from the cluster (a worker that died) on stdout: that is
        # for the one JSON object here, so Ray's lines go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            outcome = asyncio.run(_drive(loaded, setup, out, storage, address, workers, mode))
    except asyncio.CancelledError:
        say("interrupted: the shards' ledgers keep what was done; rerun to resume")
        sys.exit(130)
    summary = summary_of(outcome.summary)
    data = {**summary_data(summary, out, setup.prices), "cluster": outcome.cluster}
    # Each shard is an ordinary output with its own ledger.
    data["ledger"] = str(shard_out(out, "*")) + "/ledger.jsonl"
    if outcome.error is not None:
        fail(outcome.error, json_output=json_output, summary=data)
    if json_output:
        click.echo(json.dumps(data))
    else:
        # What each line names (images/, replaced/) is in every shard's own output.
        for line in summary_lines(summary, shard_out(out, "*"), setup.prices):
            say(line)
        say(_cluster_line(outcome.cluster))
    sys.exit(max(outcome.exit_code, run_exit_code(summary)))


def _cluster_line(cluster: dict[str, int]) -> str:
    restarts = cluster["worker_restarts"]
    again = f"; {restarts} worker restart(s), their shards resumed" if restarts else ""
    return (
        f"cluster: {cluster['shards_done']} of {cluster['shards']} shard(s) done, "
        f"{cluster['workers']} worker(s){again}"
    )


def cluster_dry_run(
    loaded: Manifest,
    out: Path | str,
    root: Store,
    storage: dict[str, Any],
    workers: int | None,
    json_output: bool,
) -> None:
    """`--dry-run --ray`: how the manifest is cut into shards, and which are done; no Ray."""
    width = workers or os.cpu_count() or 1
    shards = asyncio.run(plan_shards(loaded, root, out, width, storage, write=False))
    data = dry_data(shards, loaded, out, width)
    if json_output:
        click.echo(json.dumps(data))
        return
    for line in dry_lines(data):
        click.echo(printable(line))


def dry_data(shards: Shards, loaded: Manifest, out: Path | str, workers: int) -> dict[str, Any]:
    """The `run --ray --dry-run --json` object."""
    to_run = shards.to_run()
    return {
        "dry_run": True,
        "manifest": str(loaded.path),
        "out_dir": str(out),
        "cluster": {
            "shards": shards.plan.shards,
            "new_plan": shards.new,
            "shards_done": len(shards.done),
            "shards_to_run": len(to_run),
            "workers": workers,
        },
        "requests": loaded.stats.requests,
        "images": loaded.stats.images,
        "to_run": {
            "requests": sum(shards.cuts[s].requests for s in to_run),
            "images": sum(shards.cuts[s].images for s in to_run),
        },
    }


def dry_lines(data: dict[str, Any]) -> list[str]:
    """The cluster dry run for a person, from `dry_data`."""
    cluster, to_run = data["cluster"], data["to_run"]
    made = "a new plan" if cluster["new_plan"] else "the plan kept in OUT/cluster/plan.json"
    return [
        f"cluster plan for {data['manifest']} into {data['out_dir']}: {cluster['shards']} "
        f"shard(s) ({made})",
        f"{cluster['shards_done']} shard(s) done, {cluster['shards_to_run']} to run on up to "
        f"{cluster['workers']} worker(s): {to_run['requests']} request(s), "
        f"{to_run['images']} image(s) in them (done keys inside are skipped)",
        "dry run: nothing was sent",
    ]
