"""What a manifest asks for, counted while it is checked: jobs, requests and images per model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job import Job

__all__ = ["ManifestStats", "ModelPlan"]


@dataclass(slots=True)
class ModelPlan:
    """Work for one model: jobs, requests and images."""

    jobs: int = 0
    requests: int = 0
    images: int = 0


@dataclass(slots=True)
class ManifestStats:
    """Totals gathered while validating a manifest."""

    jobs: int = 0
    requests: int = 0
    images: int = 0
    by_model: dict[str, ModelPlan] = field(default_factory=dict)
    # The most images any one request will carry (sizes the --ipm pacing bucket).
    max_request_images: int = 0

    def add(self, job: Job, max_n: int) -> None:
        """Count one job that fans out into requests of at most max_n images."""
        self.count(job.model, job.n, max_n)

    def count(self, model: str, n: int, max_n: int, jobs: int = 1) -> None:
        """Count `jobs` jobs of `model`, each of n images in requests of at most max_n."""
        requests = -(-n // max_n)
        self.max_request_images = max(self.max_request_images, min(n, max_n))
        plan = self.by_model.setdefault(model, ModelPlan())
        for target in (self, plan):
            target.jobs += jobs
            target.requests += requests * jobs
            target.images += n * jobs
