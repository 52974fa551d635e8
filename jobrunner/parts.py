"""Part files and the progress log of one shard folder.

Takes shard folders, Arrow parts and `PartRecord`s; knows nothing of manifests, locks or jobs.
A part is ``part-NNNNNN.parquet`` (rows of one shard, sorted by row_index); ``progress.jsonl``
holds one `PartRecord` line per durable part: name, rows, errors, indices, size and sha256.

Contract: progress is recorded only after the part it describes is durable. The caller
(`jobrunner.checkpoint.CheckpointStore.write_part`) writes a part to a temp name, fsyncs it,
renames it and fsyncs the folder; only then does `_append_record` append its line, fsynced. On
reading, `scan_shard` trusts a record only if its line is complete and its file has the recorded
size, sha256 and row indices of the shard; `_clean_shard_dir` deletes temp files and every part
that is not trusted, so a process killed at any instant loses at most the part it was writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobrunner.writers import INDEX_COLUMN, fsync_dir, part_kept_types, part_kinds

PROGRESS = "progress.jsonl"
_PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")


@dataclass(frozen=True)
class PartRecord:
    """One line of ``progress.jsonl``: a part file that is durable."""

    part: str
    rows: int
    errors: int
    min_index: int
    max_index: int
    bytes: int
    sha256: str
    time: float
    session_start: float

    @classmethod
    def from_line(cls, line: bytes) -> PartRecord:
        data = json.loads(line)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def to_line(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"


class _BadPart(Exception):
    pass


def read_progress(shard_dir: Path) -> tuple[list[PartRecord], bool]:
    """Records of complete, parseable lines, and whether anything (a torn line) was skipped."""
    try:
        data = (shard_dir / PROGRESS).read_bytes()
    except FileNotFoundError:
        return [], False
    *lines, tail = data.split(b"\n")
    records, damaged = [], bool(tail)
    for line in lines:
        try:
            records.append(PartRecord.from_line(line))
        except (ValueError, KeyError, TypeError):
            damaged = True
    return records, damaged


def _verify_part(path: Path, rec: PartRecord, k: int, n: int) -> tuple[np.ndarray, pa.Schema]:
    """Index column and schema of a part, after checking that it matches its record."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _BadPart("file missing") from None
    if len(data) != rec.bytes:
        raise _BadPart(f"size {len(data)} != recorded {rec.bytes}")
    if hashlib.sha256(data).hexdigest() != rec.sha256:
        raise _BadPart("sha256 differs from the record")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        index = parquet.read(columns=[INDEX_COLUMN]).column(0).to_numpy()
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise _BadPart(f"unreadable: {exc}") from None
    ok = len(index) == rec.rows and rec.rows > 0 and bool(np.all(np.diff(index) > 0))
    ok = ok and int(index[0]) == rec.min_index and int(index[-1]) == rec.max_index
    if not ok or bool(np.any(index % n != k)):
        raise _BadPart("row indices differ from the record or the shard")
    return index, parquet.schema_arrow


@dataclass
class ShardScan:
    """What `scan_shard` trusts in one shard folder, and what it dropped (with the reason)."""

    records: list[PartRecord] = field(default_factory=list)
    indices: list[np.ndarray] = field(default_factory=list)
    kinds: dict[str, set[str]] = field(default_factory=dict)
    kept_types: dict[str, set[pa.DataType]] = field(default_factory=dict)  # typed kept columns
    layouts: set[tuple[str, ...]] = field(default_factory=set)
    dropped: list[str] = field(default_factory=list)
    torn: bool = False

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.records)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.records)


def scan_shard(shard_dir: Path, k: int, n: int, seen: set[int] | None = None) -> ShardScan:
    """Check every recorded part; ``seen`` (if given) collects indices and rejects repeats."""
    records, torn = read_progress(shard_dir)
    scan = ShardScan(torn=torn)
    accepted: set[str] = set()
    for rec in records:
        try:
            if rec.part in accepted or not _PART_RE.match(rec.part):
                raise _BadPart("recorded twice or badly named")
            index, schema = _verify_part(shard_dir / rec.part, rec, k, n)
            if seen is not None and not seen.isdisjoint(index.tolist()):
                raise _BadPart("repeats rows of an earlier part")
        except _BadPart as exc:
            scan.dropped.append(f"{shard_dir.name}/{rec.part}: {exc}")
            continue
        accepted.add(rec.part)
        if seen is not None:
            seen.update(index.tolist())
        scan.records.append(rec)
        scan.indices.append(index)
        scan.layouts.add(tuple(schema.names))
        for name, values in part_kinds(schema).items():
            scan.kinds.setdefault(name, set()).update(values)
        for name, arrow_type in part_kept_types(schema).items():
            scan.kept_types.setdefault(name, set()).add(arrow_type)
    return scan


def _clean_shard_dir(shard_dir: Path, keep: set[str]) -> list[str]:
    """Delete temp files and part files not in ``keep``; returns what was removed."""
    removed = []
    for path in sorted(shard_dir.iterdir()) if shard_dir.is_dir() else []:
        stray_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if stray_tmp or (_PART_RE.match(path.name) and path.name not in keep):
            path.unlink(missing_ok=True)
            removed.append(f"{shard_dir.name}/{path.name}")
    if removed:
        fsync_dir(shard_dir)
    return removed


def _append_record(path: Path, record: PartRecord) -> None:
    """Append one progress line and fsync it (and the folder, when the file is new)."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, record.to_line())
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
