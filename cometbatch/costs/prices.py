"""List prices as data (built in, dated; a user file merged over) and the one cost rule."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass, field
from functools import cache, partial
from importlib import resources
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import PricesError
from ..manifest.job import Job
from ..models.datafile import read_data_file
from ..models.provenance import DateText, date_text
from ..models.sizes import parse_size
from ..plan import Request
from ..validation import first_problem
from .tokenprices import Price, TokenRates, usage_cost

__all__ = [
    "PRICES_AS_OF",
    "CostEstimate",
    "ModelPrices",
    "PriceTable",
    "actual",
    "builtin_prices",
    "estimate",
    "format_usd",
    "load_prices",
    "request_cost",
    "spent",
]

# The newest `as_of` date in the built-in table (each entry has its own).
PRICES_AS_OF = "2026-11-21"
# A quality or size of "*" in the table matches any; a job's "auto" is priced as the default.
ANY = "*"
AUTO = "auto"
_TOP_LEVEL = frozenset({"as_of", "currency", "models"})


Text = Annotated[str, Field(min_length=1)]


def _scaled(by_size: Mapping[str, float], size: str) -> float | None:
    """A size the table does not list, priced from the closest listed one scaled by area."""
    # Closest aspect ratio first, then closest area; None without a "WxH" size or list.
    wanted = parse_size(size)
    listed = [(dims, price) for name, price in by_size.items() if (dims := parse_size(name))]
    if wanted is None or not listed:
        return None
    width, height = wanted
    ratio, area = math.log(width / height), width * height

    def distance(item: tuple[tuple[int, int], float]) -> tuple[float, int]:
        (w, h), _ = item
        return abs(math.log(w / h) - ratio), abs(w * h - area)

    (w, h), price = min(listed, key=distance)
    return price * area / (w * h)


class ModelPrices(BaseModel):
    """One model's prices: per image by quality and size, and per token where it has them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Where the figures came from (an address, or "estimate: <basis>") and when.
    source: Text | None = None
    as_of: DateText | None = None
    note: Text | None = None
    # What a job that sets no size or quality (or "auto") is priced as.
    default_size: str | None = None
    default_quality: str | None = None
    # quality -> size -> dollars per image; "*" matches any quality or size.
    per_image: dict[str, dict[str, Price]] = Field(default_factory=dict)
    tokens: TokenRates | None = None

    def image_price(self, size: str | None, quality: str | None) -> float | None:
        """Dollars per image at this size and quality; None when the table has no price."""
        # A size the table does not list costs its quality's "*" price; failing that, a
        # token-priced model (billed by tokens, so by size) gets an estimate scaled by area.
        if size in (None, AUTO):
            size = self.default_size
        if quality in (None, AUTO):
            quality = self.default_quality
        by_size = self.per_image.get(quality) if quality is not None else None
        if by_size is None:
            by_size = self.per_image.get(ANY)
        if by_size is None:
            return None
        price = by_size.get(size) if size is not None else None
        if price is None:
            price = by_size.get(ANY)
        if price is None and size is not None and self.tokens is not None:
            price = _scaled(by_size, size)
        return price


class PriceTable(BaseModel):
    """Prices for every model cometbatch knows a price for, and where they came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    currency: Literal["USD"] = "USD"
    models: dict[str, ModelPrices] = Field(default_factory=dict)
    # Override files merged over the built-in table, in order.
    sources: tuple[str, ...] = ()

    def dates(self, models: Iterable[str] | None = None) -> list[str]:
        """The `as_of` dates of these models' entries (all entries by default), oldest first."""
        names = self.models if models is None else models
        found = {spec.as_of for name in names if (spec := self.models.get(name)) and spec.as_of}
        return sorted(found)

    @property
    def as_of(self) -> str | None:
        """The newest date of any entry; None when no entry is dated."""
        dates = self.dates()
        return dates[-1] if dates else None

    def describe(self, models: Iterable[str] | None = None) -> str:
        """Where these prices come from (for `models`, else the whole table), next to a figure."""
        dates = self.dates(models)
        text = "list-price estimates"
        if dates:
            text += f" as of {dates[-1]}"
        if len(dates) > 1:
            text += f", some from {dates[0]}"
        if self.sources:
            text += f", with overrides from {', '.join(self.sources)}"
        return text

    def per_image(self, model: str, size: str | None, quality: str | None) -> float | None:
        """Dollars per image; None for a model, size or quality the table has no price for."""
        spec = self.models.get(model)
        return None if spec is None else spec.image_price(size, quality)

    def merged(self, data: Any, *, source: str) -> PriceTable:
        """This table with `data` (the same shape, partial) merged over it; PricesError if bad."""
        # The entries `data` sets are credited to `source` and dated by its top-level `as_of`,
        # unless they name their own `source` and `as_of`.
        if not isinstance(data, Mapping):
            raise PricesError("must be a table (a TOML document or a JSON object)", source=source)
        for key in data:
            if key not in _TOP_LEVEL:
                raise PricesError(
                    "unknown entry (expected as_of, currency or models)", source=source, entry=key
                )
        over = {key: value for key, value in data.items() if key != "as_of"}
        if isinstance(over.get("models"), Mapping):
            stamp = {"source": source, "as_of": _file_date(data.get("as_of"), source)}
            over["models"] = {
                name: {**stamp, **entry} if isinstance(entry, Mapping) else entry
                for name, entry in over["models"].items()
            }
        base = self.model_dump(exclude={"sources"}, exclude_none=True)
        merged = _merge(base, over)
        merged["sources"] = (*self.sources, source)
        try:
            return PriceTable.model_validate(merged)
        except ValidationError as exc:
            first = first_problem(exc)
            raise PricesError(first.message, source=source, entry=first.where or None) from None


def _file_date(value: Any, source: str) -> str | None:
    """An override file's top-level `as_of` as "YYYY-MM-DD"; PricesError if it is not a date."""
    if value is None:
        return None
    try:
        text = date_text(value)
    except ValueError:
        text = None
    if not isinstance(text, str):
        raise PricesError("must be a date, YYYY-MM-DD", source=source, entry="as_of")
    return text


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in: tables merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@cache
def builtin_prices() -> PriceTable:
    """The table shipped with cometbatch (read once)."""
    text = resources.files("cometbatch.costs").joinpath("prices.toml").read_text(encoding="utf-8")
    return PriceTable.model_validate(tomllib.loads(text))


def load_prices(path: str | os.PathLike[str] | None = None) -> PriceTable:
    """The built-in prices with the file at `path` (TOML, or JSON for .json) merged over them."""
    table = builtin_prices()
    if path is None:
        return table
    source = str(path)
    data = read_data_file(path, partial(PricesError, source=source), json_suffix=True)
    return table.merged(data, source=source)


def estimate(item: Job | Request, prices: PriceTable | None = None) -> float | None:
    """Planned dollars for a job (all its images) or one request; None if not priced."""
    job = item if isinstance(item, Job) else item.job
    per_image = (prices or builtin_prices()).per_image(job.model, job.size, job.quality)
    return None if per_image is None else per_image * item.n


def request_cost(
    model: str,
    usage: Any,
    generated: int,
    size: str | None,
    quality: str | None,
    prices: PriceTable,
) -> tuple[float | None, str]:
    """The one cost rule: dollars for `generated` images, and the basis of the figure."""
    # Bases: "usage" (the answer's tokens), "list" (per-image price), "none" (nothing
    # generated), "unpriced" (None dollars). The run records it; the budget and status read it.
    if generated == 0:
        return 0.0, "none"
    spec = prices.models.get(model)
    if spec is None:
        return None, "unpriced"
    if spec.tokens is not None and usage:
        dollars = usage_cost(usage, spec.tokens)
        if dollars is not None:
            return dollars, "usage"
    per_image = spec.image_price(size, quality)
    return (None, "unpriced") if per_image is None else (per_image * generated, "list")


def actual(
    model: str,
    usage: Any,
    images: int,
    size: str | None = None,
    quality: str | None = None,
    *,
    prices: PriceTable | None = None,
) -> float | None:
    """Dollars a finished request cost by `request_cost` (None: no price known)."""
    return request_cost(model, usage, images, size, quality, prices or builtin_prices())[0]


class Finished(Protocol):
    """What `spent` reads of a finished request (a Result)."""

    @property
    def job(self) -> Job: ...
    @property
    def reused(self) -> bool: ...
    @property
    def images(self) -> Sized: ...
    @property
    def downloads(self) -> Sized: ...
    @property
    def usage(self) -> Any: ...


def spent(result: Finished, prices: PriceTable | None = None) -> float | None:
    """What this run paid for a result by `request_cost`: nothing for a reused one."""
    if result.reused:
        return 0.0
    # download_failed: the images were generated (paid) whether or not they are on disk yet.
    generated = len(result.images) + len(result.downloads)
    job = result.job
    table = prices or builtin_prices()
    return request_cost(job.model, result.usage, generated, job.size, job.quality, table)[0]


def format_usd(value: float | None) -> str:
    """A dollar figure for people: "$12.34", "$0.042", or "unknown"."""
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if value >= 1 else f"${value:.3f}"


@dataclass(slots=True)
class CostEstimate:
    """A plan's cost at list prices, and the images it could not price."""

    prices: PriceTable = field(default_factory=builtin_prices)
    usd: float = 0.0
    priced_images: int = 0
    unpriced_images: int = 0
    by_model: dict[str, float] = field(default_factory=dict)
    # "model size quality" -> images without a price.
    unpriced: dict[str, int] = field(default_factory=dict)

    def add(self, item: Job | Request) -> float | None:
        """Count a job (all its images) or one request; returns its estimate."""
        cost = estimate(item, self.prices)
        job = item if isinstance(item, Job) else item.job
        if cost is None:
            self.unpriced_images += item.n
            what = " ".join(str(part) for part in (job.model, job.size, job.quality) if part)
            self.unpriced[what] = self.unpriced.get(what, 0) + item.n
        else:
            self.usd += cost
            self.priced_images += item.n
            self.by_model[job.model] = self.by_model.get(job.model, 0.0) + cost
        return cost

    def add_all(self, items: Iterable[Job | Request]) -> CostEstimate:
        """Count every job or request; returns self."""
        for item in items:
            self.add(item)
        return self

    @property
    def total(self) -> float | None:
        """The estimate in dollars; None when nothing at all could be priced."""
        return None if self.priced_images == 0 and self.unpriced_images else self.usd

    def __str__(self) -> str:
        text = f"{format_usd(self.total)} ({self.prices.describe(self.by_model or None)}"
        if self.unpriced_images:
            names = ", ".join(sorted(self.unpriced))
            text += f"; {self.unpriced_images} image(s) of unknown price: {names}"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `--json` output."""
        # The date of each price this estimate used; the newest of them, else the table's.
        dates = {
            name: spec.as_of
            for name in sorted(self.by_model)
            if (spec := self.prices.models.get(name)) and spec.as_of
        }
        return {
            "estimated_usd": None if self.total is None else round(self.usd, 6),
            "prices_as_of": max(dates.values(), default=self.prices.as_of),
            "price_dates": dates,
            "price_sources": list(self.prices.sources),
            "priced_images": self.priced_images,
            "unpriced_images": self.unpriced_images,
            "by_model": {name: round(usd, 6) for name, usd in sorted(self.by_model.items())},
            "unpriced": dict(sorted(self.unpriced.items())),
        }
