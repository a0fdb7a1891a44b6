"""Where a data entry's facts come from: its date, as models.toml and prices.toml give it."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator


def date_text(value: Any) -> Any:
    """A date as "YYYY-MM-DD" (TOML may give a date object); anything else is left to fail."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        try:
            return date.fromisoformat(value).isoformat()
        except ValueError:
            raise ValueError("must be a date, YYYY-MM-DD") from None
    return value


# An entry's `as_of`: a real calendar date, kept as ISO text.
DateText = Annotated[str, BeforeValidator(date_text)]
