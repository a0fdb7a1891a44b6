"""Prices as data: list-price estimates, spend from usage tokens, and override files."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cometbatch import ConfigError, Job, ModelRegistry, PricesError, Result
from cometbatch.costs.prices import (
    PRICES_AS_OF,
    CostEstimate,
    actual,
    builtin_prices,
    estimate,
    format_usd,
    load_prices,
    spent,
)
from cometbatch.costs.tokenprices import usage_cost
from cometbatch.models.registry import BUILTIN_MODELS
from cometbatch.plan import plan_job
from cometbatch.results import ImageRecord, PendingDownload
from cometbatch.simulator.rules import ImageRequest, usage_for

PRICES = builtin_prices()


@pytest.mark.parametrize(
    ("model", "size", "quality", "price"),
    [
        ("dall-e-2", "256x256", None, 0.016),
        ("dall-e-2", "512x512", "standard", 0.018),
        ("dall-e-2", "1024x1024", None, 0.020),
        ("dall-e-3", "1024x1024", "standard", 0.040),
        ("dall-e-3", "1024x1792", "standard", 0.080),
        ("dall-e-3", "1792x1024", None, 0.080),
        ("dall-e-3", "1024x1024", "hd", 0.080),
        ("dall-e-3", "1792x1024", "hd", 0.120),
        ("gpt-image-1", "1024x1024", "low", 0.011),
        ("gpt-image-1", "1024x1024", "medium", 0.042),
        ("gpt-image-1", "1024x1024", "high", 0.167),
        ("gpt-image-1", "1536x1024", "low", 0.016),
        ("gpt-image-1", "1024x1536", "medium", 0.063),
        ("gpt-image-1", "1024x1536", "high", 0.25),
        ("gpt-image-1-mini", "1024x1024", "low", 0.005),
        ("gpt-image-1-mini", "1024x1024", "medium", 0.011),
        ("gpt-image-1-mini", "1024x1024", "high", 0.036),
        ("gpt-image-1.5", "1024x1024", "high", 0.133),
        ("qwen-image", "1024x1024", None, 0.030),
    ],
)
def test_builtin_table_holds_the_list_prices(
    model: str, size: str, quality: str | None, price: float
) -> None:
    """Each model, size and quality is priced at its published list price per image."""
    assert PRICES.per_image(model, size, quality) == pytest.approx(price)


@pytest.mark.parametrize(
    ("model", "size", "quality", "price"),
    [
        ("dall-e-2", None, None, 0.020),
        ("dall-e-3", None, None, 0.040),
        ("dall-e-3", None, "hd", 0.080),
        ("gpt-image-1", None, None, 0.042),
        ("gpt-image-1", "auto", "auto", 0.042),
        ("gpt-image-1", "1536x1024", "auto", 0.063),
        ("gpt-image-1-mini", "auto", "low", 0.005),
        ("qwen-image", "1328x1328", None, 0.030),
    ],
)
def test_unset_and_auto_values_are_priced_as_the_defaults(
    model: str, size: str | None, quality: str | None, price: float
) -> None:
    """No size or quality (or "auto") is priced as the model's default size and quality."""
    assert PRICES.per_image(model, size, quality) == pytest.approx(price)


def test_every_builtin_model_size_and_quality_has_a_price() -> None:
    """Every size and quality the model registry accepts is in the built-in table."""
    for spec in BUILTIN_MODELS:
        sizes = [size for size in spec.sizes or (None,) if size != "auto"]
        qualities = [q for q in spec.params.get("quality") or (None,) if q != "auto"]
        for size in sizes:
            for quality in qualities:
                assert PRICES.per_image(spec.name, size, quality) is not None, (spec.name, size)


def test_the_date_is_the_files_newest_and_is_shown() -> None:
    """PRICES_AS_OF is the newest entry date in prices.toml, and the description names it."""
    text = (Path(__file__).parent.parent / "cometbatch" / "costs" / "prices.toml").read_text()
    dates = [entry["as_of"] for entry in tomllib.loads(text)["models"].values()]
    assert max(dates) == PRICES_AS_OF
    assert PRICES.as_of == PRICES_AS_OF
    assert "estimates as of " + PRICES_AS_OF in PRICES.describe()


def test_unknown_models_and_sizes_are_unknown_not_errors() -> None:
    """An unpriced model or size gives None, shown as "unknown"; nothing raises."""
    assert estimate(Job(prompt="x", model="flux-pro", size="640x480")) is None
    assert PRICES.per_image("dall-e-2", "640x480", None) is None
    assert PRICES.per_image("dall-e-3", "1024x1024", "ultra") is None
    assert actual("flux-pro", None, 2) is None
    assert format_usd(None) == "unknown"


def test_a_job_is_priced_per_image_and_its_requests_add_up() -> None:
    """A job costs n images; the requests it fans out into cost the same in total."""
    job = Job(prompt="x", model="gpt-image-1", n=14, quality="low")
    assert estimate(job) == pytest.approx(14 * 0.011)
    requests = list(plan_job(job, ModelRegistry().get(job.model)))
    assert len(requests) == 2
    assert sum(estimate(r) or 0 for r in requests) == pytest.approx(14 * 0.011)


def test_dall_e_3_defaults_follow_the_api() -> None:
    """A dall-e-3 job without size or quality is priced as 1024x1024 standard."""
    assert estimate(Job(prompt="x", n=3)) == pytest.approx(0.12)


@pytest.mark.parametrize(
    ("model", "usage", "dollars"),
    [
        # gpt-image-1: $5/M text in, $10/M image in, $40/M image out.
        (
            "gpt-image-1",
            {
                "input_tokens": 1050,
                "output_tokens": 4160,
                "input_tokens_details": {"text_tokens": 50, "image_tokens": 1000},
            },
            (50 * 5 + 1000 * 10 + 4160 * 40) / 1e6,
        ),
        # Without input details every input token is text.
        ("gpt-image-1", {"input_tokens": 20, "output_tokens": 272}, (20 * 5 + 272 * 40) / 1e6),
        # gpt-image-1-mini: $2/M text in, $2.5/M image in, $8/M image out.
        (
            "gpt-image-1-mini",
            {
                "input_tokens": 110,
                "output_tokens": 1056,
                "input_tokens_details": {"text_tokens": 10, "image_tokens": 100},
            },
            (10 * 2 + 100 * 2.5 + 1056 * 8) / 1e6,
        ),
        # gpt-image-1.5 bills text it writes at its own rate.
        (
            "gpt-image-1.5",
            {
                "input_tokens": 10,
                "output_tokens": 1100,
                "output_tokens_details": {"image_tokens": 1000, "text_tokens": 100},
            },
            (10 * 5 + 1000 * 32 + 100 * 10) / 1e6,
        ),
    ],
)
def test_actual_spend_comes_from_usage_tokens(
    model: str, usage: dict[str, Any], dollars: float
) -> None:
    """A gpt-image answer's usage tokens price it, whatever the per-image table says."""
    assert actual(model, usage, 1, "1024x1024", "high") == pytest.approx(dollars)


@pytest.mark.parametrize(
    "usage",
    [None, {}, {"input_tokens": "12", "output_tokens": 4}, {"input_tokens": 1}, [1, 2]],
)
def test_actual_falls_back_to_the_per_image_price(usage: Any) -> None:
    """Without usable usage tokens the spend is images times the per-image price."""
    assert actual("gpt-image-1", usage, 3, "1536x1024", "low") == pytest.approx(3 * 0.016)
    assert usage_cost(usage, PRICES.models["gpt-image-1"].tokens) is None  # type: ignore[arg-type]


def test_models_without_token_rates_ignore_usage() -> None:
    """dall-e-3 is billed per image even if an answer carries usage; no image costs nothing."""
    usage = {"input_tokens": 10, "output_tokens": 10}
    assert actual("dall-e-3", usage, 2, "1024x1792", "hd") == pytest.approx(0.24)
    assert actual("dall-e-3", None, 0) == 0.0


def test_simulated_usage_agrees_with_the_per_image_price() -> None:
    """The simulator's token counts price close to the list price per image."""
    for quality, size, price in [("low", "1024x1024", 0.011), ("high", "1536x1024", 0.25)]:
        request = ImageRequest("gpt-image-1", "x", 2, "b64_json", "png", size, quality, False, True)
        dollars = actual("gpt-image-1", usage_for(request), 2, size, quality)
        assert dollars == pytest.approx(2 * price, rel=0.02)


def _result(status: str, **fields: Any) -> Result:
    job = Job(id="j", prompt="x", model="dall-e-3", n=2, quality="hd")
    return Result("run", job, 0, 2, status, "f" * 16, **fields)


def _image(index: int) -> ImageRecord:
    return ImageRecord(index, f"images/j/{index}.png", "png", 10, "0" * 64)


def test_spent_counts_only_what_this_run_paid_for() -> None:
    """Reused and failed results cost nothing; generated images cost even if not downloaded."""
    images = (_image(0), _image(1))
    assert spent(_result("ok", images=images)) == pytest.approx(0.16)
    assert spent(_result("ok", images=images, reused=True)) == 0.0
    assert spent(_result("failed", error={"kind": "bad_request"})) == 0.0
    pending = (PendingDownload(1, "http://127.0.0.1/x.png"),)
    assert spent(_result("download_failed", images=images[:1], downloads=pending)) == (
        pytest.approx(0.16)
    )


def test_a_plan_estimate_names_what_it_could_not_price() -> None:
    """A CostEstimate totals priced images and lists the unpriced ones with the price date."""
    plan = CostEstimate().add_all(
        [
            Job(prompt="a", model="dall-e-3", n=2),
            Job(prompt="b", model="gpt-image-1", quality="high"),
            Job(prompt="c", model="flux-pro", n=3),
        ]
    )
    assert plan.total == pytest.approx(0.08 + 0.167)
    assert (plan.priced_images, plan.unpriced_images) == (3, 3)
    text = str(plan)
    assert (
        "$0.247" in text
        and PRICES_AS_OF in text
        and "3 image(s) of unknown price: flux-pro" in text
    )
    data = plan.to_dict()
    assert data["unpriced"] == {"flux-pro": 3}
    assert data["prices_as_of"] == PRICES_AS_OF
    assert CostEstimate().add_all([Job(prompt="c", model="flux-pro")]).total is None


@pytest.mark.parametrize(
    ("value", "text"),
    [(12.3456, "$12.35"), (1234.5, "$1,234.50"), (0.0421, "$0.042"), (0, "$0.000")],
)
def test_dollar_figures_read_well(value: float, text: str) -> None:
    """Totals show cents; small figures show a tenth of a cent."""
    assert format_usd(value) == text


def test_a_toml_override_merges_over_the_builtin_table(tmp_path: Path) -> None:
    """A partial TOML file changes only its entries, adds models, and is named as a source."""
    path = tmp_path / "prices.toml"
    path.write_text(
        'as_of = "2026-12-01"\n'
        "[models.dall-e-3.per_image.hd]\n1024x1024 = 0.07\n"
        "[models.gpt-image-1.tokens]\nimage_output = 30.0\n"
        '[models.flux-pro]\nper_image."*" = { "*" = 0.05 }\n'
    )
    table = load_prices(path)
    assert table.per_image("dall-e-3", "1024x1024", "hd") == 0.07
    assert table.per_image("dall-e-3", "1792x1024", "hd") == 0.12
    assert table.per_image("dall-e-3", "1024x1024", "standard") == 0.04
    assert table.per_image("flux-pro", "640x480", None) == 0.05
    rates = table.models["gpt-image-1"].tokens
    assert rates is not None and (rates.image_output, rates.text_input) == (30.0, 5.0)
    assert table.as_of == "2026-12-01"
    assert table.sources == (str(path),)
    assert str(path) in table.describe()
    assert estimate(Job(prompt="x", model="flux-pro", n=2), table) == pytest.approx(0.1)
    assert builtin_prices().per_image("dall-e-3", "1024x1024", "hd") == 0.08


def test_a_json_override_works_the_same(tmp_path: Path) -> None:
    """A .json file of the same shape is read as JSON."""
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"qwen-image": {"per_image": {"*": {"*": 0.02}}}}}))
    assert load_prices(path).per_image("qwen-image", "1024x1024", None) == 0.02


@pytest.mark.parametrize(
    ("text", "entry", "fragment"),
    [
        (
            "[models.dall-e-3.per_image.hd]\n1024x1024 = -1\n",
            "models.dall-e-3.per_image.hd.1024x1024",
            "greater than or equal to 0",
        ),
        (
            '[models.dall-e-3.per_image.hd]\n1024x1024 = "cheap"\n',
            "models.dall-e-3.per_image.hd.1024x1024",
            "valid number",
        ),
        ("[models.dall-e-3]\nper_imag = {}\n", "models.dall-e-3.per_imag", "Extra inputs"),
        (
            "[models.flux-pro.tokens]\ntext_input = 1.0\n",
            "models.flux-pro.tokens.image_input",
            "Field required",
        ),
        ('prices_as_of = "x"\n', "prices_as_of", "unknown entry"),
        ('currency = "EUR"\n', "currency", "'USD'"),
        ("[models.dall-e-3\n", None, "not valid TOML"),
    ],
)
def test_a_bad_override_names_the_file_and_the_entry(
    tmp_path: Path, text: str, entry: str | None, fragment: str
) -> None:
    """Each kind of bad override is a PricesError naming its file, its entry and the reason."""
    path = tmp_path / "my-prices.toml"
    path.write_text(text)
    with pytest.raises(PricesError) as info:
        load_prices(path)
    assert isinstance(info.value, ConfigError)
    assert info.value.source == str(path)
    assert info.value.entry == entry
    message = str(info.value)
    assert str(path) in message and fragment in message
    if entry:
        assert entry in message


def test_a_missing_or_non_table_override_is_a_prices_error(tmp_path: Path) -> None:
    """A missing file, or JSON that is not an object, is a PricesError naming the file."""
    with pytest.raises(PricesError, match="cannot read the file"):
        load_prices(tmp_path / "nope.toml")
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(PricesError, match="must be a table"):
        load_prices(path)
    path.write_text("{bad")
    with pytest.raises(PricesError, match="not valid JSON"):
        load_prices(path)
