"""Prompts of the jobs a ledger recorded, read from their manifest and kept in a temporary file.

Export lines come in ledger order, the manifest in its own: each prompt is looked up once, but
not in the order it was read. Only the job ids and offsets stay in memory, so a million jobs of
32,000-character prompts cost what their ids cost, not gigabytes.
"""

from __future__ import annotations

import tempfile
from types import TracebackType

__all__ = ["PromptFile"]


class PromptFile:
    """Prompts by job id, written once (`add`) and read back by id (`get`)."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._where: dict[str, tuple[int, int]] = {}
        self._end = 0
        self._at_end = True  # where the file stands: appends need no seek (and no flush)

    def __repr__(self) -> str:
        return f"<PromptFile prompts={len(self._where)} bytes={self._end}>"

    def __enter__(self) -> PromptFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Forget every prompt and delete the file."""
        self._where.clear()
        self._file.close()

    def add(self, job_id: str, prompt: str) -> None:
        """Keep `prompt` for `job_id` (a later one for the same id replaces it)."""
        # surrogatepass: a manifest read with surrogateescape may hold lone surrogates.
        data = prompt.encode("utf-8", "surrogatepass")
        if not self._at_end:
            self._file.seek(self._end)
            self._at_end = True
        self._file.write(data)
        self._where[job_id] = (self._end, len(data))
        self._end += len(data)

    def clear(self) -> None:
        """Forget every prompt (a manifest that could not be read whole gives none)."""
        self._where.clear()

    def get(self, job_id: str) -> str | None:
        """The prompt kept for `job_id`, or None."""
        where = self._where.get(job_id)
        if where is None:
            return None
        self._at_end = False
        self._file.seek(where[0])
        return self._file.read(where[1]).decode("utf-8", "surrogatepass")
