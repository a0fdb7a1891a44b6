"""The gallery page: its content from the ledger, its safety, its size, and a real Chromium."""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import no_sleep, run_all, settings_for

from cometbatch import Engine, LedgerError, SimConfig, Simulator, load_manifest
from cometbatch.views.gallery.content import (
    bucket_series,
    build_gallery,
    read_gallery,
    safe_relpath,
    write_gallery,
)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = (
    """He said "hi" & 'bye' <script>window.pwned = 1</script></p><img src=x onerror=alert(1)>"""
)
BLOCKED = "FORBIDDEN-SUBJECT"


def result(
    key: str, status: str = "ok", *, model: str = "dall-e-3", n: int = 1, **fields: Any
) -> dict[str, Any]:
    """A ledger result line as the engine writes it (fields override the defaults)."""
    job_id = key.rsplit("#", 1)[0]
    images = [
        {"index": i, "path": f"images/{job_id}/{i}.png", "format": "png", "bytes": 10}
        for i in range(n if status == "ok" else 0)
    ]
    event = {
        "event": "result",
        "run_id": "r1",
        "key": key,
        "job_id": job_id,
        "chunk": 0,
        "status": status,
        "model": model,
        "n": n,
        "images": images,
        "attempts": 1,
        "error": None,
        "finished_at": "2026-01-01T10:00:00.000Z",
    }
    event.update(fields)
    return event


def error(kind: str, status: int, message: str = "no") -> dict[str, Any]:
    """A result's error object."""
    return {"kind": kind, "status": status, "code": "", "message": message, "request_id": "req-1"}


def write_ledger(out: Path, events: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(event) + "\n" for event in events)
    (out / "ledger.jsonl").write_text(text, encoding="utf-8")


# -- the page's content, without a browser ---------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "width", "count"),
    [
        ([100], 1, 1),
        ([100, 101, 103], 1, 4),
        ([0, 119], 1, 120),
        ([0, 120], 2, 61),
        ([0, 599], 5, 120),
        ([30, 3600], 30, 120),
        ([1, 240], 5, 49),
        ([0, 239], 2, 120),
        ([0, 86_400 * 3], 3600, 73),
        ([7, 86_400 * 400], 290_421, 119),
    ],
)
def test_buckets_are_the_narrowest_that_cover_the_run(
    seconds: list[int], width: int, count: int
) -> None:
    """The bucket width is the narrowest of the fixed steps giving at most 120 buckets."""
    got_width, buckets = bucket_series({s: [1, 0, 0, 0] for s in seconds})
    assert (got_width, len(buckets)) == (width, count)
    assert sum(b.images for b in buckets) == len(seconds)
    assert buckets[0].start <= min(seconds) < buckets[0].start + width


def test_latest_result_per_key_wins_and_failures_are_grouped() -> None:
    """A key retried to success shows its images; the failures that remain are grouped by kind."""
    events = [
        {"event": "run", "run_id": "r1", "started_at": "2026-01-01T10:00:00Z", "settings": {}},
        result("a#0", "failed", error=error("server", 503), attempts=3),
        result("a#0", n=2, attempts=2, finished_at="2026-01-01T10:00:01.000Z"),
        result("b#0", "failed", error=error("content_policy", 400, "refused")),
        result("c#0", "failed", model="gpt-image-1", n=4, error=error("content_policy", 400)),
        result("d#0", "failed", error=error("rate_limit", 429), attempts=8),
        {"event": "end", "run_id": "r1", "finished_at": "x", "summary": {"rate_limited": 9}},
    ]
    gallery = build_gallery(events)
    assert [(t.job_id, t.status, t.index) for t in gallery.tiles] == [
        ("a", "ok", 0),
        ("a", "ok", 1),
        ("b", "failed", None),
        ("c", "failed", None),
        ("d", "failed", None),
    ]
    assert gallery.tiles[3].n == 4
    groups = [(kind, count, [f.job_id for f in ex]) for kind, count, ex in gallery.failure_groups()]
    assert groups == [("content_policy", 2, ["b", "c"]), ("rate_limit", 1, ["d"])]
    assert gallery.retries == 2 + 1 + 7
    assert gallery.rate_limited == 9
    assert gallery.models == ["dall-e-3", "gpt-image-1"]
    assert gallery.bucket_s == 1
    first, second = gallery.buckets
    assert (first.images, first.retries, first.throttled, first.failed) == (0, 9, 1, 4)
    assert (second.images, second.retries) == (2, 1)


def test_the_chart_counts_each_requests_429s_when_the_lines_record_them() -> None:
    """Result lines with `rate_limited` chart every 429 answer when their request finished;
    a ledger with older lines falls back to final 429s and the summaries' total."""
    later = "2026-01-01T10:00:05.000Z"
    events = [
        {"event": "run", "run_id": "r1", "started_at": "2026-01-01T10:00:00Z", "settings": {}},
        result("a#0", rate_limited=3, attempts=4),
        result("b#0", rate_limited=0, finished_at=later),
        result("c#0", "failed", error=error("rate_limit", 429), rate_limited=8, attempts=8),
        {"event": "end", "run_id": "r1", "finished_at": "x", "summary": {"rate_limited": 99}},
    ]
    gallery = build_gallery(events)
    assert gallery.per_result_429s and gallery.rate_limited == 11
    assert [b.throttled for b in gallery.buckets if b.throttled] == [11]
    older = build_gallery([*events[:3], result("d#0", "failed", error=error("x", 429)), events[4]])
    assert not older.per_result_429s and older.rate_limited == 99
    assert sum(b.throttled for b in older.buckets) == 3 + 1


@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("images/a/0.png", True),
        ("images/a b#c/0.png", True),
        ("../secret.png", False),
        ("images/../../x.png", False),
        ("/etc/passwd", False),
        ("javascript:alert(1)", False),
        ("C:\\x.png", False),
        ("", False),
        (None, False),
    ],
)
def test_only_paths_inside_the_folder_are_shown(path: Any, kept: bool) -> None:
    """An image path that is absolute, climbs out or names a scheme is not linked."""
    assert (safe_relpath(path) is not None) == kept


def test_page_escapes_user_text_and_names_nothing_outside(tmp_path: Path) -> None:
    """Prompts, ids and reasons are escaped; the page has no external URL and one script."""
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"id": 'q"<b>', "prompt": HOSTILE}) + "\n")
    out = tmp_path / "out"
    write_ledger(
        out,
        [
            {"event": "run", "run_id": "r1", "manifest": str(manifest), "settings": {}},
            result('q"<b>#0', revised_prompt=None),
            result("z#0", "failed", error=error("bad_request", 400, HOSTILE + " https://x.y/")),
        ],
    )
    page = write_gallery(out).read_text()
    assert "<script>window" not in page and "<img src=x" not in page
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    assert "&quot;hi&quot; &amp; &#x27;bye&#x27;" in page
    assert "q&quot;&lt;b&gt;" in page
    # The one link-like text is the escaped error message, shown as text; nothing is fetched.
    assert re.findall(r"https?://", page) == ["https://"]
    assert "https://x.y/" in page.split('id="failures"')[1].split("</section>")[0]
    assert page.count("<script") == 2  # the counts (JSON data) and the filter code
    assert not re.search(r"""(src|href)=["']?(https?:|//|javascript:)""", page)


def test_manifest_prompts_and_sizes_are_joined_by_job_id(tmp_path: Path) -> None:
    """Prompts and sizes come from the run's manifest; a changed manifest is flagged."""
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"id": "a", "prompt": "a red fox", "size": "1792x1024"}\n')
    run = {"event": "run", "manifest": str(manifest), "manifest_sha256": "0" * 64, "settings": {}}
    write_ledger(tmp_path / "out", [run, result("b#0"), result("a#0")])
    gallery = read_gallery(tmp_path / "out")
    assert gallery.jobs["a"].prompt == "a red fox"
    assert [tile.job_id for tile in gallery.tiles] == ["a", "b"]  # manifest order first
    assert "b" not in gallery.jobs
    assert "changed since the run" in gallery.manifest_note
    page = write_gallery(tmp_path / "out").read_text()
    assert 'width="1792" height="1024"' in page and "prompt not known" in page


def test_a_manifest_can_be_named_when_the_ledger_has_none(tmp_path: Path) -> None:
    """Without a recorded manifest the page says so; naming one brings the prompts back."""
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"id": "a", "prompt": "a red fox"}\n')
    write_ledger(tmp_path / "out", [{"event": "run", "manifest": None}, result("a#0")])
    assert "no manifest recorded" in read_gallery(tmp_path / "out").manifest_note
    gallery = read_gallery(tmp_path / "out", manifest=manifest)
    assert (gallery.jobs["a"].prompt, gallery.manifest_note) == ("a red fox", "")
    missing = read_gallery(tmp_path / "out", manifest=tmp_path / "gone.jsonl")
    assert missing.manifest_note.endswith("gone.jsonl: file not found")


def test_a_folder_without_a_ledger_is_refused(tmp_path: Path) -> None:
    """No ledger, no page: a LedgerError that says nothing has run there."""
    with pytest.raises(LedgerError, match="nothing has run"):
        write_gallery(tmp_path)
    assert not (tmp_path / "index.html").exists()


def test_ten_thousand_images_make_a_bounded_page(tmp_path: Path) -> None:
    """10,000 images with long prompts cost under 1.5 KB of page each, every one lazy."""
    manifest = tmp_path / "jobs.jsonl"
    with manifest.open("w") as handle:
        for i in range(2_500):
            handle.write(json.dumps({"id": f"j{i}", "prompt": "x" * 32_000, "n": 4}) + "\n")
    events: list[dict[str, Any]] = [{"event": "run", "manifest": str(manifest), "settings": {}}]
    for i in range(2_500):
        minute = f"2026-01-01T10:{i // 100:02d}:{i % 60:02d}.000Z"
        model = ("gpt-image-1", "dall-e-2")[i % 2]
        events.append(result(f"j{i}#0", n=4, model=model, finished_at=minute, attempts=1 + i % 3))
    write_ledger(tmp_path / "out", events)
    page = write_gallery(tmp_path / "out").read_text()
    assert page.count("<figure") == 10_000
    assert page.count('loading="lazy"') == 10_000
    assert len(page.encode()) < 10_000 * 1_500
    assert page.count("<rect") <= 120


# -- a real browser -------------------------------------------------------------------------


@dataclass
class Folder:
    out: Path
    ledger: list[dict[str, Any]]


@pytest.fixture
async def run_folder(tmp_path: Path) -> AsyncIterator[Folder]:
    """A real run against the simulator: PNG, JPEG and WebP images, a retry and a refusal."""
    jobs = [
        {"id": "fox", "prompt": HOSTILE, "model": "dall-e-3", "size": "1792x1024"},
        {"id": "mug", "prompt": "a mug", "model": "gpt-image-1", "n": 2, "output_format": "jpeg"},
        {"id": "leaf", "prompt": "a leaf", "model": "gpt-image-1", "output_format": "webp"},
        {"id": "cat", "prompt": "a cat", "model": "dall-e-2", "n": 3, "size": "256x256"},
        {"id": "nope", "prompt": f"a {BLOCKED}", "model": "dall-e-3"},
    ]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    out = tmp_path / "out"
    async with Simulator(SimConfig(seed=1, content_policy_marker=BLOCKED)) as sim:
        sim.enqueue("429")
        settings = settings_for(sim, concurrency=1)
        async with Engine(settings, out_dir=out, sleep=no_sleep) as engine:
            await run_all(engine, load_manifest(manifest))
    lines = (out / "ledger.jsonl").read_text().splitlines()
    yield Folder(out, [e for e in map(json.loads, lines) if e["event"] == "result"])


def _artifact_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("COMETBATCH_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


_VISIBLE = """figures => figures
    .filter(f => getComputedStyle(f).display !== "none")
    .map(f => f.className)"""
# Lazy images load when scrolled near; asking for every one now and awaiting decode()
# proves each file decodes (decode() rejects for bytes the browser cannot decode).
_DECODE_ALL = """async () => Promise.all([...document.querySelectorAll("#sheet img")].map(img => {
    img.loading = "eager";
    return img.decode().then(
        () => [img.getAttribute("src"), img.naturalWidth],
        () => [img.getAttribute("src"), 0]);
}))"""


async def test_gallery_in_headless_chromium(
    chromium: str, run_folder: Folder, tmp_path: Path
) -> None:
    """Thumbnails decode, filters hide what they should, nothing leaves the folder."""
    from playwright.async_api import async_playwright

    ok_images = sum(len(e["images"]) for e in run_folder.ledger if e["status"] == "ok")
    assert any(e["attempts"] > 1 for e in run_folder.ledger)
    page_path = write_gallery(run_folder.out)
    requested: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            await page.goto(page_path.as_uri())
            lazy = await page.eval_on_selector_all("#sheet img", "i => i.map(x => x.loading)")
            assert lazy == ["lazy"] * ok_images
            decoded = await page.evaluate(_DECODE_ALL)
            assert len(decoded) == ok_images
            assert [src for src, width in decoded if width <= 0] == []
            assert {Path(src).suffix for src, _ in decoded} == {".png", ".jpg", ".webp"}
            assert await page.evaluate("window.pwned") is None
            caption = page.locator("figure:has(b:text-is('fox')) p").first
            assert await caption.text_content() == HOSTILE

            options = await page.eval_on_selector_all(
                "#f-model option", "os => os.map(o => [o.value, o.textContent])"
            )
            dalle3 = next(value for value, text in options if text.startswith("dall-e-3 "))
            await page.select_option("#f-model", dalle3)
            shown = await page.eval_on_selector_all("#sheet figure", _VISIBLE)
            assert len(shown) == 2  # the fox, and the refused job's placeholder
            assert all(f"m{dalle3} " in f + " " for f in shown)
            assert await page.text_content("#shown") == "2 shown"

            statuses = await page.eval_on_selector_all(
                "#f-status option", "os => os.map(o => [o.value, o.textContent])"
            )
            failed = next(value for value, text in statuses if text.startswith("failed "))
            await page.select_option("#f-status", failed)
            shown = await page.eval_on_selector_all("#sheet figure", _VISIBLE)
            assert shown == [f"m{dalle3} s{failed}"]
            assert "content_policy" in (await page.text_content(f"figure.s{failed}") or "")

            await page.select_option("#f-model", "")
            await page.select_option("#f-status", "")
            shown = await page.eval_on_selector_all("#sheet figure", _VISIBLE)
            assert len(shown) == ok_images + 1
            assert await page.locator("#chart svg rect").count() >= 1
            assert "content_policy" in (await page.text_content("#failures") or "")

            shot = _artifact_dir(tmp_path) / "gallery.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"gallery screenshot saved to {shot}")
            assert shot.stat().st_size > 0
        finally:
            await browser.close()
    assert requested and all(url.startswith("file://") for url in requested)


_IMAGES_LOADED = (
    """() => [...document.images].filter(i => i.complete && i.naturalWidth > 0).length"""
)
_LAST_IMAGE_DECODED = """() => {
    const images = document.querySelectorAll("#sheet img");
    const last = images[images.length - 1];
    return last.complete && last.naturalWidth > 0;
}"""


async def test_ten_thousand_images_stay_usable_in_chromium(chromium: str, tmp_path: Path) -> None:
    """With 10,000 images only those in view load, a filter applies, scrolling loads the rest."""
    from playwright.async_api import async_playwright

    from cometbatch.simulator.imagegen import make_png

    out = tmp_path / "out"
    pictures = [make_png(64, 48, seed) for seed in range(8)]
    events: list[dict[str, Any]] = [{"event": "run", "settings": {}}]
    for i in range(2_500):
        model = ("gpt-image-1", "dall-e-2")[i % 2]
        events.append(result(f"j{i}#0", n=4, model=model))
        folder = out / "images" / f"j{i}"
        folder.mkdir(parents=True)
        for k in range(4):
            (folder / f"{k}.png").write_bytes(pictures[(i + k) % 8])
    events += [result(f"f{i}#0", "failed", error=error("server", 503)) for i in range(50)]
    write_ledger(out, events)
    page_path = write_gallery(out)
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(page_path.as_uri())
            await page.wait_for_function(f"({_IMAGES_LOADED})() >= 6")
            assert await page.locator("#sheet figure").count() == 10_050
            loaded = await page.evaluate(_IMAGES_LOADED)
            assert loaded < 1_000  # lazy: the rest wait until they are scrolled near

            options = await page.eval_on_selector_all(
                "#f-model option", "os => os.map(o => [o.value, o.textContent])"
            )
            dalle2 = next(value for value, text in options if text.startswith("dall-e-2 "))
            took = await page.evaluate(
                """value => {
                    const start = performance.now();
                    const select = document.getElementById("f-model");
                    select.value = value;
                    select.dispatchEvent(new Event("change"));
                    document.body.offsetHeight;  // force the style and layout pass
                    return performance.now() - start;
                }""",
                dalle2,
            )
            shown = await page.eval_on_selector_all("#sheet figure", _VISIBLE)
            assert len(shown) == 5_000 and set(shown) == {f"m{dalle2} s0"}
            assert await page.text_content("#shown") == "5000 shown"
            await page.select_option("#f-model", "")
            await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            await page.wait_for_function(_LAST_IMAGE_DECODED)
            print(f"10,000 images: {loaded} loaded at first, a filter took {took:.0f} ms")
        finally:
            await browser.close()


def test_odd_types_in_run_and_end_lines_do_not_break_the_page(tmp_path: Path) -> None:
    """Hand-edited run and end lines with values of other types give a page, not an error."""
    run = {"event": "run", "run_id": "r", "started_at": 5, "settings": [], "manifest": ["x"]}
    end = {"event": "end", "finished_at": ["t"], "summary": {"rate_limited": "many"}}
    write_ledger(tmp_path, [run, result("a", "ok"), end])
    page = write_gallery(tmp_path).read_text(encoding="utf-8")
    assert "images/a/0.png" in page
