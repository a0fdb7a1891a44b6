"""Tests for the rate achieved against the limits and what holds it back (pure: no clock)."""

from __future__ import annotations

from collections import Counter

import pytest

from cometbatch.net.pace import Cause, Pace, PaceMeter, cause_of, main_cause


def pace(**fields: object) -> Pace:
    values: dict[str, object] = {
        "requests_per_min": 300.0,
        "images_per_min": 1200.0,
        "rpm": None,
        "ipm": None,
        "latency": 4.0,
        "images_per_request": 4.0,
        "mode": "fixed",
        "level": 16,
        "ceiling": 16,
        "cause": "concurrency",
    }
    values.update(fields)
    return Pace(**values)  # type: ignore[arg-type]


def test_each_request_is_held_back_by_the_first_thing_it_met() -> None:
    """A retry is a retry; probing is the server; a rate token before a slot; a full slot
    while backed off is the server, else concurrency; nothing is the jobs."""
    base = {"retry": False, "probing": False, "waited_rate": False, "waited_slot": False}
    assert cause_of(**{**base, "retry": True, "waited_rate": True}, backed_off=False) == "retries"
    assert cause_of(**{**base, "probing": True}, backed_off=False) == "server"
    # During an outage nearly everything sent is a retry: the server is what holds it back.
    assert cause_of(**{**base, "probing": True, "retry": True}, backed_off=False) == "server"
    assert cause_of(**{**base, "waited_rate": True, "waited_slot": True}, backed_off=True) == "rate"
    assert cause_of(**{**base, "waited_slot": True}, backed_off=True) == "server"
    assert cause_of(**{**base, "waited_slot": True}, backed_off=False) == "concurrency"
    assert cause_of(**base, backed_off=False) == "jobs"


def test_the_main_cause_is_the_commonest_unless_retries_are_a_fifth() -> None:
    counts: Counter[Cause] = Counter({"rate": 70, "retries": 19, "concurrency": 11})
    assert main_cause(counts) == "rate"
    counts["retries"] = 25
    assert main_cause(counts) == "retries"
    assert main_cause(Counter()) is None


def test_a_short_paced_run_never_reads_as_above_its_limit() -> None:
    """600/min with half a second's burst at the start: 5 requests at once, then one every
    0.1 s; over the run the rate is the limit's, not 3 % above it."""
    meter = PaceMeter(lead=0.5)
    times = [0.0] * 5 + [0.1 * k for k in range(1, 146)]
    for t in times:
        meter.sent(t, 1, "rate")
    whole = meter.whole()
    assert whole.requests_per_min == pytest.approx(600, rel=0.01)
    assert whole.cause == "rate"
    # Without the lead the burst would count as sending faster than the limit.
    assert PaceMeter().whole().requests_per_min is None
    plain = PaceMeter()
    for t in times:
        plain.sent(t, 1, "rate")
    assert (plain.whole().requests_per_min or 0) > 615


def test_rates_are_shown_once_the_run_spans_a_few_seconds() -> None:
    """A burst that went out at once has no rate to speak of; the recent window has one once
    5 s have been sent over, and forgets what is older than 30 s."""
    meter = PaceMeter()
    for k in range(20):
        meter.sent(0.001 * k, 2, "jobs")
    assert meter.whole().requests_per_min is None and meter.latest(1.0).requests_per_min is None
    for k in range(100):
        meter.sent(10.0 + k * 0.5, 1, "concurrency")
        meter.held(10.0 + k * 0.5, 3.0)
    latest = meter.latest(60.0)
    # The last 30 s hold 60 sends of one image each, 3 s a slot, all waiting for a slot.
    assert latest.requests_per_min == pytest.approx(120) and latest.images_per_min == 120
    assert latest.latency == pytest.approx(3.0) and latest.cause == "concurrency"
    assert meter.whole().images_per_request == pytest.approx(140 / 120)


def test_the_text_names_what_holds_the_run_back() -> None:
    """Each cause in words; a fixed concurrency says what the rate would need."""
    assert pace(rpm=None).text() == (
        "300 requests/min, 1,200 images/min; limited by concurrency 16"
    )
    needs = pace(ipm=2400.0).text()
    assert needs.endswith("1,200 images/min of 2,400 (50%); limited by concurrency 16: at "
                          "4.0 s per request, 2,400 images/min needs about 40")  # fmt: skip
    capped = pace(rpm=600.0, mode="rate", level=1000, ceiling=1000, images_per_request=1.0)
    assert "limited by max concurrency 1000: at 4.0 s per request, 600/min needs about 40" in (
        capped.text()
    )
    assert (
        pace(rpm=600.0, mode="auto", ceiling=256)
        .holdback_text()
        .startswith("limited by auto concurrency at 16 (max 256)")
    )
    assert pace(cause="rate").holdback_text() == "held back by the rate limit"
    assert pace(cause="server", backed_off=True).holdback_text().endswith("off to 16")
    assert "probing" in pace(cause="server", probing=True).holdback_text()
    assert pace(cause="retries", retry_share=0.31).holdback_text() == (
        "held back by retries: 31% of requests sent were retries"
    )
    assert pace(cause="jobs").holdback_text().startswith("not held back")
    assert pace(requests_per_min=None).text() == ""


def test_the_summary_object_has_every_contract_field() -> None:
    data = pace(rpm=600.0, images_per_request=1.0).to_dict()
    assert list(data) == [
        "requests_per_min", "images_per_min", "rpm", "ipm", "share_of_limit", "latency_s",
        "concurrency_mode", "concurrency", "max_concurrency", "needs", "held_back_by",
        "retry_share",
    ]  # fmt: skip
    assert (data["share_of_limit"], data["needs"], data["held_back_by"]) == (0.5, 40, "concurrency")
