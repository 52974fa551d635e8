"""Durable checkpoints: manifest, shards, and the store of one shard that ties them together.

Takes Arrow tables of results and paths; knows nothing of the model or of job specs beyond the
plain dict and fingerprint it is handed. Layout of a checkpoint directory (default
``OUTPUT.parts/``)::

    manifest.json                 spec, fingerprint and its fields, num_shards, total_rows,
                                  and the file an --overwrite run found at the output (replaces)
    manifest.lock                 flock held briefly while the manifest is read, created or wiped
    merge.lock                    flock held by a merge, and while drop_errors changes parts
    unmerged.json                 drop_errors changed parts since the last merge (merge removes it)
    shard-00000-of-00003.lock     flock held by the run of shard 0 (pid/host/start, for status)
    shard-00000-of-00003/
        part-000000.parquet       results of some rows of shard 0, sorted by row_index
        progress.jsonl            one line per durable part: name, rows, errors, indices, sha256
        complete.json             written once every row of the shard is recorded
        retrying.json             rows whose error records drop_errors took back, until complete

Protocol: a part is written to a temp name, fsynced, renamed, the directory fsynced, and only then
recorded by appending one line to ``progress.jsonl`` (fsynced). On open a record is trusted only
if its line is complete and its file has the recorded size, sha256 and row indices; everything
else (temp files, unrecorded parts, damaged parts, a torn last line) is ignored and deleted, so a
process killed at any instant loses at most the part it was writing. A restart trusts these
records, never memory. Part files and progress records live in `jobrunner.parts`, the locks in
`jobrunner.locks` (their names are re-exported here). Joining the shards into the output file and
reporting progress live in `jobrunner.merge`.

Shards: row ``i`` belongs to shard ``i % N`` (shards are 0-based: ``K/N`` with ``0 <= K < N``).
The partition is stable and needs no row count up front. Each shard has its own lock, parts and
progress, so shards run concurrently on one or many machines sharing a filesystem (flock works over
NFSv4 and Lustre; on old NFS mounts use one machine per shard directory). Lock files are never
deleted: deleting a flock'd file lets a second process lock a fresh inode of the same name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# `write_part` calls `_append_record` through this module's globals, so tests that patch
# ``checkpoint._append_record`` still reach it. The ``X as X`` names are only re-exported: callers
# and tests import them from here.
from jobrunner.locks import CheckpointError, JobLock, _manifest_lock, is_locked
from jobrunner.locks import LockHeld as LockHeld
from jobrunner.locks import read_lock_info as read_lock_info
from jobrunner.parts import (
    _PART_RE,
    PROGRESS,
    PartRecord,
    _append_record,
    _clean_shard_dir,
    scan_shard,
)
from jobrunner.parts import ShardScan as ShardScan
from jobrunner.parts import read_progress as read_progress
from jobrunner.writers import INDEX_COLUMN, atomic_write_bytes, atomic_write_json, fsync_dir

MANIFEST = "manifest.json"
COMPLETE = "complete.json"
# the rows ``drop_errors`` took back from error records, until the shard is complete again
RETRYING = "retrying.json"
MERGE_LOCK = "merge.lock"
UNMERGED = "unmerged.json"  # drop_errors changed parts since the last merge
# written when a run finds its input changed while it ran: the saved rows may not be the file's
INPUT_CHANGED = "input-changed.json"
FORMAT_VERSION = 1
_SHARD_DIR_RE = re.compile(r"^shard-\d{5,}-of-\d{5,}$")


class FingerprintMismatch(CheckpointError):
    """The checkpoint belongs to a job with another fingerprint."""


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


# --- manifest ----------------------------------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint directory, or None if there is none.

    Raises:
        CheckpointError: the manifest is empty, not JSON, or lacks ``num_shards`` and
            ``fingerprint``; nothing in the directory can be trusted then.
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(path, str(err)) from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"it holds a JSON {type(manifest).__name__}, not an object")
    shards = manifest.get("num_shards")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise _damaged(path, f"num_shards is {shards!r}")
    if not isinstance(manifest.get("fingerprint"), str):
        raise _damaged(path, "it has no fingerprint")
    return manifest


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint manifest {path} is damaged ({why}), so none of its checkpoint can be "
        "trusted; run the job again with --overwrite to start over"
    )


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (what it reads back as from a manifest)."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _short(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


_ABSENT = object()


def describe_changes(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    comparable: Callable[..., dict] | None = None,
) -> list[str]:
    """``field: old → new`` for every fingerprint field that differs (in ``comparable`` form,
    if given, so that what another fingerprint version recorded differently is not listed).

    Nested fields are compared one by one (``input.size: 10 → 12``), so a long value such as
    the input's identity still names the part of it that changed.
    """
    old, new = jsonable(dict(old)), jsonable(dict(new))
    if comparable is not None:
        old, new = comparable(old), comparable(new, old)
    old, new = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before != after:
            changes.append(
                _in_words(key, before, after) or f"{key}: {_short(before)} → {_short(after)}"
            )
    return changes


def _in_words(key: str, before: Any, after: Any) -> str | None:
    """Fields in words where a value says nothing to a reader (a hash, nanoseconds): the
    input's size in bytes, modification time as a time and content sample as what it means,
    and the tokenizer's encoding as what changes it."""
    if key == "model_identity.prompt_encoding" and _ABSENT not in (before, after):
        return (
            "prompt encoding: the installed libraries (transformers, tokenizers) encode prompts "
            "with this model's tokenizer otherwise than when the job started, its files the same"
        )
    if key == "input.size" and _ABSENT not in (before, after):
        return f"input.size: {before} → {after} bytes"
    if key == "input.sample_sha256":
        return "input content: other bytes than when the job started"
    if key == "input.mtime_ns" and all(isinstance(x, int) for x in (before, after)):
        when = [
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x // 10**9)) for x in (before, after)
        ]
        if when[0] == when[1]:  # within one second (a copy that kept only whole seconds, say)
            when = [f"{w}.{x % 10**9:09d}" for w, x in zip(when, (before, after), strict=True)]
        return (
            f"input modification time: {when[0]} → {when[1]} (a file over 2 MiB is not read "
            "whole, so a new time counts as a change)"
        )
    return None


def _flatten(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_same_job(
    record: Mapping[str, Any],
    fingerprint: str,
    fields: Mapping[str, Any],
    comparable: Callable[..., dict] | None = None,
) -> bool:
    """Whether ``record`` (a manifest, or an output's metadata) is of the job with this
    ``fingerprint`` and ``fields``: the same fingerprint, or fields equal in ``comparable``
    form (recorded by another version of the fingerprint)."""
    if record.get("fingerprint") == fingerprint:
        return True
    stored = record.get("fingerprint_fields")
    if comparable is None or not isinstance(stored, dict) or not stored:
        return False
    return comparable(stored) == comparable(dict(fields), stored)


def _check_same_job(
    directory: Path,
    manifest: dict,
    fingerprint: str,
    fields: dict,
    n: int,
    comparable: Callable[..., dict] | None = None,
) -> None:
    changes = []
    if not is_same_job(manifest, fingerprint, fields, comparable):
        changes = describe_changes(manifest.get("fingerprint_fields") or {}, fields, comparable)
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
    for shard_dir in sorted(directory.iterdir()):
        if not (shard_dir.is_dir() and _SHARD_DIR_RE.match(shard_dir.name)):
            continue
        if only_shard is not None and shard_dir.name != only_shard:
            continue
        removed += _clean_shard_dir(shard_dir, keep=set())
        for name in (PROGRESS, COMPLETE, RETRYING):
            if (shard_dir / name).exists():
                (shard_dir / name).unlink()
                removed.append(f"{shard_dir.name}/{name}")
        with contextlib.suppress(OSError):
            shard_dir.rmdir()  # only if nothing foreign is left inside
    if only_shard is None:
        (directory / UNMERGED).unlink(missing_ok=True)
    if only_shard is None and (directory / INPUT_CHANGED).exists():
        (directory / INPUT_CHANGED).unlink()
        removed.append(INPUT_CHANGED)
    # the manifest last: a wipe cut short leaves a checkpoint that is still one
    if only_shard is None and (directory / MANIFEST).exists():
        (directory / MANIFEST).unlink()
        removed.append(MANIFEST)
    fsync_dir(directory)
    return removed


def _discarded(removed: list[str]) -> list[str]:
    """One line for what --overwrite removed (not a line per part file)."""
    if not removed:
        return []
    return [f"--overwrite discarded the old checkpoint: removed {len(removed)} files"]


def _running_shards(directory: Path, except_name: str) -> list[str]:
    return [
        p.stem
        for p in sorted(directory.glob("shard-*-of-*.lock"))
        if p.stem != except_name and is_locked(p)
    ]


def _has_shard_dirs(directory: Path, except_name: str | None = None) -> bool:
    return any(
        p.is_dir() and _SHARD_DIR_RE.match(p.name) and p.name != except_name
        for p in directory.iterdir()
    )


def input_changed(directory: Path) -> str | None:
    """What a run of the job found changed in its input while it ran (``mark_input_changed``),
    or None: the job's saved rows may then not be the file's."""
    record = read_json(Path(directory) / INPUT_CHANGED)
    if record is None:
        return None
    return str(record.get("change") or "unknown")


def refuse_if_input_changed(directory: Path) -> None:
    """Raise ``CheckpointError`` if a run of the job found its input changed while it ran:
    its saved rows may not be the file's, so it neither resumes nor merges."""
    if change := input_changed(directory):
        raise CheckpointError(
            f"the input changed while this job last ran ({change}), so the rows it saved may "
            "not be the file's: run it again with --overwrite"
        )


def file_identity(path: Path) -> dict[str, int] | None:
    """What tells a file at a path apart from any that replaced it or was written over it:
    inode, size and modification time (None where there is no file). Not the device number,
    which a network share's remount may change while the job waits; not the change time,
    which a backup's hard link or a chmod moves without touching the file."""
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        return None
    return {"inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def replaces_output(manifest: Mapping[str, Any] | None, path: Path) -> bool:
    """Whether the file at ``path`` is the one an --overwrite run of the manifest's job found
    at its output: kept until the job's merge replaces it, and then only that very file (one
    written over it or moved there since is refused, as any file the job did not merge)."""
    recorded = (manifest or {}).get("replaces")
    identity = file_identity(path)
    if not isinstance(recorded, dict) or identity is None:
        return False
    return all(recorded.get(key) == value for key, value in identity.items())


def forget_replaced(directory: Path) -> None:
    """Drop the manifest's ``replaces`` once the job's merge has replaced that file: a file
    put at the output later with the same identity (the old output moved or linked back, an
    inode number reused with a copy's size and time) is no longer taken for it. It stays
    known as ``replaced``: the job began over another output (``OUTPUT.summary.json``)."""
    with _manifest_lock(Path(directory)):
        manifest = read_manifest(Path(directory))
        if manifest is not None and manifest.get("replaces") is not None:
            gone = {"replaces": None, "replaced": manifest["replaces"]}
            atomic_write_json(Path(directory) / MANIFEST, {**manifest, **gone})


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file's content, or None if it is missing, not whole (never trusted half)
    or holds something other than an object."""
    try:
        content = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def retried_rows(shard_dir: Path) -> set[int]:
    """The rows whose error records ``drop_errors`` took back in this shard folder (its
    ``retrying.json``), until the shard is complete again; none for a file that is no list."""
    rows = (read_json(Path(shard_dir) / RETRYING) or {}).get("rows")
    return {i for i in rows if isinstance(i, int)} if isinstance(rows, list) else set()


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
    created: bool = False  # this call wrote the manifest (a new job)
    made_with: dict[str, Any] | None = None  # the versions the job was started with


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
        self._opened = self._created = False
        self.retried: set[int] = set()  # rows that were error records (``drop_errors``)
        self._done: set[int] = set()
        self._records: list[PartRecord] = []
        self._next_number = 0  # of the next part file: one past the highest recorded

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
        comparable: Callable[..., dict] | None = None,
        output: Path | None = None,
        made_with: Mapping[str, Any] | None = None,
    ) -> ResumeInfo:
        """Create the checkpoint, or resume it if it belongs to the same job.

        ``output``: with ``overwrite``, the job's output file. A file there is not removed: the
        manifest records it (``replaces``) as the file the job's merge replaces, so readers
        keep the old output until the new one takes its place in one rename, and a run that
        fails or is stopped before then leaves it as it was.

        ``made_with``: the versions of what shapes the rows (``writers.collect_versions``),
        recorded in a new manifest so that a resume on other versions can say so.

        ``comparable``: the form in which fingerprint fields recorded by another version of
        the fingerprint compare with this one's (``spec.comparable_fields``); a checkpoint whose
        fields equal this job's in that form resumes, and a refusal lists the differences
        that remain.

        Raises:
            FingerprintMismatch: the directory holds another job (message names what changed).
            CheckpointError: --overwrite while other shards of the old job are running, or a
                directory with shard folders but no manifest.
        """
        self._require(opened=False)
        with _manifest_lock(self.directory):
            existed = (self.directory / MANIFEST).exists()
            replaces = file_identity(output) if overwrite and output is not None else None
            manifest, resumed, cleaned = self._prepare_manifest(
                dict(spec),
                fingerprint,
                dict(fingerprint_fields),
                overwrite,
                comparable,
                replaces,
                made_with,
            )
            manifest = _set_total_rows(self.directory, manifest, total_rows)
            self._created = not resumed and (not existed or overwrite)
            # made under the lock, so abandon_new can tell from the folders alone whether
            # another shard of the job has started
            if not self.shard_dir.is_dir():
                self.shard_dir.mkdir(parents=True)
                fsync_dir(self.directory)
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
            created=self._created,
            made_with=manifest.get("made_with"),
        )

    def mark_input_changed(self, change: str) -> None:
        """Note that this run found the input changed while it ran (``change``, in words):
        the job resumes no more (``open_or_create``), ``status`` and ``merge`` say why."""
        self._require()
        atomic_write_json(
            self.directory / INPUT_CHANGED,
            {"change": change, "shard": self.name, "time": time.time()},
        )

    def abandon_new(self) -> bool:
        """Undo ``open_or_create`` for a run that recorded nothing (it failed before any row, as
        when the model does not load): remove this shard's folder and, once no shard of the job
        has a folder (each makes its own in ``open_or_create``), the manifest too, so that the
        corrected command starts afresh instead of being refused as another job. The shards of
        a new job that all fail so leave nothing, whichever of them created the manifest.
        Nothing is removed if this shard holds a recorded row or is complete. Returns whether
        the manifest was removed."""
        self._require()
        if self._records:
            return False
        with _manifest_lock(self.directory):
            # the disk, not memory: a signal can land between a part's record and ``_records``;
            # a shard that dropped its error records is no new job's (``retrying.json``)
            if (
                read_progress(self.shard_dir)[0]
                or any(self.shard_dir.glob("part-*.parquet"))
                or (self.shard_dir / COMPLETE).exists()
                or (self.shard_dir / RETRYING).exists()
            ):
                return False
            _wipe(self.directory, only_shard=self.name)
            if _has_shard_dirs(self.directory):  # another shard started (open_or_create)
                return False
            _wipe(self.directory)
        self._opened = self._created = False
        return True

    def _prepare_manifest(
        self,
        spec: dict,
        fingerprint: str,
        fields: dict,
        overwrite: bool,
        comparable: Callable[..., dict] | None,
        replaces: dict[str, int] | None = None,
        made_with: Mapping[str, Any] | None = None,
    ) -> tuple[dict, bool, list[str]]:
        cleaned: list[str] = []
        try:
            manifest = read_manifest(self.directory)
        except CheckpointError:
            if not overwrite:
                raise
            manifest = None  # damaged: --overwrite discards it below with everything else
        changed = input_changed(self.directory)
        if not overwrite:
            refuse_if_input_changed(self.directory)
        same = manifest is not None and is_same_job(manifest, fingerprint, fields, comparable)
        same = same and manifest.get("num_shards") == self.n and not changed
        if overwrite and same:
            # Same job: redo only this shard; the others' work is valid and they may be running.
            cleaned = _discarded(_wipe(self.directory, only_shard=self.name))
            # what this run found there (nothing, once the old output was moved away)
            if replaces != manifest.get("replaces"):
                manifest = {**manifest, "replaces": replaces}
                atomic_write_json(self.directory / MANIFEST, manifest)
            return manifest, False, cleaned
        if overwrite:
            running = _running_shards(self.directory, self.name)
            if running:
                raise CheckpointError(
                    f"cannot --overwrite {self.directory}: {', '.join(running)} of the old job "
                    "still running; stop them first"
                )
            cleaned, manifest = _discarded(_wipe(self.directory)), None
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
                "replaces": replaces,
                "made_with": jsonable(dict(made_with)) if made_with is not None else None,
            }
            atomic_write_json(self.directory / MANIFEST, manifest)
            return manifest, False, cleaned
        _check_same_job(self.directory, manifest, fingerprint, fields, self.n, comparable)
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
        self._next_number = self._next_part_number(scan.records)
        self.rows_done, self.errors = scan.rows, scan.errors
        self.retried = retried_rows(self.shard_dir)
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
        record = self._part_file(table, self._take_part_number())
        _append_record(self.shard_dir / PROGRESS, record)
        self._records.append(record)
        self._done.update(index.tolist())
        self.rows_done += record.rows
        self.errors += record.errors
        return record

    def import_parts(self, tables: Iterable[pa.Table], made: float) -> int:
        """Make ``tables`` (rows of this shard, as ``write_part`` takes them) the parts of this
        empty shard, all recorded at once: every file is made durable first, then
        ``progress.jsonl`` is written with their records in one replace, so a process killed
        meanwhile leaves the shard empty (the files unrecorded, removed on the next open).
        ``made``: when the rows were made, their records' time and session (``status``'s rate
        counts only what this session runs). Returns the rows imported. On an error the files
        written so far are removed.
        """
        self._require()
        if self._records:
            raise RuntimeError("parts are imported into an empty shard only")
        records, done = [], set()
        try:
            for table in tables:
                index = table.column(INDEX_COLUMN).to_numpy()
                if np.any(index % self.n != self.k) or not done.isdisjoint(index.tolist()):
                    raise ValueError(f"imported rows repeat or are not of shard {self.name}")
                done.update(index.tolist())
                record = self._part_file(table, self._take_part_number())
                records.append(replace(record, time=made, session_start=made))
            atomic_write_bytes(self.shard_dir / PROGRESS, b"".join(r.to_line() for r in records))
        except BaseException:
            with contextlib.suppress(OSError):
                _clean_shard_dir(self.shard_dir, keep=set())
            raise
        self._records, self._done = records, done
        self.rows_done = sum(r.rows for r in records)
        self.errors = sum(r.errors for r in records)
        return self.rows_done

    def _part_file(self, table: pa.Table, number: int) -> PartRecord:
        """Write ``table`` as part ``number``, durable but not recorded; its record."""
        table = table.sort_by(INDEX_COLUMN)
        index = table.column(INDEX_COLUMN).to_numpy()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        name = f"part-{number:06d}.parquet"
        # a new name: its temps, if a killed run left any, went when the shard was opened
        atomic_write_bytes(self.shard_dir / name, data, clean=False)
        errors = (table.column("finish_reason").to_numpy(zero_copy_only=False) == "error").sum()
        return PartRecord(
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

    @staticmethod
    def _next_part_number(records: list[PartRecord]) -> int:
        numbers = [int(_PART_RE.match(r.part).group(1)) for r in records]
        return max(numbers, default=-1) + 1

    def _take_part_number(self) -> int:
        """The next part's number, counted on from the records found on open (not found
        again from every record for each part: quadratic in a shard's parts)."""
        number = self._next_number
        self._next_number += 1
        return number

    def drop_errors(self, waiting: Callable[[], None] | None = None) -> int:
        """Forget this shard's error records, so that their rows run again (``--retry-errors``);
        returns how many were dropped. Every other row stays done.

        Each part holding errors is replaced by a new part of its other rows (none if it had
        only errors): the new parts are made durable first, then the dropped rows are noted
        (``retrying.json``, read into ``retried``), then ``progress.jsonl`` is replaced at once
        by one naming the new parts instead of the old, then the old files are deleted. A
        process killed before the replacement leaves unrecorded new parts (removed on the next
        open, the errors still recorded); after it, the old part files are as unrecorded. The
        shard is no longer complete, and the output merged before is older than the checkpoint
        (``unmerged.json``, before anything changes; ``merge.output_is_current``, until the
        next merge). Held under the merge lock, so no merge reads the parts
        meanwhile; ``waiting`` is called while a merge holds it (it may raise, to give up before
        anything changed).
        """
        self._require()
        failed = [r for r in self._records if r.errors]
        if not failed:
            return 0
        with _manifest_lock(self.directory, MERGE_LOCK, waiting):
            with contextlib.suppress(FileNotFoundError):
                (self.shard_dir / COMPLETE).unlink()
                fsync_dir(self.shard_dir)
            records = [r for r in self._records if not r.errors]
            written: list[PartRecord] = []
            dropped: list[int] = []
            for old in failed:
                table = pq.read_table(self.shard_dir / old.part)
                error = pc.equal(table.column("finish_reason"), "error")
                dropped += table.filter(error).column(INDEX_COLUMN).to_pylist()
                kept = table.filter(pc.invert(error))
                if kept.num_rows:
                    new = self._part_file(kept, self._take_part_number())
                    # the rows' own time: status's rate counts only what this session runs
                    written.append(replace(new, time=old.time, session_start=old.session_start))
            retried = self.retried | set(dropped)
            atomic_write_json(self.directory / UNMERGED, {"shard": self.name, "time": time.time()})
            atomic_write_json(self.shard_dir / RETRYING, {"rows": sorted(retried)})
            records += written
            atomic_write_bytes(self.shard_dir / PROGRESS, b"".join(r.to_line() for r in records))
            _clean_shard_dir(self.shard_dir, keep={r.part for r in records})
        self._records, self.retried = records, retried
        self._done.difference_update(dropped)
        self.rows_done = sum(r.rows for r in records)
        self.errors = 0
        return len(dropped)

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
        (self.shard_dir / RETRYING).unlink(missing_ok=True)  # every retried row is recorded
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
