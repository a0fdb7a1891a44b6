"""The simulated CometAPI: per-model validation, images, url files, limits and faults."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from cometbatch import ModelRegistry, SimConfig, Simulator
from cometbatch.simulator import server as simulator
from cometbatch.simulator.faults import FAULTS, SERVER_ERROR_STATUSES
from cometbatch.simulator.imagegen import make_image, make_png, noise_png_size, png_of_size
from cometbatch.simulator.server import serve

KEY = "sk-test-key"
REQUEST_ID = re.compile(r" \(request id: (\d{23}[A-Za-z0-9]{8})\)$")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=7)) as simulator:
        yield simulator


async def post(
    session: aiohttp.ClientSession,
    sim: Simulator,
    body: Any,
    *,
    key: str | None = KEY,
    raw: bytes | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST to the generation route; the status, the JSON body (or text) and the response."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    data = raw if raw is not None else json.dumps(body).encode()
    async with session.post(
        f"{sim.base_url}/images/generations", data=data, headers=headers, allow_redirects=False
    ) as resp:
        text = await resp.text()
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, parsed, resp


def decode(data: bytes) -> Image.Image:
    """Open and fully decode image bytes with Pillow."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_comet_error(body: Any, *, code: str = "") -> str:
    """Check CometAPI's error shape and return the message without the request id."""
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == ""
    assert error["code"] == code
    match = REQUEST_ID.search(error["message"])
    assert match, error["message"]
    return str(error["message"][: match.start()])


# -- images ------------------------------------------------------------------------------


def test_make_png_decodes_at_requested_size() -> None:
    """A generated PNG decodes to an RGB image of the requested edges."""
    image = decode(make_png(64, 48, 3))
    assert (image.format, image.size, image.mode) == ("PNG", (64, 48), "RGB")


def test_make_png_differs_by_seed_and_repeats_for_same_seed() -> None:
    """Different seeds give different pictures; the same seed gives the same bytes."""
    assert make_png(64, 64, 1) != make_png(64, 64, 2)
    assert make_png(64, 64, 1) == make_png(64, 64, 1)
    assert decode(make_png(64, 64, 1)).tobytes() != decode(make_png(64, 64, 2)).tobytes()


def test_noise_png_is_incompressible_and_exactly_predicted() -> None:
    """A noise PNG decodes, and its size is exactly what noise_png_size predicts."""
    data = make_png(300, 200, 5, noise=True)
    assert len(data) == noise_png_size(300, 200)
    assert len(data) > 300 * 200 * 3
    assert decode(data).size == (300, 200)


@pytest.mark.parametrize("target", [100, 5_000, 250_000, 2_000_000])
def test_png_of_size_lands_near_target(target: int) -> None:
    """png_of_size makes a decodable PNG within 1 % (or 64 bytes) of the target size."""
    data = png_of_size(target, 1)
    assert abs(len(data) - target) <= max(64, target // 100)
    assert decode(data).format == "PNG"


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_make_image_returns_real_images(fmt: str, pil: str) -> None:
    """make_image returns bytes Pillow decodes in the asked format, for several seeds."""
    for seed in range(4):
        assert decode(make_image(fmt, seed, (32, 32))).format == pil


def test_make_image_rejects_unknown_format() -> None:
    """An unknown format is a ValueError, not a silent PNG."""
    with pytest.raises(ValueError, match="gif"):
        make_image("gif", 1, (8, 8))


# -- the running server --------------------------------------------------------------------


async def test_b64_success_returns_decodable_pngs(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """dall-e-2 with b64_json answers n decodable PNGs of the configured edge."""
    body = {"model": "dall-e-2", "prompt": "a red fox", "n": 2, "response_format": "b64_json"}
    status, answer, resp = await post(session, sim, body)
    assert status == 200
    assert resp.content_type == "application/json"
    assert isinstance(answer["created"], int)
    assert "usage" not in answer
    images = [decode(base64.b64decode(item["b64_json"])) for item in answer["data"]]
    assert [(i.format, i.size) for i in images] == [("PNG", (64, 64))] * 2
    assert images[0].tobytes() != images[1].tobytes()


async def test_url_mode_dall_e_3_serves_webp_with_revised_prompt(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """dall-e-3 answers a url by default, with revised_prompt, to a real WebP file."""
    status, answer, _ = await post(session, sim, {"model": "dall-e-3", "prompt": "a lighthouse"})
    assert status == 200
    (item,) = answer["data"]
    assert item["revised_prompt"].startswith("a lighthouse")
    assert item["url"].startswith(f"{sim.origin}/files/") and item["url"].endswith(".webp")
    async with session.get(item["url"]) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/webp"
        assert decode(await resp.read()).format == "WEBP"
    assert sim.stats.downloads == 1


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
async def test_gpt_image_answers_b64_in_output_format_with_usage(
    sim: Simulator, session: aiohttp.ClientSession, fmt: str, pil: str
) -> None:
    """gpt-image answers b64_json in the asked output_format and reports usage."""
    body = {"model": "gpt-image-1", "prompt": "a teapot", "n": 2, "output_format": fmt}
    status, answer, _ = await post(session, sim, body)
    assert status == 200
    assert [decode(base64.b64decode(i["b64_json"])).format for i in answer["data"]] == [pil] * 2
    assert answer["usage"]["total_tokens"] > 0


async def test_dall_e_3_n2_is_400_in_comet_shape(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """dall-e-3 with n=2 is a 400 in CometAPI's shape, the request id inside the message (and
    the same id in the X-Request-Id header, as on every answer)."""
    status, answer, resp = await post(session, sim, {"model": "dall-e-3", "prompt": "x", "n": 2})
    assert status == 400
    assert f"(request id: {resp.headers['X-Request-Id']})" in answer["error"]["message"]
    assert assert_comet_error(answer) == "You must provide n=1 for this model."
    assert answer["error"]["type"] == "invalid_request_error"


async def test_gpt_image_with_response_format_is_400(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """gpt-image rejects any response_format as an unknown parameter."""
    body = {"model": "gpt-image-1", "prompt": "x", "response_format": "b64_json"}
    status, answer, _ = await post(session, sim, body)
    assert status == 400
    assert assert_comet_error(answer) == "Unknown parameter: 'response_format'."


async def test_bad_size_is_400(sim: Simulator, session: aiohttp.ClientSession) -> None:
    """A size the model does not take is a 400 naming the size."""
    body = {"model": "dall-e-2", "prompt": "x", "size": "1792x1024"}
    status, answer, _ = await post(session, sim, body)
    assert status == 400
    assert "1792x1024" in assert_comet_error(answer)


async def test_non_json_body_is_400(sim: Simulator, session: aiohttp.ClientSession) -> None:
    """A body that is not JSON is a 400, and logged as None."""
    status, answer, _ = await post(session, sim, None, raw=b"prompt=hello")
    assert status == 400
    assert_comet_error(answer)
    assert sim.stats.requests_log[-1]["body"] is None


@pytest.mark.parametrize("key", [None, "", "   "])
async def test_missing_auth_is_401(
    sim: Simulator, session: aiohttp.ClientSession, key: str | None
) -> None:
    """No Authorization header, or an empty Bearer token, is a 401 in CometAPI's shape."""
    status, answer, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x"}, key=key)
    assert status == 401
    assert_comet_error(answer)
    assert answer["error"]["type"] == "comet_api_error"


async def test_wrong_key_is_401_when_key_configured(session: aiohttp.ClientSession) -> None:
    """With api_key set only exactly that key passes."""
    async with Simulator(SimConfig(api_key="sk-right")) as sim:
        wrong, _, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x"}, key="sk-no")
        right, _, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x"}, key="sk-right")
    assert (wrong, right) == (401, 200)


async def test_download_with_authorization_is_403_and_counted(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """A file download carrying any Authorization header is refused and counted."""
    _, answer, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x"})
    url = answer["data"][0]["url"]
    async with session.get(url, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 403
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
        assert decode(await resp.read()).format == "PNG"
    assert sim.stats.download_auth_rejections == 1
    assert sim.stats.downloads == 1


async def test_file_is_evicted_after_two_downloads(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """A url file serves two downloads (one client retry) and is then gone."""
    _, answer, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x"})
    url = answer["data"][0]["url"]
    statuses = []
    for _ in range(3):
        async with session.get(url) as resp:
            statuses.append(resp.status)
    assert statuses == [200, 200, 404]


async def test_stored_files_are_capped(
    sim: Simulator, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the cap the oldest undownloaded file is dropped, so memory stays bounded."""
    monkeypatch.setattr(simulator, "_MAX_FILES", 2)
    urls = []
    for prompt in ("a", "b", "c"):
        _, answer, _ = await post(session, sim, {"model": "dall-e-2", "prompt": prompt})
        urls.append(answer["data"][0]["url"])
    statuses = []
    for url in urls:
        async with session.get(url) as resp:
            statuses.append(resp.status)
    assert statuses == [404, 200, 200]


async def test_expired_url_is_404(session: aiohttp.ClientSession) -> None:
    """A url file answers 404 once url_ttl has passed on the simulator's clock."""
    clock = FakeClock()
    async with Simulator(SimConfig(url_ttl=60.0), clock=clock) as sim:
        _, answer, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x", "n": 2})
        first, second = (item["url"] for item in answer["data"])
        clock.now += 59.0
        async with session.get(first) as resp:
            assert resp.status == 200
        clock.now += 1.0
        async with session.get(second) as resp:
            assert resp.status == 404
            assert resp.content_type == "text/html"
        async with session.get(f"{sim.origin}/files/unknown.png") as resp:
            assert resp.status == 404


@pytest.mark.parametrize(
    "path", ["/", "/v1/chat/completions", "/v1/images/generations", "/images/generations"]
)
async def test_unknown_path_is_html_404(
    sim: Simulator, session: aiohttp.ClientSession, path: str
) -> None:
    """A wrong path (or a GET on the generation route) gets an HTML 404, as a bad base URL would."""
    for method in ("GET", "POST"):
        if method == "POST" and path == "/v1/images/generations":
            continue
        async with session.request(method, f"{sim.origin}{path}") as resp:
            assert resp.status == 404
            assert resp.content_type == "text/html"
            assert "404 Not Found" in await resp.text()
    assert sim.stats.requests == 0


# -- enqueued faults -----------------------------------------------------------------------

DALLE2 = {"model": "dall-e-2", "prompt": "x", "n": 2, "response_format": "b64_json"}


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("500", 500, ""),
        ("503", 503, ""),
        ("504", 504, ""),
        ("500-invalid-request", 500, "invalid_request"),
        ("400", 400, ""),
        ("content-policy", 400, "content_policy_violation"),
        ("429-bare", 429, ""),
    ],
)
async def test_json_error_faults(
    sim: Simulator, session: aiohttp.ClientSession, fault: str, status: int, code: str
) -> None:
    """Each JSON error fault answers its status and code in CometAPI's shape."""
    sim.enqueue(fault)
    got, answer, resp = await post(session, sim, DALLE2)
    assert got == status
    assert_comet_error(answer, code=code)
    assert "Retry-After" not in resp.headers
    assert sim.stats.faults[fault] == 1


async def test_429_fault_carries_retry_after(session: aiohttp.ClientSession) -> None:
    """The "429" fault carries Retry-After and retry-after-ms from the config."""
    async with Simulator(SimConfig(retry_after=2.5)) as sim:
        sim.enqueue("429")
        status, answer, resp = await post(session, sim, DALLE2)
    assert status == 429
    assert_comet_error(answer)
    assert resp.headers["Retry-After"] == "2.5"
    assert resp.headers["retry-after-ms"] == "2500"


@pytest.mark.parametrize(("fault", "status"), [("502", 502), ("524", 524), ("html", 200)])
async def test_html_faults(
    sim: Simulator, session: aiohttp.ClientSession, fault: str, status: int
) -> None:
    """Gateway errors and the "html" fault answer an HTML page, not JSON."""
    sim.enqueue(fault)
    got, answer, resp = await post(session, sim, DALLE2)
    assert got == status
    assert resp.content_type == "text/html"
    assert isinstance(answer, str) and "<html>" in answer


async def test_content_policy_marker_refuses_marked_prompts(
    session: aiohttp.ClientSession,
) -> None:
    """A prompt containing content_policy_marker is a content-policy 400; others pass."""
    async with Simulator(SimConfig(content_policy_marker="[refuse]")) as sim:
        refused, answer, _ = await post(session, sim, {**DALLE2, "prompt": "a [refuse] cat"})
        passed, _, _ = await post(session, sim, {**DALLE2, "prompt": "a cat"})
    assert (refused, passed) == (400, 200)
    assert_comet_error(answer, code="content_policy_violation")
    assert sim.stats.faults == {"content-policy": 1}


async def test_redirect_fault(sim: Simulator, session: aiohttp.ClientSession) -> None:
    """The "redirect" fault answers 301 to another path, which is an HTML 404."""
    sim.enqueue("redirect")
    status, _, resp = await post(session, sim, DALLE2)
    assert status == 301
    location = resp.headers["Location"]
    assert location.startswith(sim.origin) and location != f"{sim.base_url}/images/generations"
    async with session.get(location) as followed:
        assert followed.status == 404


async def test_malformed_fault_is_truncated_json(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """The "malformed" fault answers 200 application/json that does not parse."""
    sim.enqueue("malformed")
    status, answer, resp = await post(session, sim, DALLE2)
    assert (status, resp.content_type) == (200, "application/json")
    assert isinstance(answer, str) and answer.startswith('{"created"')


async def test_drop_fault_closes_the_connection(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """The "drop" fault closes the connection without any answer."""
    sim.enqueue("drop")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(session, sim, DALLE2)
    status, _, _ = await post(session, sim, DALLE2)
    assert status == 200
    assert sim.stats.faults["drop"] == 1
    assert sim.stats.statuses == {200: 1}


async def test_drop_midway_fault_cuts_a_generated_answer_after_the_headers(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """ "drop-midway" sends 200, the length and half the body of a billed answer, then closes."""
    sim.enqueue("drop-midway")
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{sim.base_url}/images/generations"
    async with session.post(url, json=DALLE2, headers=headers) as resp:
        assert (resp.status, resp.content_type) == (200, "application/json")
        assert resp.content_length is not None
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
    assert 0 < len(received) < resp.content_length
    assert received.startswith(b'{"created"')
    assert (await post(session, sim, DALLE2))[0] == 200
    # The cut-off answer was generated (paid for), but never answered in full.
    assert (sim.stats.generated, sim.stats.images) == (2, 4)
    assert sim.stats.statuses == {200: 1}
    assert sim.stats.faults == {"drop-midway": 1}


@pytest.mark.parametrize(("fault", "count"), [("empty-data", 0), ("fewer-images", 1)])
async def test_missing_image_faults(
    sim: Simulator, session: aiohttp.ClientSession, fault: str, count: int
) -> None:
    """ "empty-data" answers no images and "fewer-images" one fewer than asked."""
    sim.enqueue(fault)
    status, answer, _ = await post(session, sim, DALLE2)
    assert status == 200
    assert len(answer["data"]) == count
    assert sim.stats.generated == 0


async def test_bad_base64_fault(sim: Simulator, session: aiohttp.ClientSession) -> None:
    """The "bad-base64" fault answers b64_json that does not decode."""
    sim.enqueue("bad-base64")
    status, answer, _ = await post(session, sim, DALLE2)
    assert status == 200
    for item in answer["data"]:
        with pytest.raises(binascii.Error):
            base64.b64decode(item["b64_json"], validate=True)


async def test_slow_fault_delays_then_succeeds(session: aiohttp.ClientSession) -> None:
    """The "slow" fault waits slow_seconds, then answers normally."""
    async with Simulator(SimConfig(slow_seconds=0.02)) as sim:
        sim.enqueue("slow")
        loop = asyncio.get_running_loop()
        start = loop.time()
        status, answer, _ = await post(session, sim, DALLE2)
        assert loop.time() - start >= 0.019
    assert status == 200 and len(answer["data"]) == 2
    assert sim.stats.generated == 1


async def test_enqueued_faults_apply_in_order_then_stop(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """Enqueued faults are used once each, in order, before normal answers resume."""
    sim.enqueue("503", "429-bare")
    statuses = [(await post(session, sim, DALLE2))[0] for _ in range(3)]
    assert statuses == [503, 429, 200]


def test_enqueue_rejects_unknown_fault() -> None:
    """An unknown fault name is a ValueError listing the known ones."""
    with pytest.raises(ValueError, match="418"):
        Simulator().enqueue("418")
    assert "slow" in FAULTS


async def download(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    """GET a file link: its status, content type and body."""
    async with session.get(url) as resp:
        return resp.status, resp.content_type, await resp.read()


async def test_download_faults_apply_to_the_next_downloads_in_order(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """Download faults wait for the next downloads, in order; generation faults are separate."""
    sim.enqueue("download-404", "500", "download-not-image")
    assert "queued_faults=3" in repr(sim)
    assert (await post(session, sim, DALLE2))[0] == 500
    _, answer, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x"})
    url = answer["data"][0]["url"]
    status, content_type, body = await download(session, url)
    assert (status, content_type) == (404, "text/html")
    assert b"404 Not Found" in body
    status, content_type, body = await download(session, url)
    assert (status, content_type) == (200, "text/html")
    assert body.startswith(b"<html>")
    status, content_type, body = await download(session, url)
    assert (status, content_type) == (200, "image/png")
    assert decode(body).format == "PNG"
    assert sim.stats.faults == {"500": 1, "download-404": 1, "download-not-image": 1}
    assert sim.stats.downloads == 1


async def test_download_expired_fault_removes_the_file_for_good(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """ "download-expired" ages the link past its TTL: this and every later download is a 404."""
    _, answer, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x", "n": 2})
    first, second = (item["url"] for item in answer["data"])
    sim.enqueue("download-expired")
    assert [(await download(session, first))[0] for _ in range(2)] == [404, 404]
    assert (await download(session, second))[0] == 200
    assert sim.stats.faults == {"download-expired": 1}


async def test_download_huge_fault_sends_the_image_padded_to_the_configured_size(
    session: aiohttp.ClientSession,
) -> None:
    """ "download-huge" announces and sends huge_download_bytes, starting with the image."""
    async with Simulator(SimConfig(huge_download_bytes=300_000)) as sim:
        _, answer, _ = await post(session, sim, {"model": "dall-e-2", "prompt": "x"})
        url = answer["data"][0]["url"]
        sim.enqueue("download-huge")
        async with session.get(url) as resp:
            assert (resp.status, resp.content_type) == (200, "image/png")
            assert resp.content_length == 300_000
            huge = await resp.read()
        status, _, image = await download(session, url)
    assert status == 200
    assert len(huge) == 300_000
    assert huge.startswith(image) and huge[len(image) :] == bytes(300_000 - len(image))
    assert sim.stats.downloads == 1


def test_download_fault_names_are_known() -> None:
    """Download faults are enqueued by name like the others; a typo is still refused."""
    assert {"download-404", "download-expired", "download-huge"} <= set(FAULTS)
    with pytest.raises(ValueError, match="download-410"):
        Simulator().enqueue("download-410")


# -- limits, random faults, stats ------------------------------------------------------------


async def test_rpm_limit_answers_429_with_retry_after_from_window(
    session: aiohttp.ClientSession,
) -> None:
    """Over rpm_limit in the sliding minute is a 429 whose Retry-After comes from the window."""
    clock = FakeClock()
    async with Simulator(SimConfig(rpm_limit=2), clock=clock) as sim:
        assert (await post(session, sim, DALLE2))[0] == 200
        clock.now += 20.0
        assert (await post(session, sim, DALLE2))[0] == 200
        clock.now += 10.0
        status, answer, resp = await post(session, sim, DALLE2)
        assert status == 429
        assert_comet_error(answer, code="rate_limit_exceeded")
        assert resp.headers["Retry-After"] == "30"
        assert resp.headers["retry-after-ms"] == "30000"
        clock.now += 30.0
        assert (await post(session, sim, DALLE2))[0] == 200
        assert (await post(session, sim, DALLE2))[0] == 429
    assert sim.stats.limit_429s == 2
    assert sim.stats.faults == {}
    assert sim.stats.statuses == {200: 3, 429: 2}


async def test_ipm_limit_counts_images(session: aiohttp.ClientSession) -> None:
    """ipm_limit counts images, so a large n is refused while a small one still fits."""
    clock = FakeClock()
    async with Simulator(SimConfig(ipm_limit=3), clock=clock) as sim:
        assert (await post(session, sim, DALLE2))[0] == 200
        assert (await post(session, sim, DALLE2))[0] == 429
        assert (await post(session, sim, {**DALLE2, "n": 1}))[0] == 200
    assert sim.stats.limit_429s == 1
    assert sim.stats.images == 3


async def test_limits_refuse_on_an_aiohttp_whose_responses_are_falsy(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp 3.10 gives a response no __bool__: as a mapping with no items it is false, so a
    refusal taken by its truth value slipped through and the limit answered 200."""
    monkeypatch.setattr(web.StreamResponse, "__bool__", lambda self: len(self) > 0)
    clock = FakeClock()
    async with Simulator(SimConfig(rpm_limit=1), clock=clock) as sim:
        assert (await post(session, sim, DALLE2))[0] == 200
        assert (await post(session, sim, DALLE2))[0] == 429
    assert sim.stats.limit_429s == 1


async def test_random_5xx_rate_uses_server_error_statuses(
    session: aiohttp.ClientSession,
) -> None:
    """With rate_5xx=1 every valid request gets one of the server error statuses."""
    async with Simulator(SimConfig(rate_5xx=1.0, seed=3)) as sim:
        statuses = [(await post(session, sim, DALLE2))[0] for _ in range(20)]
    assert set(statuses) <= set(SERVER_ERROR_STATUSES)
    assert len(set(statuses)) > 1
    assert sum(sim.stats.faults.values()) == 20
    assert sim.stats.generated == 0


@pytest.mark.parametrize(
    ("config", "status", "retry_after"),
    [
        (SimConfig(rate_429=1.0, retry_after=3), 429, "3"),
        (SimConfig(rate_429_bare=1.0), 429, None),
        (SimConfig(rate_malformed=1.0), 200, None),
    ],
)
async def test_random_fault_rates_answer_their_fault(
    session: aiohttp.ClientSession, config: SimConfig, status: int, retry_after: str | None
) -> None:
    """A fault rate of 1 gives that fault to every valid request."""
    async with Simulator(config) as sim:
        got, answer, resp = await post(session, sim, DALLE2)
    assert got == status
    assert resp.headers.get("Retry-After") == retry_after
    if status == 200:
        assert isinstance(answer, str)
    assert sim.stats.generated == 0


async def test_random_drop_rate_closes_connections(session: aiohttp.ClientSession) -> None:
    """With rate_drop=1 every valid request loses its connection without an answer."""
    async with Simulator(SimConfig(rate_drop=1.0)) as sim:
        for _ in range(3):
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await post(session, sim, DALLE2)
    assert sim.stats.faults == {"drop": 3}
    assert sim.stats.statuses == {}


async def test_random_faults_are_reproducible_with_a_seed(
    session: aiohttp.ClientSession,
) -> None:
    """The same seed gives the same sequence of random faults."""
    config = SimConfig(rate_429=0.2, rate_429_bare=0.2, rate_5xx=0.2, seed=11)
    runs = []
    for _ in range(2):
        async with Simulator(config) as sim:
            runs.append([(await post(session, sim, DALLE2))[0] for _ in range(15)])
    assert runs[0] == runs[1]
    assert 200 in runs[0] and 429 in runs[0]


async def test_stats_count_requests_images_and_models(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """Stats count requests, successes, images per model and statuses, and never the key."""
    await post(session, sim, DALLE2)
    await post(session, sim, {"model": "gpt-image-1", "prompt": "x", "n": 3})
    await post(session, sim, {"model": "dall-e-3", "prompt": "x", "n": 2})
    await post(session, sim, {"model": "dall-e-2", "prompt": "x"}, key=None)
    stats = sim.stats
    assert (stats.requests, stats.generated, stats.images) == (4, 2, 5)
    assert stats.by_model == {"dall-e-2": 1, "gpt-image-1": 1}
    assert stats.statuses == {200: 2, 400: 1, 401: 1}
    assert [e["authorization_present"] for e in stats.requests_log] == [True, True, True, False]
    assert stats.requests_log[1]["body"]["n"] == 3
    assert KEY not in repr(stats)
    assert "requests=4" in repr(sim) and sim.base_url in repr(sim)


async def test_registry_overrides_change_the_rules(session: aiohttp.ClientSession) -> None:
    """A registry passed in replaces the built-in limits (here dall-e-3 with n up to 2)."""
    registry = ModelRegistry().with_overrides({"dall-e-3": {"max_n": 2}})
    async with Simulator(registry=registry) as sim:
        status, answer, _ = await post(session, sim, {"model": "dall-e-3", "prompt": "x", "n": 2})
    assert status == 200
    assert len(answer["data"]) == 2


async def test_record_requests_off_keeps_no_log(session: aiohttp.ClientSession) -> None:
    """With record_requests off the log stays empty."""
    async with Simulator(SimConfig(record_requests=False)) as sim:
        await post(session, sim, DALLE2)
    assert sim.stats.requests_log == []


async def test_max_in_flight_tracks_concurrency(session: aiohttp.ClientSession) -> None:
    """Concurrent slow requests are counted in max_in_flight."""
    async with Simulator(SimConfig(latency=0.02)) as sim:
        results = await asyncio.gather(*(post(session, sim, DALLE2) for _ in range(4)))
    assert [r[0] for r in results] == [200] * 4
    assert sim.stats.max_in_flight == 4


async def test_payload_bytes_sets_png_size(session: aiohttp.ClientSession) -> None:
    """With payload_bytes the PNGs are noise images of about that size."""
    async with Simulator(SimConfig(payload_bytes=200_000)) as sim:
        _, answer, _ = await post(session, sim, DALLE2)
    data = base64.b64decode(answer["data"][0]["b64_json"])
    assert abs(len(data) - 200_000) < 2_000
    assert decode(data).format == "PNG"


async def test_same_prompt_gives_same_picture_and_prompts_differ(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """Images are derived from prompt and index: repeatable, and different across prompts."""

    def body(prompt: str) -> dict[str, Any]:
        return {**DALLE2, "prompt": prompt, "n": 1}

    first = (await post(session, sim, body("a cat")))[1]["data"][0]["b64_json"]
    again = (await post(session, sim, body("a cat")))[1]["data"][0]["b64_json"]
    other = (await post(session, sim, body("a dog")))[1]["data"][0]["b64_json"]
    assert first == again != other


# -- lifecycle -------------------------------------------------------------------------------


async def test_simulator_refuses_use_after_close() -> None:
    """A closed simulator has no URL, takes no faults and cannot be started again."""
    sim = Simulator()
    with pytest.raises(RuntimeError):
        _ = sim.base_url
    async with sim:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", sim.base_url)
    with pytest.raises(RuntimeError):
        _ = sim.base_url
    with pytest.raises(RuntimeError):
        sim.enqueue("500")
    with pytest.raises(RuntimeError):
        await sim.__aenter__()
    assert "closed" in repr(sim)


async def test_serve_runs_until_cancelled(session: aiohttp.ClientSession) -> None:
    """serve() answers requests until its task is cancelled."""
    ready: asyncio.Future[Simulator] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(SimConfig(), "127.0.0.1", 0, on_ready=ready.set_result))
    sim = await ready
    status, _, _ = await post(session, sim, DALLE2)
    assert status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
