"""The simulated CometAPI's pure rules: validation, request ids, faults, limits and usage."""

from __future__ import annotations

from typing import Any

import pytest

from cometbatch import ModelRegistry, SimConfig
from cometbatch.simulator.faults import (
    DOWNLOAD_FAULTS,
    FAULTS,
    SHAPING_FAULTS,
    ApiFailure,
    counts_as_generated,
    images_to_answer,
    pick_fault,
)
from cometbatch.simulator.limits import SlidingWindow, format_seconds
from cometbatch.simulator.rules import (
    ImageRequest,
    check_authorization,
    make_request_id,
    parse_request,
    usage_for,
)


@pytest.mark.parametrize(
    ("header", "key", "status"),
    [
        (None, None, 401),
        ("", None, 401),
        ("Bearer ", None, 401),
        ("Bearer    ", None, 401),
        ("Basic abc", None, 401),
        ("sk-raw", None, 401),
        ("Bearer anything", None, None),
        ("Bearer right", "right", None),
        ("Bearer wrong", "right", 401),
        ("Bearer right ", "right", 401),
    ],
)
def test_check_authorization(header: str | None, key: str | None, status: int | None) -> None:
    """Only a non-empty Bearer token passes, and exactly the key when one is configured."""
    failure = check_authorization(header, key)
    assert (failure.status if failure else None) == status


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "parse the JSON body"),
        (None, "parse the JSON body"),
        ({"prompt": "x"}, "model parameter"),
        ({"model": "dall-e-2"}, "Missing required parameter: 'prompt'."),
        ({"model": "dall-e-2", "prompt": ""}, "non-empty"),
        ({"model": "dall-e-2", "prompt": 5}, "non-empty"),
        ({"model": "dall-e-3", "prompt": "x", "n": 2}, "You must provide n=1 for this model."),
        ({"model": "dall-e-2", "prompt": "x", "n": 11}, "Expected a value <= 10"),
        ({"model": "dall-e-2", "prompt": "x", "n": 0}, "Expected a value >= 1"),
        ({"model": "dall-e-2", "prompt": "x", "n": "2"}, "Invalid type for 'n'"),
        ({"model": "dall-e-2", "prompt": "x", "n": True}, "Invalid type for 'n'"),
        (
            {"model": "gpt-image-1", "prompt": "x", "response_format": "b64_json"},
            "Unknown parameter: 'response_format'.",
        ),
        ({"model": "dall-e-3", "prompt": "x", "size": "512x512"}, "size"),
        ({"model": "dall-e-2", "prompt": "x", "style": "vivid"}, "Unknown parameter: 'style'."),
        ({"model": "dall-e-3", "prompt": "x", "quality": "ultra"}, "quality"),
        ({"model": "dall-e-2", "prompt": "x" * 1001}, "at most 1000"),
        ({"model": "gpt-image-1", "prompt": "x", "output_compression": 101}, "0 to 100"),
        (
            {
                "model": "gpt-image-1",
                "prompt": "x",
                "background": "transparent",
                "output_format": "jpeg",
            },
            "output_format",
        ),
        ({"model": "dall-e-2", "prompt": "x", "response_format": "gif"}, "response_format"),
        ({"model": "flux-9", "prompt": "x", "response_format": "gif"}, "Invalid value"),
        ({"model": "my-new-model", "prompt": "x", "n": 2}, "You must provide n=1"),
    ],
)
def test_parse_request_rejects(body: Any, message: str) -> None:
    """Each broken body is a 400 whose message says what is wrong."""
    failure = parse_request(body, ModelRegistry())
    assert isinstance(failure, ApiFailure)
    assert failure.status == 400
    assert message in failure.message


@pytest.mark.parametrize(
    ("body", "mode", "fmt"),
    [
        ({"model": "dall-e-3", "prompt": "x"}, "url", "webp"),
        ({"model": "dall-e-2", "prompt": "x", "n": 3}, "url", "png"),
        ({"model": "dall-e-2", "prompt": "x", "response_format": "b64_json"}, "b64_json", "png"),
        ({"model": "gpt-image-1", "prompt": "x"}, "b64_json", "png"),
        ({"model": "gpt-image-1-mini", "prompt": "x", "output_format": "webp"}, "b64_json", "webp"),
        ({"model": "seedream-9", "prompt": "x", "seed": 4, "watermark": False}, "url", "png"),
        ({"model": "dall-e-2", "prompt": "x", "n": None, "size": None}, "url", "png"),
    ],
)
def test_parse_request_accepts(body: dict[str, Any], mode: str, fmt: str) -> None:
    """Valid bodies parse, answering url by default except gpt-image (always b64_json)."""
    parsed = parse_request(body, ModelRegistry())
    assert isinstance(parsed, ImageRequest)
    assert (parsed.mode, parsed.fmt) == (mode, fmt)


def test_usage_for_scales_with_quality_size_and_n() -> None:
    """gpt-image usage adds up and grows with quality, size and n."""

    def usage(**kw: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "model": "gpt-image-1",
            "prompt": "a cat " * 10,
            "n": 1,
            "mode": "b64_json",
            "fmt": "png",
            "size": "1024x1024",
            "quality": "medium",
            "revised_prompt": False,
            "usage": True,
        }
        return usage_for(ImageRequest(**{**base, **kw}))

    one = usage()
    assert one["total_tokens"] == one["input_tokens"] + one["output_tokens"]
    assert one["input_tokens_details"] == {"text_tokens": one["input_tokens"], "image_tokens": 0}
    assert usage(quality="high")["output_tokens"] > one["output_tokens"]
    assert usage(size="1536x1024")["output_tokens"] > one["output_tokens"]
    assert usage(n=3)["output_tokens"] == 3 * one["output_tokens"]


def test_make_request_id_shape() -> None:
    """Request ids are a UTC timestamp, nine nanosecond digits and a random suffix."""
    rid = make_request_id(1_763_722_512_345_678_901, "abcdefgh")
    assert rid == "20251121105512345678901abcdefgh"


@pytest.mark.parametrize(
    ("seconds", "text"), [(1.0, "1"), (30, "30"), (0.05, "0.05"), (1.5, "1.5"), (0.0, "0")]
)
def test_format_seconds(seconds: float, text: str) -> None:
    """Whole seconds print as integers, fractions as short decimals."""
    assert format_seconds(seconds) == text


@pytest.mark.parametrize(
    ("draw", "fault"),
    [
        (0.0, "429"),
        (0.09, "429"),
        (0.1, "429-bare"),
        (0.25, "5xx"),
        (0.45, "drop"),
        (0.55, "malformed"),
        (0.6, None),
        (0.99, None),
    ],
)
def test_pick_fault_matches_draw_against_cumulative_rates(draw: float, fault: str | None) -> None:
    """A uniform draw selects faults by their cumulative rates, in a fixed order."""
    config = SimConfig(
        rate_429=0.1, rate_429_bare=0.1, rate_5xx=0.2, rate_drop=0.1, rate_malformed=0.1
    )
    assert pick_fault(config, draw) == fault


def test_config_refuses_rates_above_one() -> None:
    """Fault rates that add up to more than 1 are a configuration error."""
    with pytest.raises(ValueError, match="more than 1"):
        SimConfig(rate_429=0.6, rate_5xx=0.6)


def test_sliding_window_frees_capacity_as_events_age() -> None:
    """The window says how long until enough old costs leave it."""
    window = SlidingWindow(limit=3, span=60.0)
    assert window.wait_for(0.0, 2) == 0.0
    window.add(0.0, 2)
    window.add(10.0, 1)
    assert window.wait_for(20.0, 1) == pytest.approx(40.0)
    assert window.wait_for(20.0, 3) == pytest.approx(50.0)
    assert window.wait_for(60.0, 2) == 0.0
    assert window.wait_for(60.0, 4) == 60.0


@pytest.mark.parametrize(
    ("fault", "n", "count", "generated"),
    [
        (None, 3, 3, True),
        ("slow", 2, 2, True),
        ("drop-midway", 2, 2, True),
        ("bad-base64", 2, 2, False),
        ("fewer-images", 3, 2, False),
        ("fewer-images", 1, 0, False),
        ("empty-data", 4, 0, False),
    ],
)
def test_shaped_answers(fault: str | None, n: int, count: int, generated: bool) -> None:
    """A shaping fault sets how many images an answer carries and whether it counts as made."""
    assert images_to_answer(fault, n) == count
    assert counts_as_generated(fault) is generated


def test_fault_names_are_unique_and_grouped() -> None:
    """Every fault name is known once; download faults are their own group, by prefix."""
    assert len(FAULTS) == len(set(FAULTS))
    assert set(SHAPING_FAULTS) <= set(FAULTS) and set(DOWNLOAD_FAULTS) <= set(FAULTS)
    assert not set(SHAPING_FAULTS) & set(DOWNLOAD_FAULTS)
    assert {name for name in FAULTS if name.startswith("download-")} == set(DOWNLOAD_FAULTS)


def test_huge_downloads_exceed_the_default_download_cap() -> None:
    """By default a "download-huge" answer is just over the client's 64 MiB cap."""
    from cometbatch.net.client import DEFAULT_MAX_DOWNLOAD_BYTES

    assert SimConfig().huge_download_bytes == DEFAULT_MAX_DOWNLOAD_BYTES + 1
