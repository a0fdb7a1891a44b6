"""One error tree for the whole package; the CLI catches `CometBatchError` and prints one line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


class CometBatchError(Exception):
    """Base of every error cometbatch raises on purpose."""

    def lines(self) -> list[str]:
        """The message as the lines it is shown in: one, unless the error lists several
        things. Each line is escaped on its own, so a newline in quoted text starts none."""
        return [str(self)]


class ConfigError(CometBatchError):
    """A setting or option that cannot work (bad base URL, missing key, bad override)."""


class _DataFileError(ConfigError):
    """A data file that cannot be used; names what kind of file, the file and the entry."""

    _what: ClassVar[str]

    def __init__(self, message: str, *, source: str, entry: str | None = None) -> None:
        self.source = source
        self.entry = entry
        where = f"{source}: {entry}" if entry else source
        super().__init__(f"{self._what} {where}: {message}")


class ModelsError(_DataFileError):
    """A models file that cannot be used; names the file and the entry."""

    _what = "models file"


class PricesError(_DataFileError):
    """A price override that cannot be used; names the file and the entry."""

    _what = "price override"


@dataclass(frozen=True, slots=True)
class ManifestProblem:
    """One bad manifest line: where, which field, and what is wrong."""

    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class ManifestError(CometBatchError):
    """One or more bad manifest lines, each with line number and field."""

    def __init__(
        self, problems: list[ManifestProblem], *, source: str = "", truncated: bool = False
    ) -> None:
        self.problems = problems
        self.source = source
        self.truncated = truncated
        head = f"{source}: " if source else ""
        count = f"{len(problems)}{'+' if truncated else ''}"
        self._lines = [f"{head}{count} invalid manifest line(s):"]
        self._lines += [f"  {p}" for p in problems]
        if truncated:
            self._lines.append("  ... (more problems not shown)")
        super().__init__("\n".join(self._lines))

    def lines(self) -> list[str]:
        return list(self._lines)


class ManifestFileError(ManifestError):
    """A manifest that cannot be read at all (missing, a folder, not readable): one line
    naming the file, not a list of bad lines. `problems` holds the reason as a line-0 problem."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__([ManifestProblem(0, None, reason)], source=path)
        self.reason = reason
        self._lines = [f"{reason}: {path}"]
        self.args = (self._lines[0],)


class CapabilityError(CometBatchError):
    """The model cannot do what the job asks (size, parameter, prompt length)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class LedgerError(CometBatchError):
    """Corrupt ledger, changed job fingerprint, or an output folder locked by another run."""


class ChangedJobsError(LedgerError):
    """Jobs whose request changed since the ledger recorded their images (all named)."""

    SHOWN = 10

    def __init__(self, out_dir: object, job_ids: list[str]) -> None:
        self.job_ids = list(job_ids)
        shown = ", ".join(repr(job_id) for job_id in self.job_ids[: self.SHOWN])
        more = len(self.job_ids) - self.SHOWN
        if more > 0:
            shown += f" and {more} more"
        super().__init__(
            f"{len(self.job_ids)} job(s) changed since the ledger in {out_dir} recorded them: "
            f"{shown}; their images no longer match the manifest. To regenerate them (paid "
            f"again; the old images are moved to {out_dir}/replaced/), rerun with "
            "--regenerate-changed (setting regenerate_changed); or use a new output folder, "
            "or restore the jobs as they were"
        )


class OutputError(CometBatchError):
    """The output folder cannot be written (permissions, disk full); the ledger stays consistent."""


class UpstreamDownError(CometBatchError):
    """The API kept failing past the outage limit; the run stopped and stays resumable."""


class BudgetExceededError(CometBatchError):
    """A request not sent because it could cross a budget cap (`reason`: max_images or
    max_cost); the engine has stopped taking new work."""

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class APIError(CometBatchError):
    """A failed request, classified; `kind` is the ledger's short failure name.

    Kinds: connection, timeout, ambiguous, rate_limit, server, bad_request, auth, permission,
    not_found, too_large, unprocessable, content_policy, bad_response, invalid_image, download.
    """

    kind: str = "api"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retryable = retryable
        # Seconds the server asked us to wait (already parsed and capped), if it said so.
        self.retry_after = retry_after
        if kind is not None:
            self.kind = kind

    def to_record(self) -> dict[str, Any]:
        """The ledger's `error` object."""
        return {
            "kind": self.kind,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
            "retryable": self.retryable,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, status={self.status!r}, "
            f"code={self.code!r}, request_id={self.request_id!r}, retryable={self.retryable!r})"
        )


class APIConnectionError(APIError):
    """The connection failed. `sent` says whether the request may have reached the server.

    A failure after the request was sent is ambiguous: the image may have been generated and
    billed, so retrying it may pay twice.
    """

    kind = "connection"

    def __init__(self, message: str, *, sent: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("retryable", True)
        if sent:
            kwargs.setdefault("kind", "ambiguous")
        super().__init__(message, **kwargs)
        self.sent = sent


class APITimeoutError(APIConnectionError):
    """No complete answer within the timeout (ambiguous when the request had been sent)."""

    kind = "timeout"


class APIStatusError(APIError):
    """The API answered with an error status."""

    kind = "status"


class BadRequestError(APIStatusError):
    kind = "bad_request"


class AuthenticationError(APIStatusError):
    kind = "auth"


class PermissionDeniedError(APIStatusError):
    kind = "permission"


class NotFoundError(APIStatusError):
    kind = "not_found"


class ContentPolicyError(APIStatusError):
    kind = "content_policy"


class RateLimitError(APIStatusError):
    kind = "rate_limit"


class ServerError(APIStatusError):
    kind = "server"


class APIResponseError(APIError):
    """Not what an OpenAI-compatible images API answers (HTML, a redirect, bad JSON).

    `maybe_billed` says whether the answer may have carried images that were paid for (a body
    cut off, unreadable or too large: retrying may pay twice) or could not have (a readable
    answer with no images). Unset, a retryable bad answer counts as possibly billed.
    """

    kind = "bad_response"

    def __init__(self, message: str, *, maybe_billed: bool | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.maybe_billed = self.retryable if maybe_billed is None else maybe_billed


class IncompatibleAPIError(APIResponseError, ConfigError):
    """The server is not an OpenAI-compatible images API at all (a redirect, an HTML page, a
    plain web server's 404, 405 or 501): the base URL is wrong, so it is a ConfigError too."""

    kind = "incompatible_api"


class ImageDataError(APIResponseError):
    """An image in the answer is unusable: bad base64, unknown bytes, or not whole (cut short,
    a failed checksum). A broken one is retryable, and was generated: possibly billed."""

    kind = "invalid_image"


class DownloadError(APIError):
    """A URL-mode image could not be downloaded; the generation itself is not retried."""

    kind = "download"
