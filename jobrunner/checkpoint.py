"""Durable checkpoints: manifest, part files, progress records, locks, shards.

Takes Arrow tables of results and paths; knows nothing of the model or of job specs beyond the
plain dict and fingerprint it is handed. Layout of a checkpoint directory (default
``OUTPUT.parts/``)::

    manifest.json                 spec, fingerprint and its fields, num_shards, total_rows
    manifest.lock                 flock held briefly while the manifest is read, created or wiped
    shard-00000-of-00003.lock     flock held by the run of shard 0 (pid/host/start, for status)
    shard-00000-of-00003/
        part-000000.parquet       results of some rows of shard 0, sorted by row_index
        progress.jsonl            one line per durable part: name, rows, errors, indices, sha256
        complete.json             written once every row of the shard is recorded

Protocol: a part is written to a temp name, fsynced, renamed, the directory fsynced, and only then
recorded by appending one line to ``progress.jsonl`` (fsynced). On open a record is trusted only
if its line is complete and its file has the recorded size, sha256 and row indices; everything
else (temp files, unrecorded parts, damaged parts, a torn last line) is ignored and deleted, so a
process killed at any instant loses at most the part it was writing. A restart trusts these
records, never memory. Joining the shards into the output file and reporting progress live in
`jobrunner.merge`.

Shards: row ``i`` belongs to shard ``i % N`` (shards are 0-based: ``K/N`` with ``0 <= K < N``).
The partition is stable and needs no row count up front. Each shard has its own lock, parts and
progress, so shards run concurrently on one or many machines sharing a filesystem (flock works over
NFSv4 and Lustre; on old NFS mounts use one machine per shard directory). Lock files are never
deleted: deleting a flock'd file lets a second process lock a fresh inode of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobrunner.writers import (
    INDEX_COLUMN,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    part_kinds,
)

MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"
COMPLETE = "complete.json"
FORMAT_VERSION = 1
_PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")
_SHARD_DIR_RE = re.compile(r"^shard-\d{5,}-of-\d{5,}$")


class CheckpointError(Exception):
    """The checkpoint directory cannot be used as asked; the message says what to do."""


class FingerprintMismatch(CheckpointError):
    """The checkpoint belongs to a job with another fingerprint."""


class LockHeld(CheckpointError):
    """Another live process holds the lock."""

    def __init__(self, path: Path, info: dict[str, Any] | None):
        self.path, self.info = Path(path), info or {}
        who = ", ".join(f"{k} {v}" for k, v in self.info.items() if k in ("pid", "host", "started"))
        super().__init__(f"another run holds the lock {self.path}" + (f" ({who})" if who else ""))


# --- shards ------------------------------------------------------------------------------------


def shard_of(index: int, n: int) -> int:
    """Shard (0-based) of input row ``index`` among ``n`` shards: ``index % n``."""
    return index % n


def shard_rows(total: int, k: int, n: int) -> int:
    """Number of the first ``total`` rows that belong to shard ``k`` of ``n``."""
    return len(range(k, total, n))


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}"


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    k, n = shard if shard is not None else (0, 1)
    if not (isinstance(k, int) and isinstance(n, int) and n >= 1 and 0 <= k < n):
        raise ValueError(f"shard must be (K, N) with 0 <= K < N, got {shard!r}")
    return k, n


# --- locks -------------------------------------------------------------------------------------


def read_lock_info(path: Path) -> dict[str, Any] | None:
    """The pid/host/start written by the lock's last holder (informational only)."""
    try:
        return json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None


def is_locked(path: Path) -> bool:
    """Whether a live process holds the flock on ``path`` (a killed holder never counts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the shared lock if we got it
    return False


class JobLock:
    """Exclusive, non-blocking ``flock`` on a file; raises `LockHeld` if another holder is alive.

    The kernel drops the lock when its holder dies, so a killed run never blocks the next one.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> JobLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(self.path, read_lock_info(self.path)) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def _manifest_lock(directory: Path) -> Iterator[None]:
    """Serialise manifest reads/writes/wipes between shards (held for milliseconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "manifest.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- progress records --------------------------------------------------------------------------


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


# --- manifest ----------------------------------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint directory, or None if there is none."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (what it reads back as from a manifest)."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _short(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


_ABSENT = object()


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``field: old → new`` for every fingerprint field that differs.

    Nested fields are compared one by one (``input.size: 10 → 12``), so a long value such as
    the input's identity still names the part of it that changed.
    """
    old, new = _flatten(jsonable(dict(old))), _flatten(jsonable(dict(new)))
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before != after:
            changes.append(f"{key}: {_short(before)} → {_short(after)}")
    return changes


def _flatten(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_same_job(
    directory: Path, manifest: dict, fingerprint: str, fields: dict, n: int
) -> None:
    changes = []
    if manifest.get("fingerprint") != fingerprint:
        changes = describe_changes(manifest.get("fingerprint_fields") or {}, fields)
        changes = changes or [f"fingerprint: {manifest.get('fingerprint')} → {fingerprint}"]
    if manifest.get("num_shards") != n:
        changes.append(f"number of shards: {manifest.get('num_shards')} → {n}")
    if changes:
        raise FingerprintMismatch(
            f"the checkpoint {directory} belongs to a different job: "
            + "; ".join(changes)
            + ". Use --overwrite to discard it and start over, or choose another --output."
        )


def _set_total_rows(directory: Path, manifest: dict, total_rows: int | None) -> dict:
    """Record the input row count in the manifest once known; refuse a different one."""
    known = manifest.get("total_rows")
    if total_rows is None or known == total_rows:
        return manifest
    if known is not None:
        raise CheckpointError(
            f"the input now has {total_rows} rows but the checkpoint {directory} was made for "
            f"{known}; use --overwrite to start over"
        )
    manifest = {**manifest, "total_rows": total_rows}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def _wipe(directory: Path, only_shard: str | None = None) -> list[str]:
    """Remove our files (manifest, shard folders; never lock files, never unknown files)."""
    removed = []
    if only_shard is None and (directory / MANIFEST).exists():
        (directory / MANIFEST).unlink()
        removed.append(MANIFEST)
    for shard_dir in sorted(directory.iterdir()):
        if not (shard_dir.is_dir() and _SHARD_DIR_RE.match(shard_dir.name)):
            continue
        if only_shard is not None and shard_dir.name != only_shard:
            continue
        removed += _clean_shard_dir(shard_dir, keep=set())
        for name in (PROGRESS, COMPLETE):
            if (shard_dir / name).exists():
                (shard_dir / name).unlink()
                removed.append(f"{shard_dir.name}/{name}")
        with contextlib.suppress(OSError):
            shard_dir.rmdir()  # only if nothing foreign is left inside
    fsync_dir(directory)
    return removed


def _running_shards(directory: Path, except_name: str) -> list[str]:
    return [
        p.stem
        for p in sorted(directory.glob("shard-*-of-*.lock"))
        if p.stem != except_name and is_locked(p)
    ]


def _has_shard_dirs(directory: Path) -> bool:
    return any(p.is_dir() and _SHARD_DIR_RE.match(p.name) for p in directory.iterdir())


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None if it is missing or not whole (never trusted half)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


# --- the store of one shard --------------------------------------------------------------------


@dataclass
class ResumeInfo:
    """What `CheckpointStore.open_or_create` found."""

    resumed: bool  # a checkpoint of the same job existed
    rows_done: int  # rows already durable in this shard (errors included)
    errors: int
    parts: int
    complete: bool  # this shard was already finished
    total_rows: int | None  # input rows, if known to the manifest
    cleaned: list[str] = field(default_factory=list)  # what was ignored and deleted, and why


class CheckpointStore:
    """Parts, progress and completion of one shard of a job (see the module docstring).

    Usage::

        store = CheckpointStore(Path("out.parquet.parts"), shard=(0, 1))
        with store.lock():                      # LockHeld if another run is alive
            info = store.open_or_create(spec, fingerprint, fields, overwrite=False)
            ...skip store.is_done(i); PartWriter(store, ...) writes parts...
            store.mark_complete(total_rows)
    """

    def __init__(self, directory: Path, shard: tuple[int, int] | None = None):
        self.directory = Path(directory)
        self.k, self.n = _check_shard(shard)
        self.name = shard_name(self.k, self.n)
        self.shard_dir = self.directory / self.name
        self.lock_path = self.directory / f"{self.name}.lock"
        self.session_start = time.time()
        self.total_rows: int | None = None
        self.rows_done = 0
        self.errors = 0
        self._lock: JobLock | None = None
        self._opened = False
        self._done: set[int] = set()
        self._records: list[PartRecord] = []

    def lock(self) -> JobLock:
        """This shard's lock; use as a context manager around everything else."""
        if self._lock is None:
            self._lock = JobLock(self.lock_path)
        return self._lock

    def _require(self, opened: bool = True) -> None:
        if self._lock is None or not self._lock.held:
            raise RuntimeError("acquire store.lock() before using the checkpoint store")
        if opened and not self._opened:
            raise RuntimeError("call open_or_create() before writing parts")

    def open_or_create(
        self,
        spec: Mapping[str, Any],
        fingerprint: str,
        fingerprint_fields: Mapping[str, Any],
        overwrite: bool = False,
        total_rows: int | None = None,
    ) -> ResumeInfo:
        """Create the checkpoint, or resume it if it belongs to the same job.

        Raises:
            FingerprintMismatch: the directory holds another job (message names what changed).
            CheckpointError: --overwrite while other shards of the old job are running, or a
                directory with shard folders but no manifest.
        """
        self._require(opened=False)
        with _manifest_lock(self.directory):
            manifest, resumed, cleaned = self._prepare_manifest(
                dict(spec), fingerprint, dict(fingerprint_fields), overwrite
            )
            manifest = _set_total_rows(self.directory, manifest, total_rows)
        self.total_rows = manifest.get("total_rows")
        cleaned += self._recover()
        self._opened = True
        return ResumeInfo(
            resumed=resumed and bool(self._records),
            rows_done=self.rows_done,
            errors=self.errors,
            parts=len(self._records),
            complete=self.is_complete(),
            total_rows=self.total_rows,
            cleaned=cleaned,
        )

    def _prepare_manifest(
        self, spec: dict, fingerprint: str, fields: dict, overwrite: bool
    ) -> tuple[dict, bool, list[str]]:
        manifest, cleaned = read_manifest(self.directory), []
        same = manifest is not None and manifest.get("fingerprint") == fingerprint
        same = same and manifest.get("num_shards") == self.n
        if overwrite and same:
            # Same job: redo only this shard; the others' work is valid and they may be running.
            return manifest, False, _wipe(self.directory, only_shard=self.name)
        if overwrite:
            running = _running_shards(self.directory, self.name)
            if running:
                raise CheckpointError(
                    f"cannot --overwrite {self.directory}: {', '.join(running)} of the old job "
                    "still running; stop them first"
                )
            cleaned, manifest = _wipe(self.directory), None
        elif manifest is None and _has_shard_dirs(self.directory):
            raise CheckpointError(
                f"{self.directory} holds shard folders but no {MANIFEST}, so none of it can be "
                "trusted; use --overwrite to start over"
            )
        if manifest is None:
            manifest = {
                "format": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "fingerprint_fields": jsonable(fields),
                "spec": jsonable(spec),
                "num_shards": self.n,
                "total_rows": None,
                "created": time.time(),
            }
            atomic_write_json(self.directory / MANIFEST, manifest)
            return manifest, False, cleaned
        _check_same_job(self.directory, manifest, fingerprint, fields, self.n)
        return manifest, True, cleaned

    def _recover(self) -> list[str]:
        """Trust only intact recorded parts; delete everything else in the shard folder."""
        if not self.shard_dir.is_dir():
            self.shard_dir.mkdir(parents=True)
            fsync_dir(self.directory)
        seen: set[int] = set()
        scan = scan_shard(self.shard_dir, self.k, self.n, seen)
        cleaned = list(scan.dropped)
        if scan.dropped or scan.torn:
            lines = b"".join(r.to_line() for r in scan.records)
            atomic_write_bytes(self.shard_dir / PROGRESS, lines)
            if scan.torn:
                cleaned.append(f"{self.name}/{PROGRESS}: dropped a torn or invalid line")
        removed = _clean_shard_dir(self.shard_dir, keep={r.part for r in scan.records})
        cleaned += [f"{name}: removed (not a trusted part)" for name in removed]
        self._done, self._records = seen, scan.records
        self.rows_done, self.errors = scan.rows, scan.errors
        done = read_json(self.shard_dir / COMPLETE)
        if done is not None and not self._covers(done.get("total_rows")):
            (self.shard_dir / COMPLETE).unlink()
            cleaned.append(f"{self.name}/{COMPLETE}: parts no longer cover the shard, removed")
        return cleaned

    def _covers(self, total_rows: int | None) -> bool:
        if not isinstance(total_rows, int):
            return False
        expected = shard_rows(total_rows, self.k, self.n)
        in_range = not self._done or max(self._done) < total_rows
        return self.rows_done == expected and len(self._done) == expected and in_range

    @property
    def parts(self) -> int:
        return len(self._records)

    def is_done(self, index: int) -> bool:
        return index in self._done

    def done_indices(self) -> set[int]:
        """Input row indices already durable in this shard (a copy)."""
        return set(self._done)

    def write_part(self, table: pa.Table) -> PartRecord:
        """Make ``table`` (`jobrunner.writers.part_schema` + rows of this shard) a durable part.

        The part is recorded in ``progress.jsonl`` only after its file is fsynced and renamed.
        """
        self._require()
        index = table.column(INDEX_COLUMN).to_numpy()
        if len(index) == 0:
            raise ValueError("refusing to write an empty part")
        if np.any(index % self.n != self.k):
            raise ValueError(f"part has rows that do not belong to shard {self.k}/{self.n}")
        if len(np.unique(index)) != len(index) or not self._done.isdisjoint(index.tolist()):
            raise ValueError("part repeats rows that are already written")
        table = table.sort_by(INDEX_COLUMN)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        name = f"part-{self._next_part_number():06d}.parquet"
        atomic_write_bytes(self.shard_dir / name, data)
        errors = (table.column("finish_reason").to_numpy(zero_copy_only=False) == "error").sum()
        record = PartRecord(
            part=name,
            rows=len(index),
            errors=int(errors),
            min_index=int(index.min()),
            max_index=int(index.max()),
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            time=time.time(),
            session_start=self.session_start,
        )
        _append_record(self.shard_dir / PROGRESS, record)
        self._records.append(record)
        self._done.update(index.tolist())
        self.rows_done += record.rows
        self.errors += record.errors
        return record

    def _next_part_number(self) -> int:
        numbers = [int(_PART_RE.match(r.part).group(1)) for r in self._records]
        return max(numbers, default=-1) + 1

    def mark_complete(self, total_rows: int) -> dict[str, Any]:
        """Record that every row of this shard is durable (``total_rows``: rows in the input).

        Raises:
            CheckpointError: the recorded parts do not cover the shard's rows.
        """
        self._require()
        if not self._covers(total_rows):
            raise CheckpointError(
                f"shard {self.k}/{self.n} has {self.rows_done} of "
                f"{shard_rows(total_rows, self.k, self.n)} rows; cannot mark it complete"
            )
        with _manifest_lock(self.directory):
            manifest = read_manifest(self.directory)
            if manifest is None:
                raise CheckpointError(f"{self.directory / MANIFEST} disappeared during the run")
            _set_total_rows(self.directory, manifest, total_rows)
        self.total_rows = total_rows
        done = {
            "rows": self.rows_done,
            "errors": self.errors,
            "parts": len(self._records),
            "total_rows": total_rows,
            "finished": time.time(),
        }
        atomic_write_json(self.shard_dir / COMPLETE, done)
        return done

    def is_complete(self) -> bool:
        done = read_json(self.shard_dir / COMPLETE)
        return done is not None and self._covers(done.get("total_rows"))


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
