"""`run --dry-run`: the per-model plan with what is done and its cost, and not one request."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cometbatch import Simulator, load_manifest
from cometbatch.cli.main import main
from cometbatch.costs.prices import PRICES_AS_OF

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "jobs" / "demo.jsonl"


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


async def test_dry_run_of_the_demo_plans_and_prices_and_sends_nothing(tmp_path: Path) -> None:
    """Per model jobs/requests/images and a dated cost; the simulator counts zero requests."""
    async with Simulator() as sim:
        args = ["run", str(DEMO), "--dry-run", "--base-url", sim.base_url, "--out", str(tmp_path)]
        code, text, _ = await asyncio.to_thread(invoke, *args)
        code_json, raw, _ = await asyncio.to_thread(invoke, *args, "--json")
        assert sim.stats.requests == 0
    assert code == code_json == 0
    assert "dall-e-3" in text and "gpt-image-1" in text and "est. cost" in text
    assert f"list-price estimates as of {PRICES_AS_OF}" in text
    assert "dry run: nothing was sent" in text
    plan = json.loads(raw)
    manifest = load_manifest(DEMO)
    assert plan["totals"]["jobs"] == manifest.stats.jobs
    assert plan["totals"]["requests"] == manifest.stats.requests
    assert plan["totals"]["images"] == manifest.stats.images == 60
    assert plan["totals"]["done_requests"] == 0
    for name, model in manifest.stats.by_model.items():
        got = plan["models"][name]
        assert (got["jobs"], got["requests"], got["images"]) == (
            model.jobs,
            model.requests,
            model.images,
        )
        assert got["send_requests"] == model.requests
    assert plan["cost"]["estimated_usd"] > 0 and plan["cost"]["prices_as_of"] == PRICES_AS_OF
    assert not (tmp_path / "ledger.jsonl").exists()


def test_dry_run_on_a_half_done_folder_shows_the_remaining_work(tmp_path: Path) -> None:
    """After running half of the demo's lines, the plan counts those done and prices the rest."""
    lines = [x for x in DEMO.read_text().splitlines() if x.strip() and not x.startswith("#")]
    half = tmp_path / "half.jsonl"
    half.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    out = tmp_path / "out"
    code, _, _ = invoke("run", str(half), "--simulate", "--out", str(out), "--quiet")
    assert code == 0
    first = load_manifest(half).stats
    everything = load_manifest(DEMO).stats

    code, raw, _ = invoke("run", str(DEMO), "--dry-run", "--out", str(out), "--json")
    assert code == 0
    plan = json.loads(raw)
    totals = plan["totals"]
    assert (totals["done_requests"], totals["done_images"]) == (first.requests, first.images)
    assert totals["send_requests"] == everything.requests - first.requests
    assert totals["send_images"] == everything.images - first.images
    for name, model in first.by_model.items():
        assert plan["models"][name]["done_requests"] == model.requests
    # The remaining work costs less than the whole plan.
    assert 0 < plan["cost"]["estimated_usd"] < plan["cost_all"]["estimated_usd"]

    code, text, _ = invoke("run", str(DEMO), "--dry-run", "--out", str(out))
    assert f"already done: {first.requests} request(s)" in text


def test_prices_file_changes_the_estimate_and_is_named(tmp_path: Path) -> None:
    """--prices merges a price file over the built-in table; the label names the file."""
    prices = tmp_path / "ours.toml"
    prices.write_text('as_of = "2027-01-01"\n[models.qwen-image.per_image."*"]\n"*" = 1.0\n')
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "prompt": "p", "model": "qwen-image", "n": 3}\n')
    args = ["run", str(manifest), "--dry-run", "--out", str(tmp_path / "o")]
    code, raw, _ = invoke(*args, "--prices", str(prices), "--json")
    assert code == 0
    plan = json.loads(raw)
    assert plan["cost"]["estimated_usd"] == 3.0
    assert plan["models"]["qwen-image"]["estimated_usd"] == 3.0
    assert "as of 2027-01-01" in plan["prices"] and str(prices) in plan["prices"]
    prices.write_text("[models.qwen-image]\nper_image = 3\n")
    code, _, err = invoke(*args, "--prices", str(prices))
    assert code == 2 and str(prices) in err


def test_text_manifest_takes_model_size_and_n_for_every_line(tmp_path: Path) -> None:
    """A .txt manifest's lines all get --model, --size and --n (seen in the plan)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n# skipped\n\na snowy owl\n")
    code, raw, _ = invoke(
        "run", str(prompts), "--dry-run", "--json", "--out", str(tmp_path / "o"),
        "--model", "gpt-image-1-mini", "--size", "1024x1024", "--n", "3",
    )  # fmt: skip
    assert code == 0
    plan = json.loads(raw)
    assert list(plan["models"]) == ["gpt-image-1-mini"]
    assert (plan["totals"]["jobs"], plan["totals"]["images"]) == (2, 6)


def test_csv_manifest_is_planned(tmp_path: Path) -> None:
    """A .csv manifest runs through the same plan; --n fills empty cells."""
    table = tmp_path / "t.csv"
    table.write_text("id,prompt,model,n\nmug,a mug,dall-e-2,\ncup,a cup,dall-e-2,4\n")
    code, raw, _ = invoke(
        "run", str(table), "--dry-run", "--json", "--n", "2", "--out", str(tmp_path / "o")
    )
    assert code == 0
    assert json.loads(raw)["models"]["dall-e-2"]["images"] == 6


def test_changed_jobs_are_named_in_the_plan(tmp_path: Path) -> None:
    """A job edited since the ledger recorded it is flagged, as the run would refuse it."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "prompt": "p", "model": "qwen-image"}\n')
    out = tmp_path / "out"
    assert invoke("run", str(manifest), "--simulate", "--out", str(out), "-q")[0] == 0
    manifest.write_text('{"id": "a", "prompt": "p2", "model": "qwen-image"}\n')
    code, text, _ = invoke("run", str(manifest), "--dry-run", "--out", str(out))
    assert code == 0
    assert "1 job(s) changed since the ledger recorded them (a)" in text
    assert "--regenerate-changed" in text


def test_a_bad_manifest_in_a_dry_run_exits_2_listing_every_problem(tmp_path: Path) -> None:
    """The dry run refuses an invalid manifest as the run would: exit 2, every bad line named."""
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(
        '{"prompt": "fine"}\n{oops\n{"prompt": "x", "n": 0}\n{"model": "dall-e-3"}\n'
    )
    result = CliRunner().invoke(main, ["run", str(manifest), "--dry-run", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"].startswith(f"{manifest}: 3 invalid manifest line")
    for fragment in ("line 2", "line 3, field 'n'", "line 4, field 'prompt'"):
        assert fragment in result.stderr


def _two_jobs(tmp_path: Path) -> Path:
    manifest = tmp_path / "two.jsonl"
    jobs = [{"id": name, "prompt": f"a {name}", "model": "dall-e-3"} for name in ("fox", "owl")]
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return manifest


def test_a_deleted_image_is_planned_as_one_request_with_its_cost_and_the_run_sends_it(
    tmp_path: Path,
) -> None:
    """An ok key whose file was deleted is not done: the dry run plans it as one request with
    its price, and the run then sends exactly that and pays that much."""
    manifest, out = _two_jobs(tmp_path), tmp_path / "out"
    assert invoke("run", str(manifest), "--simulate", "--out", str(out), "--quiet")[0] == 0
    (out / "images" / "fox" / "0.webp").unlink()

    code, raw, _ = invoke("run", str(manifest), "--dry-run", "--out", str(out), "--json")
    assert code == 0
    plan = json.loads(raw)
    totals = plan["totals"]
    assert (totals["done_requests"], totals["send_requests"], totals["send_images"]) == (1, 1, 1)
    assert plan["cost"]["estimated_usd"] == pytest.approx(0.04)  # dall-e-3 1024x1024

    args = ["run", str(manifest), "--simulate", "--out", str(out), "--quiet", "--json"]
    code, raw, _ = invoke(*args)
    summary = json.loads(raw)
    assert code == 0 and summary["regenerated_missing"] == 1
    assert (summary["skipped_requests"], summary["ok_requests"]) == (1, 1)
    assert summary["spent_usd"] == pytest.approx(plan["cost"]["estimated_usd"])


def test_an_image_marked_by_verify_and_whole_again_is_planned_as_free(tmp_path: Path) -> None:
    """A key verify marked whose file is whole again is put back without a request: the dry
    run counts it done at no cost, and the run sends nothing."""
    manifest, out = _two_jobs(tmp_path), tmp_path / "out"
    assert invoke("run", str(manifest), "--simulate", "--out", str(out), "--quiet")[0] == 0
    image = out / "images" / "fox" / "0.webp"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    assert invoke("verify", str(out))[0] == 1  # marked
    image.write_bytes(data)  # restored from a copy

    code, raw, _ = invoke("run", str(manifest), "--dry-run", "--out", str(out), "--json")
    plan = json.loads(raw)
    assert code == 0 and plan["totals"]["send_requests"] == 0
    assert plan["totals"]["done_requests"] == 2 and plan["cost"]["estimated_usd"] == 0

    args = ["run", str(manifest), "--simulate", "--out", str(out), "--quiet", "--json"]
    code, raw, _ = invoke(*args)
    summary = json.loads(raw)
    assert code == 0 and summary["restored_images"] == 1 and summary["spent_usd"] == 0
