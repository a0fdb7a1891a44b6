"""cometbatch: resumable, rate-limit-aware batch image generation through CometAPI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._version import __version__
    from .engine.engine import Engine
    from .engine.summary import Summary
    from .errors import (
        APIConnectionError,
        APIError,
        APIResponseError,
        APIStatusError,
        APITimeoutError,
        AuthenticationError,
        BadRequestError,
        BudgetExceededError,
        CapabilityError,
        ChangedJobsError,
        CometBatchError,
        ConfigError,
        ContentPolicyError,
        DownloadError,
        ImageDataError,
        IncompatibleAPIError,
        LedgerError,
        ManifestError,
        ManifestFileError,
        ManifestProblem,
        NotFoundError,
        OutputError,
        PermissionDeniedError,
        PricesError,
        RateLimitError,
        ServerError,
        UpstreamDownError,
    )
    from .manifest.job import Job
    from .manifest.reader import Manifest, load_manifest
    from .models.registry import ModelRegistry
    from .models.spec import ModelSpec
    from .results import Result
    from .settings import Settings
    from .simulator.config import SimConfig
    from .simulator.server import Simulator

# Each public name and the module that defines it. A name is imported on first use, so that
# `import cometbatch` (and `cometbatch --help`) does not pay for aiohttp, pydantic or the
# simulator's web server before they are needed.
_HOME = {
    "APIConnectionError": ".errors",
    "APIError": ".errors",
    "APIResponseError": ".errors",
    "APIStatusError": ".errors",
    "APITimeoutError": ".errors",
    "AuthenticationError": ".errors",
    "BadRequestError": ".errors",
    "BudgetExceededError": ".errors",
    "CapabilityError": ".errors",
    "ChangedJobsError": ".errors",
    "CometBatchError": ".errors",
    "ConfigError": ".errors",
    "ContentPolicyError": ".errors",
    "DownloadError": ".errors",
    "Engine": ".engine.engine",
    "ImageDataError": ".errors",
    "IncompatibleAPIError": ".errors",
    "Job": ".manifest.job",
    "LedgerError": ".errors",
    "Manifest": ".manifest.reader",
    "ManifestError": ".errors",
    "ManifestFileError": ".errors",
    "ManifestProblem": ".errors",
    "ModelRegistry": ".models.registry",
    "ModelSpec": ".models.spec",
    "NotFoundError": ".errors",
    "OutputError": ".errors",
    "PermissionDeniedError": ".errors",
    "PricesError": ".errors",
    "RateLimitError": ".errors",
    "Result": ".results",
    "ServerError": ".errors",
    "Settings": ".settings",
    "SimConfig": ".simulator.config",
    "Simulator": ".simulator.server",
    "Summary": ".engine.summary",
    "UpstreamDownError": ".errors",
    "__version__": "._version",
    "load_manifest": ".manifest.reader",
}

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceededError",
    "CapabilityError",
    "ChangedJobsError",
    "CometBatchError",
    "ConfigError",
    "ContentPolicyError",
    "DownloadError",
    "Engine",
    "ImageDataError",
    "IncompatibleAPIError",
    "Job",
    "LedgerError",
    "Manifest",
    "ManifestError",
    "ManifestFileError",
    "ManifestProblem",
    "ModelRegistry",
    "ModelSpec",
    "NotFoundError",
    "OutputError",
    "PermissionDeniedError",
    "PricesError",
    "RateLimitError",
    "Result",
    "ServerError",
    "Settings",
    "SimConfig",
    "Simulator",
    "Summary",
    "UpstreamDownError",
    "__version__",
    "load_manifest",
]


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        home = _HOME.get(name)
        if home is None:
            raise AttributeError(f"module 'cometbatch' has no attribute {name!r}")
        value = getattr(importlib.import_module(home, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
