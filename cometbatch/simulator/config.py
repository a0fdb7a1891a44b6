"""How the simulated CometAPI behaves: its one configuration model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SimConfig(BaseModel):
    """How the simulated API behaves: latency, image payloads, limits and fault rates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latency: float = Field(default=0.0, ge=0)
    latency_jitter: float = Field(default=0.0, ge=0)
    image_px: int = Field(default=64, ge=1, le=4096)
    payload_bytes: int | None = Field(default=None, gt=0)
    rate_429: float = Field(default=0.0, ge=0, le=1)
    rate_429_bare: float = Field(default=0.0, ge=0, le=1)
    retry_after: float = Field(default=1.0, ge=0)
    rate_5xx: float = Field(default=0.0, ge=0, le=1)
    rate_drop: float = Field(default=0.0, ge=0, le=1)
    rate_malformed: float = Field(default=0.0, ge=0, le=1)
    # Fraction of n>1 requests answered with half the images (a short answer, billed as such);
    # drawn apart from the faults above, which replace the answer instead of shaping it.
    rate_short: float = Field(default=0.0, ge=0, le=1)
    rpm_limit: int | None = Field(default=None, ge=1)
    ipm_limit: int | None = Field(default=None, ge=1)
    api_key: str | None = Field(default=None, repr=False)
    url_ttl: float = Field(default=3600.0, ge=0)
    slow_seconds: float = Field(default=30.0, ge=0)
    # The size of a "download-huge" answer: by default just over the client's 64 MiB cap.
    huge_download_bytes: int = Field(default=64 * 1024 * 1024 + 1, gt=0)
    seed: int | None = None
    record_requests: bool = True
    # Prompts containing this text are refused as a content-policy violation (a 400).
    content_policy_marker: str | None = None

    @model_validator(mode="after")
    def _rates_fit(self) -> SimConfig:
        total = self.fault_rates_total()
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"the fault rates add up to {total:g}, more than 1 (rate_429, rate_429_bare, "
                "rate_5xx, rate_drop and rate_malformed each take a share of the requests)"
            )
        return self

    def fault_rates(self) -> tuple[tuple[str, float], ...]:
        """Each random fault with its rate, in the order a draw is matched against them."""
        return (
            ("429", self.rate_429),
            ("429-bare", self.rate_429_bare),
            ("5xx", self.rate_5xx),
            ("drop", self.rate_drop),
            ("malformed", self.rate_malformed),
        )

    def fault_rates_total(self) -> float:
        """The fraction of requests that get a random fault."""
        return sum(rate for _, rate in self.fault_rates())
