"""What the command line shows: summaries, plans, status and models as data and lines (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..costs.budget import BUDGET_REASONS, PlanFit, cap_text
from ..costs.prices import format_usd
from ..engine.forecast import Forecast
from ..engine.origin import other_manifest_text
from ..engine.resume import LINK_GONE
from ..engine.summary import Summary
from ..ledger.events import LEDGER_NAME
from ..models.spec import ModelSpec
from ..store.setaside import REPLACED_DIR
from .snapshot import eta_text
from .unanswered import crash_lines, unanswered_lines

if TYPE_CHECKING:
    from ..costs.prices import PriceTable

# Changed jobs named in a plan; the rest are counted.
MAX_NAMED = 10
_STOPS = "the run would stop at the cap (exit 3) and leave the rest for a rerun with a higher one"


def _under(out: Path | str, name: str) -> str:
    """Where `name` is in OUT, as a message names it (a path, or a URL)."""
    return str(out / name) if isinstance(out, Path) else f"{out}/{name}"


def _ledger_at(out: Path | str) -> str:
    """Where the ledger is: a file in a folder; a folder of segments on an object store."""
    return _under(out, LEDGER_NAME) if isinstance(out, Path) else f"{out}/ledger/"


def summary_data(
    summary: Summary, out: Path | str, prices: PriceTable | None = None
) -> dict[str, Any]:
    """The `run --json` object; with the prices the run was counted at, its spend."""
    data = {**summary.to_dict(), "out_dir": str(out), "ledger": _ledger_at(out)}
    if prices is not None:
        data["spend"] = {
            "estimated_usd": round(summary.spent_usd, 6),
            "unpriced_images": summary.unpriced_images,
            "prices": prices.describe(),
        }
    return data


def summary_lines(summary: Summary, out: Path | str, prices: PriceTable | None = None) -> list[str]:
    """The end-of-run report for a person."""
    sim = " [simulated API]" if summary.simulated else ""
    if summary.planned_requests == 0:
        return [f"nothing to do: the manifest has no jobs{sim}"]
    nothing_sent = summary.ok_requests == summary.failed_requests == 0
    earlier = summary.skipped_requests or summary.kept_failures
    # Held-back requests are pending: the full report says so.
    held = summary.held_unanswered
    if nothing_sent and earlier and not held and summary.stopped not in BUDGET_REASONS:
        return [*_nothing_sent_lines(summary, out, sim), *_restored_lines(summary, out)]
    rate = summary.images_written / summary.elapsed_s if summary.elapsed_s else 0.0
    lines = [
        f"{summary.images_written} image(s) written in {summary.elapsed_s:.1f} s "
        f"({rate:.1f}/s) to {_under(out, 'images')}{sim}",
        f"requests: {summary.ok_requests} ok, {summary.failed_requests} failed, "
        f"{summary.skipped_requests} already done, {summary.pending_requests} pending; "
        f"retries {summary.retries} (429s {summary.rate_limited}), "
        f"possibly billed twice: {summary.possibly_billed_twice}",
    ]
    pace = summary.pace.text() if summary.pace is not None else ""
    if pace:
        lines.append(f"rate: {pace}")
    if prices is not None and (summary.ok_requests or summary.failed_requests):
        unpriced = summary.unpriced_images
        unknown = f"; {unpriced} image(s) of unknown price" if unpriced else ""
        sim = " (simulated: nothing was billed)" if summary.simulated else ""
        spent = format_usd(summary.spent_usd)
        lines.append(f"spent: about {spent}{sim} ({prices.describe()}{unknown})")
    lines += [f"  failed ({kind}): {count}" for kind, count in sorted(summary.failures.items())]
    if summary.kept_failures:
        lines.append(
            f"  {summary.kept_failures} permanent failure(s) from earlier runs kept; "
            "use --retry-failed to try them again"
        )
    if summary.regenerated_requests:
        lines.append(
            f"  {summary.regenerated_requests} changed request(s) regenerated; their old images "
            f"are in {_under(out, REPLACED_DIR)}"
        )
    lines += _restored_lines(summary, out)
    if summary.failures.get("download"):
        lines.append(
            f"  images generated but not downloaded are kept with their links: "
            f"`cometbatch fetch {out}` or the next run tries them again (nothing is generated "
            f"again); a link that no longer works ({LINK_GONE}) counts as a failed "
            "generation, which --retry-failed generates again (paid again)"
        )
    if summary.stopped in BUDGET_REASONS and summary.budget is not None:
        lines.append(
            f"stopped at the budget cap {cap_text(summary.budget)}; run again with a higher "
            f"--{summary.stopped.replace('_', '-')} to continue (nothing done is sent again)"
        )
    elif summary.stopped:
        lines.append(f"stopped: {summary.stopped}")
    if summary.cut_off_requests:
        lines.append(
            f"  {summary.cut_off_requests} request(s) cut off after they were sent: they may "
            "have been billed; the next run sends them again unless --no-retry-ambiguous holds "
            "them back"
        )
    lines += unanswered_lines(summary)
    if summary.interrupted:
        lines.append("interrupted: run the same command again to resume")
    return lines


def _nothing_sent_lines(summary: Summary, out: Path | str, sim: str) -> list[str]:
    """A run that sent nothing: all done, or done but for failures kept from earlier runs."""
    done = f"{summary.skipped_requests} request(s), {summary.skipped_images} image(s) in {out}"
    if not summary.kept_failures:
        return [f"everything was already done: {done}; nothing was sent{sim}"]
    return [
        f"nothing was sent{sim}: already done {done}",
        f"  {summary.kept_failures} request(s) failed permanently in earlier runs and were "
        "kept; rerun with --retry-failed to try them again (paid again)",
    ]


def _restored_lines(summary: Summary, out: Path | str) -> list[str]:
    """What the run found gone or damaged under ok lines, and how it restored it."""
    lines = []
    if summary.regenerated_missing:
        lines.append(
            f"  {summary.regenerated_missing} request(s) generated again: images their ok "
            f"lines named were gone or damaged (what was left is in {_under(out, REPLACED_DIR)})"
        )
    if summary.restored_images:
        lines.append(
            f"  {summary.restored_images} image(s) recorded again, put back from where they had "
            "been set aside or downloaded again from their links (nothing was generated for them)"
        )
    return lines


def fetch_lines(summary: Summary, out: Path | str) -> list[str]:
    """The report of `cometbatch fetch`."""
    if summary.planned_requests == 0:
        return [f"nothing to fetch: no request in {out} is waiting for a download"]
    lines = [
        f"{summary.images_written} image(s) downloaded to {_under(out, 'images')} for "
        f"{summary.ok_requests} of {summary.planned_requests} request(s)"
    ]
    if summary.failed_requests:
        lines.append(
            f"  {summary.failed_requests} request(s) still waiting ({summary.failed_images} "
            f"image(s)); a link that no longer works ({LINK_GONE}) counts as a failed "
            "generation, which `cometbatch run --retry-failed` generates again (paid again)"
        )
    return lines


def plan_data(
    forecast: Forecast,
    out: Path | str,
    manifest: Path,
    *,
    fit: PlanFit | None = None,
    other_manifest: str | None = None,
    unanswered: tuple[int, int] = (0, 0),
    retry: bool = True,
) -> dict[str, Any]:
    """The `run --dry-run --json` object."""
    # `fit`: the plan against the caps; `other_manifest`: the manifest the folder's last run
    # recorded, when it was another one.
    totals = forecast.totals()
    return {
        "dry_run": True,
        "manifest": str(manifest),
        "out_dir": str(out),
        "models": {name: p.to_dict() for name, p in sorted(forecast.by_model.items())},
        "totals": totals.to_dict(),
        "done_requests": totals.done_requests,
        "changed_jobs": forecast.changed_jobs[:MAX_NAMED],
        "changed_job_count": len(forecast.changed_jobs),
        "cost": forecast.to_send.to_dict(),
        "cost_all": forecast.everything.to_dict(),
        # The dates of the prices the cost to send used (the whole table's when it used none).
        "prices": forecast.prices.describe(forecast.to_send.by_model or None),
        "budget": None if fit is None else fit.to_dict(),
        "other_manifest": other_manifest,
        "earlier_unanswered": {"requests": unanswered[0], "images": unanswered[1]},
        "retry_ambiguous": retry,
    }


def plan_lines(data: dict[str, Any]) -> list[str]:
    """The dry-run plan for a person, from `plan_data`."""
    header = (
        f"{'model':<20} {'jobs':>7} {'requests':>9} {'images':>8} {'done':>8} "
        f"{'to send':>8} {'est. cost':>10}"
    )
    lines = [f"plan for {data['manifest']} into {data['out_dir']}", header]
    rows = [*data["models"].items(), ("total", data["totals"])]
    lines += [
        f"{name:<20} {p['jobs']:>7} {p['requests']:>9} {p['images']:>8} "
        f"{p['done_requests']:>8} {p['send_requests']:>8} {format_usd(p['estimated_usd']):>10}"
        for name, p in rows
    ]
    totals = data["totals"]
    cost = data["cost"]
    unpriced = ""
    if cost["unpriced_images"]:
        unpriced = f"; {cost['unpriced_images']} image(s) of unknown price: " + ", ".join(
            cost["unpriced"]
        )
    lines.append(
        f"to send: {totals['send_requests']} request(s), {totals['send_images']} image(s); "
        f"estimated cost {format_usd(cost['estimated_usd'])} ({data['prices']}{unpriced})"
    )
    if totals["done_requests"]:
        lines.append(
            f"already done: {totals['done_requests']} request(s), {totals['done_images']} "
            "image(s), skipped without a request"
        )
    earlier = data.get("earlier_unanswered") or {}
    if earlier.get("requests"):
        then = (
            "the run sends them again (possibly billed twice; --no-retry-ambiguous holds them back)"
            if data.get("retry_ambiguous", True)
            else "the run holds them back (--retry-ambiguous sends them)"
        )
        lines.append(
            f"sent and never answered by an earlier run: {earlier['requests']} request(s), "
            f"{earlier['images']} image(s), which may have been billed; {then}"
        )
    if totals["fetch_requests"]:
        lines.append(
            f"{totals['fetch_requests']} request(s) only need their images downloaded "
            "(nothing is generated or paid again)"
        )
    if totals["kept_requests"]:
        lines.append(
            f"{totals['kept_requests']} permanent failure(s) from earlier runs kept; "
            "--retry-failed would send them again"
        )
    if data["changed_job_count"]:
        named = ", ".join(data["changed_jobs"])
        more = data["changed_job_count"] - len(data["changed_jobs"])
        lines.append(
            f"{data['changed_job_count']} job(s) changed since the ledger recorded them ({named}"
            f"{f', and {more} more' if more else ''}): the run refuses them without "
            "--regenerate-changed"
        )
    if data.get("other_manifest"):
        new = (totals["new_jobs"], totals["new_requests"], totals["new_images"])
        text = other_manifest_text(data["out_dir"], data["other_manifest"], data["manifest"], new)
        lines.append(f"warning: {text}")
    if data.get("budget"):
        lines += fit_lines(data["budget"])
    lines.append("dry run: nothing was sent")
    return lines


def fit_lines(fit: dict[str, Any]) -> list[str]:
    """Whether a plan fits under each cap set, from `PlanFit.to_dict()`, and by how much not."""
    lines = []
    if fit["max_images"] is not None:
        total = fit["earlier_images"] + fit["send_images"]
        sums = (
            f"{fit['earlier_images']} made in the folder + {fit['send_images']} to send = {total}"
        )
        if fit["images_over"]:
            lines.append(
                f"does not fit under --max-images {fit['max_images']}: {sums}, "
                f"{fit['images_over']} over; {_STOPS}"
            )
        else:
            lines.append(f"fits under --max-images {fit['max_images']}: {sums}")
    if fit["max_cost"] is not None:
        cap = format_usd(fit["max_cost"])
        earlier, send = fit["earlier_cost_usd"], fit["send_cost_usd"]
        sums = (
            f"about {format_usd(earlier)} spent in the folder + {format_usd(send)} to send = "
            f"{format_usd(earlier + send)}"
        )
        if fit["unpriced_images"]:
            lines.append(
                f"cannot tell whether it fits under --max-cost {cap}: {fit['unpriced_images']} "
                "image(s) to send have no price, and the run stops before the first of them "
                "(give them one with --prices)"
            )
        elif fit["cost_over_usd"]:
            lines.append(
                f"does not fit under --max-cost {cap}: {sums}, "
                f"{format_usd(fit['cost_over_usd'])} over; {_STOPS}"
            )
        else:
            lines.append(f"fits under --max-cost {cap}: {sums}")
    return lines


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return eta_text(seconds)


def status_lines(data: dict[str, Any]) -> list[str]:
    """`status` for a person, from `FolderStatus.to_dict()`."""
    span = ""
    if data["first_at"]:
        span = f", {data['first_at']} to {data['last_at']} ({_span(data.get('span_s'))})"
    state = data.get("state", "")
    lines = [f"{data['out_dir']}: {state}, {data['runs']} run(s){span}"]
    if data.get("state_detail"):
        lines.append(f"  {data['state_detail']}")
    if cluster := data.get("cluster"):
        lines.append(f"  cluster: {cluster['shards_done']} of {cluster['shards']} shard(s) done")
    pending_known = data.get("pending_requests") is not None
    columns = ["ok", "failed", *(["pending"] if pending_known else [])]
    titles = {"ok": "done", "failed": "failed", "pending": "pending"}
    header = "".join(f"{titles[c]:>16}" for c in columns)
    lines.append(f"  {'model':<20}{header}   (requests / images)")
    for name, item in [*data["by_model"].items(), ("total", data)]:
        pairs = [(item[c + "_requests"] or 0, item[c + "_images"] or 0) for c in columns]
        cells = "".join(f"{f'{requests} / {images}':>16}" for requests, images in pairs)
        lines.append(f"  {name:<20}{cells}")
    if data.get("manifest_note"):
        lines.append(f"  {data['manifest_note']}")
    for kind, count in data["failures"].items():
        lines.append(f"  failed ({kind}): {count}, e.g. {data['failure_examples'][kind]}")
    if data["awaiting_download"]:
        lines.append(
            f"  {data['awaiting_download']} image(s) generated but not downloaded: "
            f"`cometbatch fetch {data['out_dir']}` tries them again"
        )
    if data.get("links_gone"):
        lines.append(
            f"  {data['links_gone']} image(s) whose links no longer work ({LINK_GONE}): failed "
            "generations; `cometbatch run MANIFEST --retry-failed` generates them again (paid "
            "again)"
        )
    spend = data.get("spend")
    if spend:
        unpriced = (
            f"; {spend['unpriced_images']} image(s) of unknown price"
            if spend["unpriced_images"]
            else ""
        )
        if spend.get("simulated_runs"):
            unpriced += f"; {spend['simulated_runs']} simulated run(s): nothing was billed"
        lines.append(
            f"  spent: about {format_usd(spend['usd'])} ({spend['prices']}; from usage "
            f"tokens where the answers had them{unpriced})"
        )
    layout = data.get("layout") or {}
    if layout.get("shards") or layout.get("name", "files") != "files":
        lines.append(
            f"  layout {layout['name']}: {layout['packed_images']} image(s) in "
            f"{layout['shards']} shard(s) under shards/"
        )
    twice = data.get("possibly_billed_twice", data["ambiguous_retries"])
    lines.append(f"  retries {data['retries']}, possibly billed twice {twice}")
    return lines + crash_lines(data)


def model_lines(specs: Iterable[ModelSpec], families: Iterable[ModelSpec] = ()) -> list[str]:
    """`models` for a person: two lines per model (what it takes, its source), then families."""
    lines = [line for spec in specs for line in _spec_lines(spec)]
    family_lines = [line for spec in families for line in _spec_lines(spec)]
    if family_lines:
        lines.append(
            "families (a name not listed above takes the rules of the pattern it matches):"
        )
        lines += family_lines
    return lines


def _spec_lines(spec: ModelSpec) -> list[str]:
    params = ", ".join(sorted([*spec.params, *spec.int_ranges])) or "-"
    answers = "/".join(spec.response_formats)
    source = spec.source or "-"
    dated = f" (as of {spec.as_of})" if spec.as_of else ""
    return [
        f"{spec.name:<22} max n {spec.max_n:<3} answers {answers:<13} "
        f"sizes {spec.describe_sizes()}; params {params}",
        f"{'':<22} source: {source}{dated}",
    ]


def model_data(specs: Iterable[ModelSpec], families: Iterable[ModelSpec] = ()) -> list[Any]:
    """`models --json`: every model, then every family (named by its pattern), as data."""
    return [
        *({"kind": "model", **spec.model_dump(mode="json")} for spec in specs),
        *({"kind": "family", **spec.model_dump(mode="json")} for spec in families),
    ]
