"""Dataset shard files: webdataset tar and parquet, written to and read from a local file."""

# The packer (layouts/) decides what goes in a shard and when it counts; this module only
# knows the two formats. Tar is written with the standard library; pyarrow is imported only
# when a parquet shard is written or read, so `import cometbatch` never loads it.

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import ConfigError
from ..paths import EXTENSIONS

__all__ = [
    "PARQUET_COLUMNS",
    "Member",
    "read_members",
    "require_pyarrow",
    "write_parquet",
    "write_tar",
]

PARQUET_INSTALL = "pip install 'cometbatch[datasets]'"
# One row per image; `metadata` is the job's metadata as JSON text (its keys vary by job).
PARQUET_COLUMNS = (
    "key",
    "job_id",
    "index",
    "prompt",
    "model",
    "size",
    "quality",
    "format",
    "image",
    "sha256",
    "width",
    "height",
    "revised_prompt",
    "metadata",
    "cost",
)
# A parquet row group is written (and its memory let go) at this many rows or image bytes.
_ROW_GROUP = 64
_ROW_GROUP_BYTES = 16 * 2**20


@dataclass(frozen=True, slots=True)
class Member:
    """One sample of a shard: its key, its image bytes and its record (prompt, sha256, ...)."""

    key: str
    image: bytes
    record: dict[str, Any]


def require_pyarrow() -> Any:
    """The pyarrow.parquet module, or a ConfigError naming the pip command."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"the parquet layout needs pyarrow: {PARQUET_INSTALL}") from None
    return pq


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, members: Iterable[Member]) -> None:
    """A webdataset shard: `<key>.<ext>`, `<key>.json` and `<key>.txt` (the prompt) each."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            record = member.record
            _tar_member(tar, f"{member.key}.{EXTENSIONS[record['format']]}", member.image)
            text = json.dumps(record, ensure_ascii=False, sort_keys=True)
            _tar_member(tar, f"{member.key}.json", text.encode())
            _tar_member(tar, f"{member.key}.txt", str(record["prompt"]).encode())


def write_parquet(path: str, members: Iterable[Member]) -> None:
    """A parquet shard: one row per image (PARQUET_COLUMNS), a few rows per row group."""
    pq = require_pyarrow()
    import pyarrow as pa

    schema = pa.schema(
        [
            ("key", pa.string()),
            ("job_id", pa.string()),
            ("index", pa.int64()),
            ("prompt", pa.string()),
            ("model", pa.string()),
            ("size", pa.string()),
            ("quality", pa.string()),
            ("format", pa.string()),
            ("image", pa.binary()),
            ("sha256", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("revised_prompt", pa.string()),
            ("metadata", pa.string()),
            ("cost", pa.float64()),
        ]
    )
    # No dictionary for the images: building one holds a row group's images once more.
    plain = [name for name in PARQUET_COLUMNS if name != "image"]
    with pq.ParquetWriter(path, schema, use_dictionary=plain) as writer:
        rows: list[dict[str, Any]] = []
        size = 0
        for member in members:
            rows.append(_row(member))
            size += len(member.image)
            # Bounded by bytes too: 64 large images would hold hundreds of MB (twice, once
            # as rows and once as the table) before a row group is written out.
            if len(rows) == _ROW_GROUP or size >= _ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows, size = [], 0
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))


def _row(member: Member) -> dict[str, Any]:
    record = member.record
    parameters = record.get("parameters") or {}
    return {
        "key": member.key,
        "job_id": record["job_id"],
        "index": record["index"],
        "prompt": record["prompt"],
        "model": record["model"],
        "size": parameters.get("size"),
        "quality": parameters.get("quality"),
        "format": record["format"],
        "image": member.image,
        "sha256": record["sha256"],
        "width": record.get("width"),
        "height": record.get("height"),
        "revised_prompt": record.get("revised_prompt"),
        "metadata": json.dumps(record.get("metadata") or {}, ensure_ascii=False),
        "cost": record.get("cost"),
    }


def read_members(source: BinaryIO, layout: str) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) of each sample of a shard, read a few samples at a time from
    `source`; ValueError if it cannot be read."""
    if layout == "parquet":
        pq = require_pyarrow()
        try:
            shard = pq.ParquetFile(source)
            for batch in shard.iter_batches(batch_size=2, columns=["key", "image"]):
                keys, images = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                yield from zip(keys, images, strict=True)
        except Exception as exc:  # pyarrow's errors share no base class of their own
            raise ValueError(f"not a readable parquet file: {exc}") from None
        return
    images = set(EXTENSIONS.values())
    try:
        # "r|": a stream, member after member, never the whole tar at once.
        with tarfile.open(fileobj=source, mode="r|") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if ext in images:
                    handle = tar.extractfile(info)
                    if handle is not None:
                        yield key, handle.read()
    except tarfile.TarError as exc:
        raise ValueError(f"not a readable tar file: {exc}") from None
