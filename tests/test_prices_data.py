"""The price data itself: each entry's source and date, gpt-image-2, sizes the table does not
list, answers without output details, unpriced family names, and override files."""

from __future__ import annotations

import json
import tomllib
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cometbatch import Job, PricesError
from cometbatch.cli.main import main
from cometbatch.costs.prices import (
    PRICES_AS_OF,
    CostEstimate,
    actual,
    builtin_prices,
    estimate,
    load_prices,
)
from cometbatch.costs.tokenprices import TokenRates, usage_cost
from cometbatch.plan import Request

PRICES = builtin_prices()
PRICE_FILE = Path(__file__).parent.parent / "cometbatch" / "costs" / "prices.toml"
GPT_IMAGE_2 = ("gpt-image-2", "gpt-image-2-2026-04-21")
# 1536x864 (16:9) is not listed: priced from 1536x1024, the listed size closest in shape.
WIDE = 1536 * 864 / (1536 * 1024)


def requests_of(job: Job, sizes: list[int]) -> list[Request]:
    """The requests a job fans out into, `sizes` images each (as the planner would make them)."""
    out, first = [], 0
    for chunk, n in enumerate(sizes):
        out.append(Request(job, chunk, n, first, {"model": job.model, "n": n}, f"{chunk:016x}"))
        first += n
    return out


def test_every_builtin_entry_names_its_source_and_date() -> None:
    """Each entry has its own source (an https address, or an estimate with its basis) and a
    YYYY-MM-DD date; the file has no global date any more."""
    raw = tomllib.loads(PRICE_FILE.read_text())
    assert "as_of" not in raw
    for name, spec in PRICES.models.items():
        assert spec.source and spec.as_of, name
        assert spec.source.startswith(("https://", "estimate: ")), name
        assert date.fromisoformat(spec.as_of) <= date.fromisoformat(PRICES_AS_OF), name
    assert PRICES.models["qwen-image"].source.startswith("estimate: ")  # type: ignore[union-attr]


@pytest.mark.parametrize("model", GPT_IMAGE_2)
def test_gpt_image_2_and_its_snapshot_are_priced(model: str) -> None:
    """OpenAI's token rates ($5 text in, $8 image in, $30 image out, no text output rate) and
    the per-image output table, the same for the alias and the snapshot."""
    spec = PRICES.models[model]
    assert spec.tokens == TokenRates(text_input=5.0, image_input=8.0, image_output=30.0)
    assert spec.source and "developers.openai.com/api/docs/pricing" in spec.source
    assert spec.as_of == "2026-08-17"
    table = {
        "low": (0.006, 0.005, 0.005),
        "medium": (0.053, 0.041, 0.041),
        "high": (0.211, 0.165, 0.165),
    }
    for quality, prices in table.items():
        for size, price in zip(("1024x1024", "1024x1536", "1536x1024"), prices, strict=True):
            assert PRICES.per_image(model, size, quality) == pytest.approx(price)
    # auto (or nothing) is priced as 1024x1024 medium.
    assert PRICES.per_image(model, "auto", "auto") == pytest.approx(0.053)
    assert PRICES.per_image(model, None, None) == pytest.approx(0.053)


def test_a_gpt_image_2_job_of_14_at_1536x864_is_priced_request_by_request() -> None:
    """The acceptance case: n = 14 at a custom size, planned as 10 + 4, each request priced."""
    job = Job(prompt="x", model="gpt-image-2", n=14, size="1536x864")
    each = 0.041 * WIDE
    assert estimate(job) == pytest.approx(14 * each)
    costs = [estimate(request) for request in requests_of(job, [10, 4])]
    assert costs == [pytest.approx(10 * each), pytest.approx(4 * each)]
    plan = CostEstimate().add_all(requests_of(job, [10, 4]))
    assert plan.unpriced_images == 0 and plan.total == pytest.approx(14 * each)
    assert "as of 2026-08-17" in str(plan)
    assert plan.to_dict()["price_dates"] == {"gpt-image-2": "2026-08-17"}


def test_the_dry_run_prices_a_gpt_image_2_job_and_dates_its_prices(tmp_path: Path) -> None:
    """`run --dry-run` gives the job's cost and the date of the prices it used."""
    manifest = tmp_path / "m.jsonl"
    line = {"id": "w", "prompt": "p", "model": "gpt-image-2", "n": 14, "size": "1536x864"}
    manifest.write_text(json.dumps(line) + "\n")
    args = ["run", str(manifest), "--dry-run", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["cost"]["estimated_usd"] == pytest.approx(14 * 0.041 * WIDE, abs=1e-6)
    assert plan["cost"]["unpriced_images"] == 0
    assert plan["prices"] == "list-price estimates as of 2026-08-17"
    text = CliRunner().invoke(main, args).stdout
    assert "(list-price estimates as of 2026-08-17)" in text


@pytest.mark.parametrize(
    ("size", "quality", "listed", "price"),
    [
        # Wide sizes scale from 1536x1024, tall ones from 1024x1536, square ones from 1024x1024.
        ("1536x864", "high", "1536x1024", 0.165),
        ("864x1536", "low", "1024x1536", 0.005),
        ("3840x2160", "medium", "1536x1024", 0.041),
        ("2048x2048", "high", "1024x1024", 0.211),
        ("1280x1280", None, "1024x1024", 0.053),
        # A 3:1 strip is closest in shape to 1536x1024 (3:2).
        ("3072x1024", "medium", "1536x1024", 0.041),
    ],
)
def test_unlisted_sizes_are_scaled_by_pixel_area(
    size: str, quality: str | None, listed: str, price: float
) -> None:
    """A size gpt-image-2 takes but the table does not list: the listed size of closest aspect
    ratio, scaled by pixel area."""
    width, height = map(int, size.split("x"))
    lw, lh = map(int, listed.split("x"))
    expected = price * width * height / (lw * lh)
    assert PRICES.per_image("gpt-image-2", size, quality) == pytest.approx(expected)


def test_the_closest_shape_is_scaled_not_the_closest_area(tmp_path: Path) -> None:
    """With tall and wide sizes at different prices, a tall size scales from the tall one."""
    path = tmp_path / "p.toml"
    path.write_text("[models.gpt-image-2.per_image.high]\n1024x1536 = 0.10\n1536x1024 = 0.20\n")
    table = load_prices(path)
    assert table.per_image("gpt-image-2", "864x1536", "high") == pytest.approx(0.10 * WIDE)
    assert table.per_image("gpt-image-2", "1536x864", "high") == pytest.approx(0.20 * WIDE)


def test_only_token_priced_models_are_scaled() -> None:
    """dall-e bills per listed size, so an unlisted size has no price; nor has a size that is
    not WIDTHxHEIGHT, or a quality the table does not list."""
    assert PRICES.per_image("dall-e-3", "1536x864", "standard") is None
    assert PRICES.per_image("gpt-image-2", "wide", "medium") is None
    assert PRICES.per_image("gpt-image-2", "1536x864", "ultra") is None


def test_a_star_price_wins_over_scaling(tmp_path: Path) -> None:
    """A quality's "*" price is an explicit price for any size, so it beats the estimate."""
    path = tmp_path / "p.toml"
    path.write_text('[models.gpt-image-2.per_image.medium]\n"*" = 0.02\n')
    table = load_prices(path)
    assert table.per_image("gpt-image-2", "1536x864", "medium") == 0.02
    assert table.per_image("gpt-image-2", "1536x1024", "medium") == pytest.approx(0.041)
    assert table.per_image("gpt-image-2", "1536x864", "high") == pytest.approx(0.165 * WIDE)


@pytest.mark.parametrize("model", ["gpt-image-2.6-flare", "gpt-image-2.5-sunburst", "flux-pro"])
def test_family_names_without_an_entry_are_unpriced(model: str) -> None:
    """A name a family pattern matches gets no price from its relatives: it is unknown."""
    job = Job(prompt="x", model=model, n=3, size="1024x1024", quality="medium")
    assert estimate(job) is None
    plan = CostEstimate().add_all([job])
    assert plan.total is None and plan.unpriced == {f"{model} 1024x1024 medium": 3}
    assert actual(model, {"input_tokens": 10, "output_tokens": 100}, 1) is None


def test_a_family_name_becomes_priced_when_a_price_file_names_it(tmp_path: Path) -> None:
    """An override entry (without source or date) prices it, credited to the file."""
    path = tmp_path / "ours.toml"
    path.write_text(
        '[models."gpt-image-2.6-flare"]\n'
        "tokens = { text_input = 4.0, image_input = 6.0, image_output = 24.0 }\n"
        'per_image."*" = { "*" = 0.03 }\n'
    )
    table = load_prices(path)
    assert estimate(Job(prompt="x", model="gpt-image-2.6-flare", n=3), table) == pytest.approx(0.09)
    spec = table.models["gpt-image-2.6-flare"]
    assert (spec.source, spec.as_of) == (str(path), None)
    assert str(path) in table.describe()


def test_max_cost_refuses_a_family_name_without_a_price(tmp_path: Path) -> None:
    """Under --max-cost a model without a price stops the run before anything is sent."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "p", "model": "gpt-image-2.6-flare", "n": 3}) + "\n")
    args = ["run", str(manifest), "--simulate", "--out", str(tmp_path / "out"), "--max-cost", "5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    assert "has no price" in result.stderr and "Traceback" not in result.output


def test_the_dry_run_names_a_family_name_as_unpriced(tmp_path: Path) -> None:
    """The plan says which images it cannot price and prices the rest."""
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"id": "a", "prompt": "p", "model": "gpt-image-2.6-flare", "n": 2},
        {"id": "b", "prompt": "p", "model": "qwen-image"},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["run", str(manifest), "--dry-run", "--out", str(tmp_path / "out"), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cost = json.loads(result.stdout)["cost"]
    assert cost["unpriced"] == {"gpt-image-2.6-flare": 2}
    assert cost["estimated_usd"] == pytest.approx(0.03)


RATES_2 = TokenRates(text_input=5.0, image_input=8.0, image_output=30.0)


@pytest.mark.parametrize(
    ("usage", "dollars"),
    [
        # A gpt-image-2 answer without output_tokens_details: all output tokens are image output.
        (
            {
                "input_tokens": 805,
                "output_tokens": 7024,
                "total_tokens": 7829,
                "input_tokens_details": {"text_tokens": 37, "image_tokens": 768},
            },
            (37 * 5 + 768 * 8 + 7024 * 30) / 1e6,
        ),
        # With it, the same.
        (
            {
                "input_tokens": 805,
                "output_tokens": 7024,
                "input_tokens_details": {"text_tokens": 37, "image_tokens": 768},
                "output_tokens_details": {"image_tokens": 7024, "text_tokens": 0},
            },
            (37 * 5 + 768 * 8 + 7024 * 30) / 1e6,
        ),
        # Details that name one part only: the other part is the rest of the total.
        (
            {
                "input_tokens": 1050,
                "output_tokens": 1100,
                "input_tokens_details": {"image_tokens": 1000},
                "output_tokens_details": {"text_tokens": 100},
            },
            (50 * 5 + 1000 * 8 + 1100 * 30) / 1e6,
        ),
        # Empty or unreadable details count as absent.
        (
            {"input_tokens": 20, "output_tokens": 272, "output_tokens_details": {}},
            (20 * 5 + 272 * 30) / 1e6,
        ),
        (
            {"input_tokens": 20, "output_tokens": 272, "output_tokens_details": "n/a"},
            (20 * 5 + 272 * 30) / 1e6,
        ),
    ],
)
def test_gpt_image_2_usage_is_priced_with_or_without_details(
    usage: dict[str, Any], dollars: float
) -> None:
    """The answer's usage prices a gpt-image-2 request; output_tokens_details is optional."""
    assert usage_cost(usage, RATES_2) == pytest.approx(dollars)
    assert actual("gpt-image-2", usage, 1, "1024x1024", "high") == pytest.approx(dollars)


def test_partial_output_details_use_the_text_rate_for_the_text_part() -> None:
    """A model that bills the text it writes: text tokens at that rate, the rest as image."""
    rates = TokenRates(text_input=5.0, image_input=8.0, image_output=32.0, text_output=10.0)
    usage = {
        "input_tokens": 10,
        "output_tokens": 1100,
        "output_tokens_details": {"text_tokens": 100},
    }
    assert usage_cost(usage, rates) == pytest.approx((10 * 5 + 1000 * 32 + 100 * 10) / 1e6)


def test_details_never_price_more_tokens_than_the_total() -> None:
    """Details that claim more than the answer's total are believed only up to it: 2,000
    image tokens of a 1,000-token output are priced as 1,000."""
    usage = {
        "input_tokens": 0,
        "output_tokens": 1000,
        "output_tokens_details": {"image_tokens": 2000},
    }
    assert usage_cost(usage, RATES_2) == pytest.approx(1000 * 30 / 1e6)
    both = {**usage, "output_tokens_details": {"image_tokens": 900, "text_tokens": 300}}
    assert usage_cost(both, RATES_2) == pytest.approx((900 * 30 + 100 * 30) / 1e6)


def test_the_list_price_agrees_with_a_recorded_answer() -> None:
    """A recorded 1024x1024 high answer (7,024 output tokens) costs the listed $0.211."""
    usage = {"input_tokens": 40, "output_tokens": 7024}
    assert usage_cost(usage, RATES_2) == pytest.approx(0.211, rel=0.01)


def test_an_override_file_dates_its_entries_and_keeps_the_rest(tmp_path: Path) -> None:
    """A top-level as_of dates the entries the file sets; an entry's own source and date win;
    entries it leaves out keep theirs."""
    path = tmp_path / "ours.toml"
    path.write_text(
        "as_of = 2027-01-05\n"
        "[models.dall-e-3.per_image.hd]\n1024x1024 = 0.07\n"
        "[models.gpt-image-2]\n"
        'source = "https://example.com/our-gateway/prices"\nas_of = "2027-01-02"\n'
        "per_image.medium = { 1024x1024 = 0.05 }\n"
    )
    table = load_prices(path)
    dalle = table.models["dall-e-3"]
    assert (dalle.source, dalle.as_of) == (str(path), "2027-01-05")
    assert table.per_image("dall-e-3", "1024x1792", "hd") == 0.12
    mine = table.models["gpt-image-2"]
    assert (mine.source, mine.as_of) == ("https://example.com/our-gateway/prices", "2027-01-02")
    assert table.per_image("gpt-image-2", "1024x1024", "medium") == 0.05
    assert table.per_image("gpt-image-2", "1536x1024", "medium") == pytest.approx(0.041)
    assert table.models["qwen-image"] == PRICES.models["qwen-image"]
    assert table.as_of == "2027-01-05"


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ('as_of = "last week"\n[models.qwen-image]\nper_image."*" = { "*" = 0.1 }\n', "as_of"),
        ('[models.qwen-image]\nas_of = "2027-13-01"\n', "models.qwen-image.as_of"),
        ('[models.qwen-image]\nsource = ""\n', "models.qwen-image.source"),
        ("[models.qwen-image]\nsource = 3\n", "models.qwen-image.source"),
        ("[models.qwen-image]\nas_of = 2027-01-05T10:00:00Z\n", "models.qwen-image.as_of"),
    ],
)
def test_a_bad_source_or_date_names_the_file_and_entry(
    tmp_path: Path, text: str, entry: str
) -> None:
    """Dates must be YYYY-MM-DD and sources non-empty text; the error names where."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PricesError) as info:
        load_prices(path)
    assert info.value.entry == entry and str(path) in str(info.value)


def test_the_description_reads_well_with_several_dates() -> None:
    """One date reads "as of D"; several, the newest with the oldest named; a subset of models
    gives only their dates."""
    assert PRICES.describe() == f"list-price estimates as of {PRICES_AS_OF}, some from 2026-08-17"
    assert PRICES.describe(["dall-e-3"]) == f"list-price estimates as of {PRICES_AS_OF}"
    assert PRICES.describe(["gpt-image-2", "no-such-model"]) == (
        "list-price estimates as of 2026-08-17"
    )
    assert PRICES.describe(["no-such-model"]) == "list-price estimates"
    plan = CostEstimate().add_all([Job(prompt="x", model="dall-e-3")])
    assert f"(list-price estimates as of {PRICES_AS_OF})" in str(plan)
    assert plan.to_dict()["prices_as_of"] == PRICES_AS_OF
