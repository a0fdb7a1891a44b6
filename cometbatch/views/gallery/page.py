"""The gallery as one self-contained HTML page: inline CSS, an inline SVG chart, a little JS."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime
from html import escape as html_escape
from urllib.parse import quote

from ...textsafe import printable, storable
from ..crashes import crash_dicts, crash_text
from .model import Bucket, Gallery, Tile

# Characters of a prompt the page keeps per figure: a 32,000-character gpt-image prompt on
# 10,000 figures would make a page nobody can open.
MAX_PROMPT = 300
MAX_MESSAGE = 500
_DOT = " \u00b7 "
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")

_CSS = """
:root{color-scheme:light dark;font:14px/1.4 system-ui,sans-serif}
body{margin:0 auto;max-width:1600px;padding:0 16px 32px}
h1{font-size:20px;margin:16px 0 4px}h2{font-size:16px;margin:20px 0 8px}
.facts,.note,.legend{margin:4px 0;color:GrayText}.sim{color:#b60;font-weight:600}
nav{position:sticky;top:0;z-index:1;padding:8px 0;background:Canvas;display:flex;gap:16px;
align-items:center;border-bottom:1px solid #8884}
#sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px;
margin-top:12px}
figure{margin:0;border:1px solid #8884;border-radius:6px;overflow:hidden;
content-visibility:auto;contain-intrinsic-size:auto 290px}
figure img,.ph{display:block;width:100%;height:170px;object-fit:contain;background:#8882}
.ph{display:grid;place-items:center;text-align:center;color:#c33;font-weight:600;
background:repeating-linear-gradient(45deg,#c332 0 8px,transparent 8px 16px)}
figcaption{padding:6px 8px;font-size:12px}figcaption p{margin:2px 0;overflow:hidden;
display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical}
.meta{color:GrayText}.rev{font-style:italic;color:GrayText}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #8884;padding:3px 6px;
text-align:left;vertical-align:top}td.msg{max-width:60ch;overflow-wrap:anywhere}
svg{width:100%;max-width:960px;height:auto}svg text{font:11px system-ui,sans-serif;
fill:currentColor}.bar{fill:#3a7bd5}.retry{stroke:#e08a00}.r429{stroke:#d33}
svg polyline{fill:none;stroke-width:2}circle.retry{fill:#e08a00}circle.r429{fill:#d33}
.axis{stroke:#8888}
"""

_SCRIPT = """
(() => {
  const sheet = document.getElementById("sheet");
  const counts = JSON.parse(document.getElementById("counts").textContent);
  const model = document.getElementById("f-model");
  const status = document.getElementById("f-status");
  const shown = document.getElementById("shown");
  function update() {
    // One attribute per filter on the container: CSS rules hide the figures, so a
    // change costs one style pass however many figures there are.
    for (const [name, value] of [["model", model.value], ["status", status.value]]) {
      if (value) sheet.dataset[name] = value; else delete sheet.dataset[name];
    }
    let n = 0;
    for (const [key, count] of Object.entries(counts)) {
      const [m, s] = key.split(" ");
      if ((!model.value || m === model.value) && (!status.value || s === status.value)) n += count;
    }
    shown.textContent = n + " shown";
  }
  model.addEventListener("change", update);
  status.addEventListener("change", update);
  update();
})();
"""


def escape(text: str) -> str:
    """`text` for HTML: markup escaped, controls, bidi overrides and lone surrogates shown."""
    # As escapes (a prompt's line breaks kept), so that the page is valid UTF-8.
    return html_escape(printable(text, newlines=True))


def _clip(text: str, limit: int) -> str:
    """`text` escaped for HTML, cut to `limit` characters with an ellipsis."""
    return escape(text if len(text) <= limit else text[: limit - 1] + "\u2026")


def _clock(seconds: float) -> str:
    """A UTC wall-clock time for the chart's labels."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%H:%M:%S")


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")


def _legend(gallery: Gallery) -> str:
    """What the chart's lines count (older ledgers did not count each request's 429s)."""
    text = (
        "Bars: images per minute. Lines: retries (orange) and 429 answers (red) per minute, "
        f"each counted when its request finished, in buckets of {gallery.bucket_s} s."
    )
    if not gallery.per_result_429s:
        text += (
            " This ledger's older lines do not count their 429s: for them the red line shows "
            f"only requests whose final answer was a 429; the runs' summaries count "
            f"{gallery.rate_limited} in all."
        )
    return f'<p class="legend">{text}</p>'


def render_chart(buckets: list[Bucket], width_s: int) -> str:
    """Images, retries and 429s per minute as an inline SVG (bars and two lines)."""
    if not buckets:
        return "<p class=note>No timestamped results yet.</p>"
    per_min = 60 / width_s
    left, right, step = 56, 950, (950 - 56) / len(buckets)
    top_max = max(b.images for b in buckets) * per_min or 1
    low_peak = max(max(b.retries, b.throttled) for b in buckets) * per_min
    low_max = low_peak or 1
    parts = [
        '<svg viewBox="0 0 960 250" role="img" aria-label="images, retries and 429s per minute">',
        f'<text x="4" y="16">{_rate(top_max)}/min</text><text x="4" y="136">0</text>',
        f'<text x="4" y="166">{_rate(low_max)}/min</text><text x="4" y="226">0</text>'
        if low_peak
        else f'<text x="{left + 8}" y="212">no retries, no 429s</text>',
        f'<line class="axis" x1="{left}" y1="130" x2="{right}" y2="130"/>',
        f'<line class="axis" x1="{left}" y1="220" x2="{right}" y2="220"/>',
    ]
    retry_points: list[str] = []
    throttle_points: list[str] = []
    for i, b in enumerate(buckets):
        x = left + i * step
        height = b.images * per_min / top_max * 115
        label = (
            f"{_clock(b.start)} UTC: {_rate(b.images * per_min)} images/min, "
            f"{b.retries} retries, {b.throttled} 429s, {b.failed} failed"
        )
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{130 - height:.1f}" width="{max(step - 1, 1):.1f}"'
            f' height="{height:.1f}"><title>{label}</title></rect>'
        )
        middle = x + step / 2
        for points, count, name in (
            (retry_points, b.retries, "retry"),
            (throttle_points, b.throttled, "r429"),
        ):
            y = 220 - count * per_min / low_max * 55
            points.append(f"{middle:.1f},{y:.1f}")
            if count:  # a dot, so that a lone bucket shows too
                parts.append(f'<circle class="{name}" cx="{middle:.1f}" cy="{y:.1f}" r="3"/>')
    end = buckets[-1].start + width_s
    parts += [
        f'<polyline class="retry" points="{" ".join(retry_points)}"/>',
        f'<polyline class="r429" points="{" ".join(throttle_points)}"/>',
        f'<text x="{left}" y="240">{_clock(buckets[0].start)} UTC</text>',
        f'<text x="{right}" y="240" text-anchor="end">{_clock(end)} UTC</text>',
        "</svg>",
    ]
    return "".join(parts)


def _figure(
    tile: Tile, gallery: Gallery, model_ix: dict[str, int], status_ix: dict[str, int]
) -> str:
    """One figure: the thumbnail (or a placeholder for images that failed) and its caption."""
    job = gallery.jobs.get(tile.job_id)
    size = job.size if job is not None and job.size else ""
    classes = f"m{model_ix[tile.model]} s{status_ix[tile.status]}"
    if tile.path is not None:
        href = escape(quote(storable(tile.path)))
        dims = _SIZE.fullmatch(size)
        wh = f' width="{dims[1]}" height="{dims[2]}"' if dims else ""
        alt = escape(f"{tile.job_id} #{tile.index}")
        picture = (
            f'<a href="{href}"><img src="{href}" alt="{alt}" loading="lazy" decoding="async"{wh}>'
            "</a>"
        )
        name = f"<b>{escape(tile.job_id)}</b> #{escape(str(tile.index))}"
    else:
        images = _count(tile.n, "image")
        picture = (
            f'<div class="ph">{escape(tile.status)}<br>{escape(tile.reason)}<br>{images}</div>'
        )
        name = f"<b>{escape(tile.job_id)}</b>"
    meta = _DOT.join(escape(part) for part in (tile.model, size) if part)
    prompt = _clip(job.prompt, MAX_PROMPT) if job is not None else "<i>prompt not known</i>"
    revised = tile.revised_prompt
    rev = f'<p class="rev">{_clip(revised, MAX_PROMPT)}</p>' if revised else ""
    return (
        f'<figure class="{classes}">{picture}<figcaption>{name} <span class="meta">{meta}</span>'
        f"<p>{prompt}</p>{rev}</figcaption></figure>"
    )


def _failures(gallery: Gallery) -> str:
    """The failures grouped by kind, with a few examples each."""
    if not gallery.failures:
        return "<p class=note>No failed requests.</p>"
    parts = []
    for kind, count, examples in gallery.failure_groups():
        rows = "".join(
            f"<tr><td>{escape(f.job_id)}</td><td>{escape(f.model)}</td>"
            f"<td>{escape(str(f.status or ''))} {escape(f.code)}</td>"
            f'<td class="msg">{_clip(f.message, MAX_MESSAGE)}</td><td>{escape(f.request_id)}</td>'
            f"<td>{escape(f.finished_at)}</td></tr>"
            for f in examples
        )
        parts.append(
            f"<details open><summary><b>{escape(kind)}</b>: {_count(count, 'request')}</summary>"
            f"<table><tr><th>job</th><th>model</th><th>status</th>"
            f"<th>message</th><th>request id</th><th>finished</th></tr>{rows}</table></details>"
        )
    return "".join(parts)


def _options(label: str, names: list[str], counts: Counter[str]) -> str:
    """A filter's options: all, then one per name with its figure count."""
    total = sum(counts.values())
    items = [f'<option value="">all {label} ({total})</option>']
    items += [
        f'<option value="{i}">{escape(name)} ({counts[name]})</option>'
        for i, name in enumerate(names)
    ]
    return "".join(items)


def render_page(gallery: Gallery) -> str:
    """The whole page; every user-controlled string is escaped, nothing is fetched."""
    models = gallery.models
    statuses = sorted({t.status for t in gallery.tiles}, key=lambda s: (s != "ok", s))
    model_ix = {name: i for i, name in enumerate(models)}
    status_ix = {name: i for i, name in enumerate(statuses)}
    combos = Counter(f"{model_ix[t.model]} {status_ix[t.status]}" for t in gallery.tiles)
    rules = [f'#sheet[data-model="{i}"]>figure:not(.m{i})' for i in range(len(models))]
    rules += [f'#sheet[data-status="{i}"]>figure:not(.s{i})' for i in range(len(statuses))]
    hide = ",".join(rules) + "{display:none}" if rules else ""
    title = escape(gallery.title or "cometbatch")
    facts = [
        _count(gallery.image_count, "image"),
        _count(len(gallery.failures), "failed request"),
        _count(gallery.runs, "run"),
        _count(gallery.retries, "retry", "retries"),
        _count(gallery.rate_limited, "429"),
    ]
    if gallery.first_at:
        facts.append(f"{gallery.first_at} to {gallery.last_at or 'now'}")
    sim = f'{_DOT}<span class="sim">simulated</span>' if gallery.simulated else ""
    notes = [gallery.manifest_note] if gallery.manifest_note else []
    if gallery.dropped_tiles:
        notes.append(f"the oldest {gallery.dropped_tiles} figures are left out")
    notes += [f"{crash_text(row)}: may have been billed" for row in crash_dicts(gallery.crashes)]
    note = "".join(f'<p class="note">{escape(text)}</p>' for text in notes)
    source = f"{_DOT}manifest {escape(gallery.manifest)}" if gallery.manifest else ""
    figures = "".join(_figure(t, gallery, model_ix, status_ix) for t in gallery.tiles)
    counts = json.dumps(combos).replace("<", "\\u003c")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{title} \u2014 cometbatch gallery</title><style>{_CSS}{hide}</style></head>"
        f'<body><header><h1>{title}</h1><p class="facts">'
        f"{escape(_DOT.join(facts))}{sim}{source}</p>{note}</header>"
        f'<section id="chart"><h2>Over time</h2>'
        f"{render_chart(gallery.buckets, gallery.bucket_s)}"
        f"{_legend(gallery)}</section>"
        f'<section id="failures"><h2>Failures</h2>{_failures(gallery)}</section>'
        f'<nav id="filters"><label>Model <select id="f-model">'
        f"{_options('models', models, Counter(t.model for t in gallery.tiles))}</select></label>"
        f'<label>Status <select id="f-status">'
        f"{_options('statuses', statuses, Counter(t.status for t in gallery.tiles))}"
        '</select></label><output id="shown"></output></nav>'
        f'<main id="sheet">{figures}</main>'
        f'<script type="application/json" id="counts">{counts}</script>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
