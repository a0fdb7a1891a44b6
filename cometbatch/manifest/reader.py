"""A manifest file: one job per line (JSONL, text or CSV), checked up front, streamed on use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ManifestError, ManifestFileError, ManifestProblem
from ..models.registry import ModelRegistry
from ._fastcheck import check_lines
from ._iddigests import id_digest
from ._shapecache import Shape, ShapeCache, shape_of
from .inputs import input_format, reader_for
from .job import Job, JobDefaults, folder_key
from .lines import (
    job_from_data,
    not_utf8,
    numbered_lines,
)
from .stats import ManifestStats


class Manifest:
    """A manifest file to iterate for Jobs (re-read each time); `format` defaults by suffix."""

    # format: "jsonl", "txt" or "csv"; by default .txt and .csv, anything else JSONL.

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        defaults: JobDefaults | None = None,
        registry: ModelRegistry | None = None,
        format: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.defaults = defaults or JobDefaults()
        self.registry = registry or ModelRegistry()
        self.stats = ManifestStats()
        self.sha256 = ""
        self.format = input_format(self.path, format)
        self._reader = reader_for(self.format, self._job_from)
        # JSONL lines are checked and built through it: each line decoded once, the full
        # model run once per distinct set of request fields.
        self._shapes = ShapeCache(self.defaults, self.registry)

    def _job_from(self, data: dict[str, Any], line: int) -> Job:
        return job_from_data(data, line, defaults=self.defaults, registry=self.registry)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, jobs={self.stats.jobs}, images={self.stats.images})"

    def _lines(self) -> Iterator[tuple[int, str]]:
        # surrogateescape: bytes that are not UTF-8 fail their own line (see not_utf8), not
        # the file.
        try:
            with self.path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
                lines = numbered_lines(f)
                yield from lines if self._reader is None else self._reader.records(lines)
        except FileNotFoundError:
            raise ManifestFileError(str(self.path), "file not found") from None
        except OSError as exc:
            reason = f"cannot read the file ({exc.strerror or exc})"
            raise ManifestFileError(str(self.path), reason) from None

    def _lines_to(self, last: int) -> Iterator[tuple[int, str]]:
        """The lines up to line `last`, not reading the one after (it may be too long)."""
        if last < 1:
            return
        for number, text in self._lines():
            yield number, text
            if number >= last:
                return

    def _parse(self, text: str, number: int) -> Job | None:
        not_utf8(text, number)
        if self._reader is not None:
            return self._reader.parse(text, number)
        return self._shapes.job(text, number)

    def _checked(self, text: str, number: int) -> tuple[str, Shape] | None:
        """A line's job id and shape (None: no job); ManifestError if it is bad."""
        not_utf8(text, number)
        if self._reader is None:
            return self._shapes.check(text, number)
        job = self._reader.parse(text, number)
        return None if job is None else (job.id, shape_of(job, self.registry))

    def __iter__(self) -> Iterator[Job]:
        for number, text in self._lines():
            job = self._parse(text, number)
            if job is not None:
                yield job

    def validate(self, *, max_problems: int = 50) -> ManifestStats:
        """Check every line; raise one ManifestError listing the problems (up to the cap)."""
        fast = self._shapes if self._reader is None else None
        checked = check_lines(self._lines(), self._checked, fast, max_problems)
        problems = checked.problems
        repeated = checked.digests.repeated()
        if repeated:
            problems += self._repeat_problems(repeated, checked.last_line, max_problems)
        if problems:
            problems.sort(key=lambda p: p.line)
            truncated = checked.truncated or len(problems) > max_problems
            raise ManifestError(problems[:max_problems], source=str(self.path), truncated=truncated)
        self.stats = checked.stats
        self.sha256 = checked.sha256
        return checked.stats

    def _repeat_problems(
        self, repeated: set[int], last_line: int, max_problems: int
    ) -> list[ManifestProblem]:
        """A problem for each line whose id (folder) repeats an earlier line's, naming it."""
        # A second pass, up to where the first stopped, only when some digests came twice.
        first: dict[str, tuple[int, str]] = {}
        problems: list[ManifestProblem] = []
        for number, text in self._lines_to(last_line):
            if len(problems) > max_problems:
                break
            try:
                checked = self._checked(text, number)
            except ManifestError:
                continue
            if checked is None:
                continue
            job_id = checked[0]
            folder = folder_key(job_id)
            if id_digest(folder) not in repeated:
                continue
            if folder not in first:
                # Ids whose digests only collided land here too: never named.
                first[folder] = (number, job_id)
                continue
            first_line, first_id = first[folder]
            if first_id == job_id:
                message = (
                    f"id {job_id!r} is already used on line {first_line} "
                    "(give each line its own 'id', or ask for more images with 'n')"
                )
            else:
                message = (
                    f"id {job_id!r} would share an image folder with id {first_id!r} on line "
                    f"{first_line} (ids must differ in more than letter case or characters "
                    "that are unsafe in file names)"
                )
            problems.append(ManifestProblem(number, "id", message))
        return problems


def load_manifest(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    size: str | None = None,
    n: int | None = None,
    registry: ModelRegistry | None = None,
    max_problems: int = 50,
    defaults: JobDefaults | None = None,
    format: str | None = None,
) -> Manifest:
    """Validate a manifest (ManifestError lists every bad line); return it to stream."""
    # JSONL, or by suffix a .txt of prompts or a .csv; `defaults` replaces model/size/n.
    if defaults is None:
        defaults = JobDefaults(model=model, size=size, n=n)
    elif (model, size, n) != (None, None, None):
        raise TypeError("pass either defaults or model/size/n, not both")
    manifest = Manifest(path, defaults=defaults, registry=registry, format=format)
    manifest.validate(max_problems=max_problems)
    return manifest
