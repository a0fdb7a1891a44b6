"""The simulated API's faults as data: their names, the answers they give, and how one is drawn."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import SimConfig

SERVER_ERROR_STATUSES: tuple[int, ...] = (500, 502, 503, 504, 524)
# Faults that change a successful answer instead of replacing it. "drop-midway" sends the
# headers and half the body of a generated (billed) answer, then closes the connection.
SHAPING_FAULTS: tuple[str, ...] = (
    "empty-data",
    "fewer-images",
    "short",
    "bad-base64",
    "truncated-image",
    "slow",
    "drop-midway",
)
# Faults of the file route, applied to the next downloads rather than the next generations.
# "download-expired" makes the file pass its TTL (gone for good); "download-404" is one 404,
# "download-503" one 503; "download-truncated" serves the first part of the file as if whole.
DOWNLOAD_FAULTS: tuple[str, ...] = (
    "download-404",
    "download-503",
    "download-expired",
    "download-huge",
    "download-not-image",
    "download-truncated",
)
FAULTS: tuple[str, ...] = (
    *("429", "429-bare", "500", "502", "503", "504", "524", "500-invalid-request"),
    *("400", "content-policy", "drop", "malformed", "html", "redirect"),
    *SHAPING_FAULTS,
    *DOWNLOAD_FAULTS,
)


@dataclass(frozen=True, slots=True)
class ApiFailure:
    """An error answer in CometAPI's shape, before the request id is added."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str = ""


# -- pure decisions ----------------------------------------------------------------------


def pick_fault(config: SimConfig, draw: float) -> str | None:
    """The random fault for a uniform draw in [0, 1) ("5xx" for any server error), or None."""
    edge = 0.0
    for name, rate in config.fault_rates():
        edge += rate
        if draw < edge:
            return name
    return None


def images_to_answer(fault: str | None, n: int) -> int:
    """How many of the `n` images asked for an answer shaped by `fault` carries."""
    return {"fewer-images": n - 1, "short": n // 2, "empty-data": 0}.get(fault or "", n)


def short_answer(config: SimConfig, n: int, draw: float) -> str | None:
    """Whether ("short") a request for several images is answered with half of them."""
    return "short" if n > 1 and draw < config.rate_short else None


def counts_as_generated(fault: str | None) -> bool:
    """Whether an answer shaped by `fault` was generated in full (and billed) by the server."""
    return fault in (None, "slow", "drop-midway", "truncated-image")


def cut_image(data: bytes) -> bytes:
    """The first 60 % of an image: what a transfer cut short leaves, magic bytes and all."""
    return data[: len(data) * 3 // 5]


# -- canned answers ----------------------------------------------------------------------

FAULT_ERRORS: Mapping[str, ApiFailure] = {
    "429": ApiFailure(429, "upstream load is saturated, please retry later", "comet_api_error"),
    "429-bare": ApiFailure(
        429, "upstream load is saturated, please retry later", "comet_api_error"
    ),
    "500": ApiFailure(500, "internal server error", "comet_api_error"),
    "500-invalid-request": ApiFailure(
        500, "invalid request: upstream rejected the request", "comet_api_error", "invalid_request"
    ),
    "503": ApiFailure(503, "no upstream channel available right now", "comet_api_error"),
    "504": ApiFailure(504, "upstream request timed out", "comet_api_error"),
    "400": ApiFailure(400, "Invalid request: the request could not be processed."),
    "content-policy": ApiFailure(
        400,
        "Your request was rejected as a result of our safety system.",
        code="content_policy_violation",
    ),
}
# Cloudflare sits in front of the API: gateway errors arrive as its HTML pages, not JSON.
FAULT_PAGES: Mapping[str, tuple[int, str, str]] = {
    "502": (502, "Bad Gateway", "<title>502 Bad Gateway</title><h1>Bad gateway</h1>"),
    "524": (524, "A Timeout Occurred", "<title>524: A timeout occurred</title><h1>Error 524</h1>"),
    "html": (200, "OK", "<title>CometAPI</title><div id='root'>Loading...</div>"),
}
NOT_FOUND_PAGE = (
    "<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1>"
    "</center><hr><center>nginx</center></body></html>"
)
BAD_BASE64 = "%%% this is not base64 %%%"
# A CDN's interstitial: what an image link can answer instead of the image.
NOT_AN_IMAGE_PAGE = (
    "<html><head><title>Just a moment...</title></head><body><h1>Checking your browser "
    "before accessing the file</h1></body></html>"
)
