"""Dollars for an answer's `usage` tokens at a model's token rates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Price = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]


class TokenRates(BaseModel):
    """Dollars per million tokens, for models whose answers report `usage`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text_input: Price
    image_input: Price
    image_output: Price
    # Text the model writes (billed by some models); None: such tokens cost image_output.
    text_output: Price | None = None


def _count(value: Any) -> int | None:
    """A token count from an API answer, or None if it is not a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _split(total: int, details: Any, first: str, second: str) -> tuple[int, int]:
    """`total` split by a usage `*_tokens_details` object (all `first` without one)."""
    # A part the object leaves out is the rest of `total`, and the parts never exceed it.
    one = two = None
    if isinstance(details, Mapping):
        one, two = _count(details.get(first)), _count(details.get(second))
    if one is None and two is None:
        return total, 0
    if one is None:
        one = max(total - (two or 0), 0)
    if two is None:
        two = max(total - one, 0)
    # Details that add up to more than the total are not believed past it: the total is
    # what the answer says was used.
    one = min(one, total)
    return one, min(two, total - one)


def usage_cost(usage: Any, rates: TokenRates) -> float | None:
    """Dollars for an answer's `usage` tokens; None if `usage` does not hold token counts."""
    if not isinstance(usage, Mapping):
        return None
    input_tokens = _count(usage.get("input_tokens"))
    output_tokens = _count(usage.get("output_tokens"))
    if input_tokens is None or output_tokens is None:
        return None
    text_in, image_in = _split(
        input_tokens, usage.get("input_tokens_details"), "text_tokens", "image_tokens"
    )
    image_out, text_out = _split(
        output_tokens, usage.get("output_tokens_details"), "image_tokens", "text_tokens"
    )
    text_out_rate = rates.image_output if rates.text_output is None else rates.text_output
    dollars = (
        text_in * rates.text_input
        + image_in * rates.image_input
        + image_out * rates.image_output
        + text_out * text_out_rate
    )
    return dollars / 1_000_000
