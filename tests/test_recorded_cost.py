"""One cost rule: what a run recorded is what the budget and `status` count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import ledger_results

from cometbatch.cli.main import main
from cometbatch.views.status import read_status

WIDE_HD = {"id": "wide", "prompt": "a wide hall", "model": "dall-e-3", "n": 2}


def _invoke(*args: str) -> dict[str, object]:
    done = CliRunner().invoke(main, list(args))
    assert done.exit_code == 0, done.output
    data: dict[str, object] = json.loads(done.stdout)
    return data


@pytest.mark.parametrize("afterwards", ["manifest gone", "manifest edited"])
def test_status_shows_the_cost_the_run_recorded(tmp_path: Path, afterwards: str) -> None:
    """Two dall-e-3 hd 1792x1024 images: the ledger, the budget and `status` (CLI and library)
    all say $0.24, whatever the manifest says by the time `status` reads the folder."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({**WIDE_HD, "size": "1792x1024", "quality": "hd"}) + "\n")
    out = tmp_path / "out"
    run = ["run", str(manifest), "--simulate", "--out", str(out), "-q", "--json"]
    _invoke(*run)
    recorded = sum(event["cost"]["usd"] for event in ledger_results(out))
    assert recorded == pytest.approx(0.24)
    again = _invoke(*run, "--max-cost", "5")
    assert again["budget"]["earlier_cost_usd"] == pytest.approx(recorded)  # type: ignore[index]
    if afterwards == "manifest gone":
        manifest.unlink()
    else:
        manifest.write_text(json.dumps(WIDE_HD) + "\n")  # now 1024x1024 standard
    shown = _invoke("status", str(out), "--json")
    assert shown["spend"]["usd"] == pytest.approx(recorded)  # type: ignore[index]
    assert read_status(out).spend_usd == pytest.approx(recorded)
