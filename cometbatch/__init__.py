"""cometbatch: resumable, rate-limit-aware batch image generation through CometAPI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cometbatch")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from .engine.engine import Engine
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
from .manifest.jobs import Job, Manifest, load_manifest
from .models.registry import ModelRegistry, ModelSpec
from .results import Result, Summary
from .settings import Settings
from .simulator.server import SimConfig, Simulator

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
