"""Merge and status: join every shard's durable parts into the output file; report progress.

Reads checkpoint directories written by `jobrunner.checkpoint` and trusts only what its records
say (sizes, hashes, row indices are checked again before anything is merged). Knows nothing of
the model or of job specs.

Merge: refuses (`IncompleteJob`, naming each missing or unfinished shard) until every shard has a
completion record; then checks that the parts cover input rows ``0..total-1`` exactly once and
writes them in input order, one window of rows at a time, to a temp file that is fsynced and
renamed over the output. Merges take ``merge.lock`` from reading the parts to the rename, one at
a time (``drop_errors`` takes it too while it changes parts): of several shards finishing at
once, the first merges and the others, having waited, find the output holding these very parts
(its recorded ``parts_digest``) and leave it. ``unmerged.json`` marks a checkpoint whose parts a
retry changed since the last merge (``output_is_current``). Kept columns get
one type from what all parts record (`jobrunner.writers`: the input's Arrow type, or one picked
from the kinds of JSON values), never from one part alone.

Status: reads only (never locks, never cleans), so it is safe while shards are running.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobrunner.checkpoint import (
    COMPLETE,
    MANIFEST,
    MERGE_LOCK,
    RETRYING,
    UNMERGED,
    CheckpointError,
    PartRecord,
    _manifest_lock,
    forget_replaced,
    input_changed,
    is_locked,
    jsonable,
    read_json,
    read_lock_info,
    read_manifest,
    read_progress,
    refuse_if_input_changed,
    replaces_output,
    retried_rows,
    scan_shard,
    shard_name,
    shard_rows,
)
from jobrunner.readers import ReaderConfigError, kept_column_types
from jobrunner.spec import input_change
from jobrunner.writers import (
    INDEX_COLUMN,
    OUTPUT_METADATA_KEY,
    RESERVED_COLUMNS,
    decode_kept,
    error_rows,
    fsync_dir,
    kept_json_text,
    kept_type,
    merged_metadata,
    part_from_output,
    part_kept_types,
    remove_orphan_temps,
    results_schema,
    temp_path_for,
)


class IncompleteJob(CheckpointError):
    """Merge was asked for while some shards are missing or unfinished."""

    def __init__(
        self,
        missing: list[int],
        incomplete: dict[int, tuple[int, int | None]],
        n: int,
        running: frozenset[int] = frozenset(),
    ):
        self.missing, self.incomplete = missing, incomplete
        parts = [
            f"shard {k}/{n} " + ("is running (no rows saved yet)" if k in running else
                                 "has not started")
            for k in missing
        ]  # fmt: skip
        for k, (done, total) in sorted(incomplete.items()):
            state = "is running" if k in running else "is incomplete"
            parts.append(
                f"shard {k}/{n} {state} ({done}/{total if total is not None else '?'} rows)"
            )
        then = "Wait for the running shards" if running else "Run those shards"
        super().__init__("cannot merge: " + "; ".join(parts) + f". {then}, then merge again.")


# --- merge -------------------------------------------------------------------------------------


@dataclass
class MergeInfo:
    path: Path
    rows: int
    errors: int
    parts: int
    bytes: int


@dataclass
class _Part:
    path: Path
    min_index: int


@dataclass
class _Kept:
    """What all parts say of the kept columns: the kinds of the values stored as JSON text, and
    the one Arrow type of each typed column (Parquet input; see `jobrunner.writers`)."""

    kinds: dict[str, set[str]]
    types: dict[str, pa.DataType]

    def output_type(self, name: str) -> pa.DataType:
        if name in self.types:
            return self.types[name]
        return kept_type(self.kinds.get(name, ())) or pa.string()


def all_shards_complete(directory: Path) -> bool:
    """Whether every shard of the checkpoint has a valid completion record (cheap: no hashing)."""
    manifest = read_manifest(Path(directory))
    if manifest is None:
        return False
    n = manifest["num_shards"]
    missing, incomplete, _ = _merge_problems(Path(directory), n, manifest.get("total_rows"))
    return not missing and not incomplete


def _merge_problems(
    directory: Path, n: int, total: int | None
) -> tuple[list[int], dict[int, tuple[int, int | None]], set[int]]:
    """Shards not started, shards incomplete (done, total), and the totals completions recorded."""
    missing, incomplete, totals = [], {}, set()
    for k in range(n):
        shard_dir = directory / shard_name(k, n)
        records, _ = read_progress(shard_dir)
        done = read_json(shard_dir / COMPLETE)
        if done is not None:
            totals.add(done.get("total_rows"))
        elif not records:
            missing.append(k)
        else:
            expected = shard_rows(total, k, n) if total is not None else None
            incomplete[k] = (sum(r.rows for r in records), expected)
    return missing, incomplete, totals


def _merge_total(directory: Path, manifest: dict, n: int, total_rows: int | None) -> int:
    missing, incomplete, totals = _merge_problems(directory, n, manifest.get("total_rows"))
    if missing or incomplete:
        running = frozenset(
            k for k in (*missing, *incomplete) if is_locked(directory / f"{shard_name(k, n)}.lock")
        )
        raise IncompleteJob(missing, incomplete, n, running)
    totals |= {t for t in (manifest.get("total_rows"), total_rows) if t is not None}
    if len(totals) != 1 or not isinstance(next(iter(totals)), int):
        raise CheckpointError(
            f"shards of {directory} disagree on the number of input rows: {totals}"
        )
    return totals.pop()


def _collect_parts(directory: Path, n: int, total: int) -> tuple[list[_Part], _Kept, list[str]]:
    """Verified parts of every shard, what they say of kept columns, kept column names."""
    parts, kinds, types, indices, layouts = [], {}, {}, [], set()
    for k in range(n):
        shard_dir = directory / shard_name(k, n)
        scan = scan_shard(shard_dir, k, n)
        if scan.dropped:
            raise CheckpointError(
                f"damaged part in shard {k}/{n} ({scan.dropped[0]}); run shard {k}/{n} again to "
                "redo its rows, then merge"
            )
        parts += [_Part(shard_dir / rec.part, rec.min_index) for rec in scan.records]
        indices += scan.indices
        layouts |= scan.layouts
        for name, values in scan.kinds.items():
            kinds.setdefault(name, set()).update(values)
        for name, values in scan.kept_types.items():
            types.setdefault(name, set()).update(values)
    if len(layouts) > 1:
        raise CheckpointError(f"parts in {directory} have different columns: {sorted(layouts)}")
    check_coverage(np.concatenate(indices) if indices else np.zeros(0, np.int64), total)
    keep = [c for c in next(iter(layouts), ()) if c not in RESERVED_COLUMNS]
    kept = _Kept(kinds, _one_type_each(directory, types))
    for name in set(kept.types) & set(kinds):  # parts of both formats: see _as_json_text
        del kept.types[name]
        for part in parts:
            kinds[name] |= _json_kinds(part, name)
    return parts, kept, keep


def _kept_without_parts(manifest: Mapping[str, Any]) -> tuple[list[str], _Kept]:
    """The kept columns of a job whose input has no rows, from its spec: the output still has
    them, so that it stacks with the outputs of other files. Typed as the input's (Parquet),
    or as a JSONL column that no row had a value in: string."""
    spec = manifest.get("spec") or {}
    keep = list(spec.get("keep_columns") or ())
    try:
        types = kept_column_types(spec.get("input") or "", keep)
    except (ReaderConfigError, KeyError):  # the input gone since: the columns stay, as text
        types = {}
    return keep, _Kept({}, types)


def _one_type_each(directory: Path, types: dict[str, set[pa.DataType]]) -> dict[str, pa.DataType]:
    """The type of each typed kept column; parts of one job agree (they read one input)."""
    for name, found in types.items():
        if len(found) > 1:
            raise CheckpointError(
                f"parts in {directory} hold kept column '{name}' as different types "
                f"({', '.join(sorted(map(str, found)))}): the input changed while the job ran; "
                "run it again with --overwrite"
            )
    return {name: found.pop() for name, found in types.items()}


def check_coverage(index: np.ndarray, total: int) -> None:
    """Every input index 0..total-1 exactly once, else an error listing examples."""
    if len(index) == total and np.array_equal(np.sort(index), np.arange(total)):
        return
    outside = index[(index < 0) | (index >= total)]
    counts = np.bincount(index[(index >= 0) & (index < total)], minlength=total)
    problems = {
        "missing": np.flatnonzero(counts == 0),
        "duplicated": np.flatnonzero(counts > 1),
        "out of range": outside,
    }
    text = "; ".join(f"{len(v)} {k} (e.g. {v[:5].tolist()})" for k, v in problems.items() if len(v))
    raise CheckpointError(f"parts do not cover input rows 0..{total - 1} exactly once: {text}")


def _load_part(part: _Part, schema: pa.Schema, kept: _Kept) -> pa.Table:
    table = pq.read_table(part.path)
    typed = part_kept_types(table.schema)
    columns = []
    for f in schema:
        column = table[f.name]
        if f.name in RESERVED_COLUMNS or f.name in kept.types:
            columns.append(column)  # typed in every part: the output's type already
            continue
        texts = _as_json_text(column) if f.name in typed else column.combine_chunks()
        columns.append(decode_kept(texts, kept.kinds.get(f.name, ())))
    return pa.Table.from_arrays(columns, schema=schema)


def _as_json_text(column: pa.ChunkedArray) -> pa.Array:
    """A typed kept column as parts held it before kept Parquet columns were typed (the JSON
    text of each value's Python value). A job checkpointed by that jobrunner and resumed by
    this one has parts of both formats: it merges as the version that started it would have."""
    return pa.array(kept_json_text(_python_values(column), sort_keys=True)[0], pa.string())


def _json_kinds(part: _Part, name: str) -> set[str]:
    """The kinds of the values of a typed kept column of ``part`` (none if it holds JSON)."""
    if name not in part_kept_types(pq.read_schema(part.path)):
        return set()
    return kept_json_text(_python_values(pq.read_table(part.path, columns=[name])[name]))[1]


def _python_values(column: pa.ChunkedArray) -> list:
    """The column's values in Python; one Python cannot hold (nanoseconds without pandas, a
    year past 9999) as None, as that version stored it."""
    values = []
    for scalar in column:
        try:
            values.append(scalar.as_py())
        except (ValueError, OverflowError, pa.ArrowException):
            values.append(None)
    return values


# Most bytes (Arrow's, in memory) that one merge window of rows may hold: a window of
# ``rows_per_group`` rows of wide rows (long kept strings or lists, long ids) would hold
# ``rows_per_group`` times their width, several times over (parts, slices, concat, sort).
MERGE_WINDOW_BYTES = 64 << 20
MIN_WINDOW_ROWS = 256


def _window_rows(rows_per_group: int, row_bytes: int) -> int:
    """Rows in a merge window (and output row group): ``rows_per_group``, fewer for rows so
    wide that so many would hold more than ``MERGE_WINDOW_BYTES``."""
    fitting = MERGE_WINDOW_BYTES // max(row_bytes, 1)
    return max(1, min(rows_per_group, max(fitting, MIN_WINDOW_ROWS)))


def _write_in_order(
    parts: list[_Part],
    total: int,
    schema: pa.Schema,
    kept: _Kept,
    writer: pq.ParquetWriter,
    rows_per_group: int,
) -> None:
    """Write rows in input order, one window of indices at a time.

    Parts are sorted inside and loaded only when the window reaches their first index, so memory
    holds just the parts that overlap the window (the run writes rows roughly in input order).
    A window holds at most ``rows_per_group`` rows, and fewer where the widest part loaded so
    far says that many rows would take more than ``MERGE_WINDOW_BYTES``.
    """
    pending, active = deque(sorted(parts, key=lambda p: p.min_index)), []
    row_bytes, start = 1, 0
    while start < total:
        end = min(start + _window_rows(rows_per_group, row_bytes), total)
        while pending and pending[0].min_index < end:
            table = _load_part(pending.popleft(), schema, kept)
            row_bytes = max(row_bytes, table.nbytes // max(table.num_rows, 1))
            active.append(table)
            # a wide part narrows the window at once (its rows past the end wait, sliced)
            end = min(end, start + _window_rows(rows_per_group, row_bytes))
        taken, active_next = [], []
        for table in active:
            cut = int(np.searchsorted(table.column(INDEX_COLUMN).to_numpy(), end))
            taken.append(table.slice(0, cut))
            if cut < table.num_rows:
                active_next.append(table.slice(cut))
        active = active_next
        chunk = pa.concat_tables(taken).sort_by(INDEX_COLUMN)
        if not np.array_equal(chunk.column(INDEX_COLUMN).to_numpy(), np.arange(start, end)):
            raise CheckpointError(f"rows {start}..{end - 1} changed while merging; merge again")
        writer.write_table(chunk, row_group_size=rows_per_group)
        start = end


def merge(
    directory: Path,
    output_path: Path,
    total_rows: int | None = None,
    num_shards: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    rows_per_group: int = 65536,
    waiting: Callable[[], None] | None = None,
) -> MergeInfo:
    """Join every shard's parts into ``output_path``, in input order, written atomically.

    Args:
        directory: the checkpoint directory.
        output_path: the final Parquet file (replaced atomically if it exists and was merged
            from this checkpoint before; any other file there is refused).
        total_rows: input rows (default: what the manifest and completion records say).
        num_shards: expected number of shards (default: the manifest's).
        metadata: JSON-able dict stored under the file metadata key ``jobrunner``, on top of the
            manifest's spec and fingerprint (see `jobrunner.writers.ParquetOutputMetadata`).
        rows_per_group: Parquet row group size, also the merge window (fewer rows where
            rows are wide: ``MERGE_WINDOW_BYTES``).

    Raises:
        IncompleteJob: some shard is missing or unfinished: the only error that means "merge
            later" (a shard that finishes while others run gets it; the last one merges).
        CheckpointError: anything else (damaged manifest or parts, rows missing/duplicated):
            the output cannot be written until it is fixed.
    """
    directory, output_path = Path(directory), Path(output_path)
    manifest = read_manifest(directory)
    if manifest is None:
        raise CheckpointError(f"no {MANIFEST} in {directory}: nothing to merge")
    if stopped_rebuild(directory, output_path):
        raise CheckpointError(
            f"nothing to merge: {directory} holds no rows (a --retry-errors run stopped while it "
            f"made it again from {output_path}, the job's finished output, which stays as it "
            "is); --retry-errors makes it again"
        )
    refuse_if_input_changed(directory)
    n = manifest["num_shards"]
    if num_shards is not None and num_shards != n:
        raise CheckpointError(f"{directory} was made for {n} shards, not {num_shards}")
    _refuse_foreign_output(output_path, manifest)
    # one merge at a time, and none while drop_errors changes a shard's parts: a merge that
    # read the parts before a retry must not replace the retry's output after it
    waited = is_locked(directory / MERGE_LOCK)  # another merge is writing
    with _manifest_lock(directory, MERGE_LOCK, waiting):
        _refuse_foreign_output(output_path, manifest)  # again: one may have appeared meanwhile
        total = _merge_total(directory, manifest, n, total_rows)
        digest = parts_digest(directory, n)
        done = merged_metadata(output_path) or {}
        extra = {
            k: v for k, v in jsonable(dict(metadata or {})).items() if k not in ("created", "spec")
        }
        if (
            waited
            and done.get("fingerprint") == manifest.get("fingerprint")
            and done.get("parts") == digest
            and all(done.get(k) == v for k, v in extra.items())  # e.g. the model a run names
            and not (directory / UNMERGED).exists()
        ):  # another merge wrote these very parts while this one waited for the lock
            return MergeInfo(
                path=output_path,
                rows=total,
                errors=sum(_scan_errors(directory, k, n) for k in range(n)),
                parts=sum(len(read_progress(directory / shard_name(k, n))[0]) for k in range(n)),
                bytes=output_path.stat().st_size,
            )
        parts, kept, keep = _collect_parts(directory, n, total)
        if not parts:  # an input of no rows: no part names the kept columns
            keep, kept = _kept_without_parts(manifest)
        schema = results_schema(keep, {c: kept.output_type(c) for c in keep})
        meta = {
            "spec": manifest.get("spec"),
            "fingerprint": manifest.get("fingerprint"),
            "fingerprint_fields": manifest.get("fingerprint_fields"),
            "parts": digest,
            # what turns the output back into parts (``output_parts``)
            KEPT_KINDS: {c: sorted(kept.kinds.get(c, ())) for c in keep if c not in kept.types},
            **jsonable(dict(metadata or {})),
        }
        file_schema = schema.with_metadata({OUTPUT_METADATA_KEY: json.dumps(meta, sort_keys=True)})
        _atomic_parquet(output_path, file_schema, parts, total, kept, rows_per_group)
        if manifest.get("replaces") is not None:  # that file is gone: accept it no more
            try:
                forget_replaced(directory)
            except OSError:  # a read-only checkpoint: the identity stays, as it was
                pass
        if (directory / UNMERGED).exists():
            (directory / UNMERGED).unlink()
            fsync_dir(directory)
        errors = sum(_scan_errors(directory, k, n) for k in range(n))
    size = output_path.stat().st_size
    return MergeInfo(path=output_path, rows=total, errors=errors, parts=len(parts), bytes=size)


# the output's metadata: the kinds of the values of each kept column typed from JSON values
KEPT_KINDS = "kept_kinds"
IMPORT_ROWS = 8192


def rebuild_refusal(
    output_path: Path, fingerprint: str, keep_columns: Sequence[str], total: int
) -> str | None:
    """Why the job's checkpoint cannot be rebuilt from its merged output (``output_parts``), or
    None: the output must be this job's by its very fingerprint (a merge replaces no other
    file), with kept columns record their kinds (outputs merged before 2026-11-24 do not), and
    hold input rows ``0..total-1`` in order, as its merge wrote them (not so once edited)."""
    meta = merged_metadata(output_path) or {}
    if meta.get("fingerprint") != fingerprint:
        return "it was written by an older jobrunner, whose fingerprint reads otherwise"
    if keep_columns and not isinstance(meta.get(KEPT_KINDS), dict):
        return "it was merged before outputs recorded what their kept columns hold (2026-11-24)"
    names = pq.read_schema(output_path).names
    if names != results_schema(keep_columns).names:
        return f"its columns are not this job's ({', '.join(names)})"
    try:
        for _ in _batches_in_order(output_path, total, [INDEX_COLUMN]):
            pass
    except _OutOfOrder:
        return "its rows are not the input's, each once and in order, as its merge wrote them"
    except (OSError, ValueError) as err:
        if not _damaged(err):
            raise
        return f"it is damaged ({err})"
    return None


class _OutOfOrder(Exception):
    """The output's rows are not input rows ``0..total-1`` in order."""


def _batches_in_order(
    output_path: Path, total: int, columns: list[str] | None = None, rows: int = IMPORT_ROWS
) -> Iterator[pa.RecordBatch]:
    """The output's ``columns`` (default: all), ``rows`` at a time, as long as its
    ``row_index`` goes ``0..total-1`` in order; ``_OutOfOrder`` where it does not."""
    source = pq.ParquetFile(output_path)
    if source.metadata.num_rows != total:
        raise _OutOfOrder
    start = 0
    for batch in source.iter_batches(batch_size=rows, columns=columns):
        index = batch.column(INDEX_COLUMN).to_numpy(zero_copy_only=False)
        if not np.array_equal(index, np.arange(start, start + len(index))):
            raise _OutOfOrder
        start += len(index)
        yield batch


def output_error_rows(output_path: Path) -> int:
    """How many rows of the job's output are error records (``error_rows``).

    Raises:
        CheckpointError: the output is damaged (a bad page), which no retry of the same
            command mends; the message says what does.
    """
    try:
        return error_rows(output_path)
    except (OSError, ValueError) as err:
        if not _damaged(err):
            raise
        raise CheckpointError(
            f"{output_path} cannot be read: it is damaged ({err}); move it away or delete it (a "
            "finished checkpoint of this job then merges it again), or run with --overwrite "
            "(every row runs again)"
        ) from None


def _damaged(err: OSError | ValueError) -> bool:
    """Whether ``err``, raised reading a Parquet file, says the file is damaged: pyarrow's
    errors (bad pages, bad UTF-8) carry no errno, where the system's (EIO) do, and may pass."""
    return not isinstance(err, OSError) or err.errno is None


def output_parts(
    output_path: Path, total: int, keep_columns: Sequence[str], rows: int = IMPORT_ROWS
) -> Iterator[pa.Table]:
    """The rows of a merged output as parts (``part_from_output``), ``rows`` at a time, checked
    to be input rows ``0..total-1`` in order; merged again they give the same file.

    Raises:
        CheckpointError: the output does not hold every input row once, in order, or is
            damaged (it changed since ``rebuild_refusal``); the message says what runs instead.
    """
    kinds = (merged_metadata(output_path) or {}).get(KEPT_KINDS) or {}
    cannot = f"{output_path} cannot make the job's checkpoint again"
    instead = "--overwrite runs every row again"
    try:
        for batch in _batches_in_order(output_path, total, rows=rows):
            batch.validate(full=True)  # bad UTF-8 fails here, not in a part or the merge
            yield part_from_output(pa.Table.from_batches([batch]), keep_columns, kinds)
    except _OutOfOrder:
        raise CheckpointError(
            f"{cannot}: it does not hold the input rows 0..{total - 1} in order; {instead}"
        ) from None
    except (OSError, ValueError) as err:
        if not _damaged(err):
            raise
        raise CheckpointError(f"{cannot}: it is damaged ({err}); {instead}") from None


def stopped_rebuild(
    directory: Path, output_path: Path | None, fingerprint: str | None = None
) -> bool:
    """Whether the checkpoint is the empty one a rebuild from the output (``output_parts``) left
    when killed before it recorded its parts: one shard holding nothing (no row, no retry
    begun, not complete), replacing no file, beside an output its job merged (with
    ``fingerprint``: that job's). It stands for the removed checkpoint it was to replace: the
    output is the job's finished one, which runs, ``status`` and ``merge`` take as it was."""
    try:
        manifest = read_manifest(Path(directory))
    except CheckpointError:
        return False  # damaged: said where it is read
    if output_path is None or manifest is None or manifest.get("num_shards") != 1:
        return False
    if manifest.get("replaces") is not None or (Path(directory) / UNMERGED).exists():
        return False  # an --overwrite run, or a retry, that recorded no row yet
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        return False
    shard_dir = Path(directory) / shard_name(0, 1)
    if read_progress(shard_dir)[0] or any((shard_dir / f).exists() for f in (COMPLETE, RETRYING)):
        return False
    return merged_output(Path(output_path), manifest.get("fingerprint"))


def _refuse_foreign_output(output_path: Path, manifest: dict) -> None:
    if (
        output_path.exists()
        and not merged_output(output_path, manifest.get("fingerprint"))
        and not replaces_output(manifest, output_path)  # the old output of an --overwrite run
    ):
        raise CheckpointError(
            f"{output_path} already exists and is not this job's output (not a file that this "
            "job's checkpoint merged), so merging will not replace it; move it away or delete "
            "it, then merge again"
        )


def parts_digest(directory: Path, n: int) -> str:
    """SHA-256 of every shard's recorded parts (names and contents' hashes): a merged output
    records it, so that a change of the parts after the merge (``drop_errors``) shows."""
    digest = hashlib.sha256()
    for k in range(n):
        for record in read_progress(Path(directory) / shard_name(k, n))[0]:
            digest.update(f"{shard_name(k, n)}/{record.part}:{record.sha256}\n".encode())
    return digest.hexdigest()


def output_is_current(directory: Path, output_path: Path) -> bool:
    """Whether the merged output at ``output_path`` holds the checkpoint's parts as they are
    now: False once a retry changed them (``unmerged.json``, until the next merge; the
    output is merged again when the retry ends, or by the next run or merge if that one
    stopped first), or when its recorded digest is not theirs; False as well for a file the
    checkpoint did not merge (another job's, as the old output an --overwrite run replaces when it
    merges). An output of an older version, which recorded no digest, is otherwise current."""
    if (Path(directory) / UNMERGED).exists():
        return False
    metadata = merged_metadata(Path(output_path))
    manifest = read_manifest(Path(directory))
    if manifest is None:
        return True
    if metadata is None or metadata.get("fingerprint") != manifest.get("fingerprint"):
        return False
    if "parts" not in metadata:
        return True
    return metadata["parts"] == parts_digest(directory, manifest["num_shards"])


def _atomic_parquet(
    path: Path, schema: pa.Schema, parts: list[_Part], total: int, kept: _Kept, rows_per_group: int
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path)  # an earlier merge killed midway
    tmp = temp_path_for(path)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            _write_in_order(parts, total, schema.remove_metadata(), kept, writer, rows_per_group)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _scan_errors(directory: Path, k: int, n: int) -> int:
    records, _ = read_progress(directory / shard_name(k, n))
    return sum(r.errors for r in records)


def shard_errors(directory: Path) -> list[int]:
    """Error records in each shard of the checkpoint, as its progress logs record them
    (cheap: no part is read); none without a manifest."""
    manifest = read_manifest(Path(directory))
    if manifest is None:
        return []
    n = manifest["num_shards"]
    return [_scan_errors(Path(directory), k, n) for k in range(n)]


# --- status ------------------------------------------------------------------------------------


def _session_rate(records: list[PartRecord]) -> float | None:
    """Rows/s of the latest run, from its progress records."""
    if not records:
        return None
    start = records[-1].session_start
    rows = sum(r.rows for r in records if r.session_start == start)
    elapsed = records[-1].time - start
    return rows / elapsed if elapsed > 0 else None


def _shard_status(directory: Path, k: int, n: int, total: int | None) -> dict[str, Any]:
    name = shard_name(k, n)
    records, _ = read_progress(directory / name)
    done = read_json(directory / name / COMPLETE)
    if total is None and done is not None:
        total = done.get("total_rows")
    rows_total = shard_rows(total, k, n) if isinstance(total, int) else None
    rows = sum(r.rows for r in records)
    running = is_locked(directory / f"{name}.lock")
    rate = _session_rate(records) if running else None
    eta = (rows_total - rows) / rate if rate and rows_total is not None else None
    return {
        "shard": k,
        "name": name,
        "started": bool(records) or running,
        "rows_done": rows,
        "rows_total": rows_total,
        "errors": sum(r.errors for r in records),
        "parts": len(records),
        "running": running,
        "lock": read_lock_info(directory / f"{name}.lock") if running else None,
        "complete": done is not None,
        # rows whose error records a retry took back, until the shard is complete again
        "retrying": len(retried_rows(directory / name)) if done is None else 0,
        "rows_per_second": rate,
        "eta_seconds": eta,
        "last_update": records[-1].time if records else None,
    }


def merged_output(path: Path, fingerprint: str | None = None) -> bool:
    """Whether ``path`` is a Parquet file jobrunner merged (it carries jobrunner's metadata);
    with ``fingerprint``, merged by the job of that fingerprint."""
    metadata = merged_metadata(path)
    if metadata is None:
        return False
    return fingerprint is None or metadata.get("fingerprint") == fingerprint


def _change_since(recorded: dict) -> str | None:
    try:
        return input_change(recorded)
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"


def status(directory: Path, output_path: Path | None = None) -> dict[str, Any]:
    """Progress of a job for ``jobrunner status``; reads only, never locks or cleans.

    Returns:
        ``exists``, ``num_shards``, ``total_rows``, ``rows_done``, ``errors``, ``running``,
        ``complete``, ``rows_per_second``, ``eta_seconds``, ``output_exists``,
        ``output_current`` (the output holds the parts as they are now),
        ``output_replaced_by_merge`` (the file at the output is the old one an --overwrite run
        found there, which the job's merge replaces), ``retrying``
        (rows a retry took back from error records, while the shard is not complete again),
        ``started_with_overwrite``, ``input_changed`` (what changed in the input file since
        the job started, in words, or None) and ``shards`` (one dict per shard with the same
        fields plus ``lock`` info when running). Without a checkpoint, ``complete`` says
        whether the output is a file jobrunner merged.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if stopped_rebuild(directory, output_path):  # the removed checkpoint it was to replace
        manifest = None
    result: dict[str, Any] = {
        "directory": str(directory),
        "exists": manifest is not None,
        "output": str(output_path) if output_path is not None else None,
        "output_exists": output_path is not None and Path(output_path).exists(),
    }
    if manifest is None:
        # only the output is left: complete if it is a file that jobrunner merged
        merged = result["output_exists"] and merged_output(Path(output_path))
        fields = (merged_metadata(Path(output_path)) or {}) if merged else {}
        recorded = (fields.get("fingerprint_fields") or {}).get("input")
        changed = _change_since(recorded) if isinstance(recorded, dict) else None
        return {
            **result,
            "shards": [],
            "complete": merged,
            "running": False,
            "input_changed": changed,
        }
    n, total = manifest["num_shards"], manifest.get("total_rows")
    shards = [_shard_status(directory, k, n, total) for k in range(n)]
    rates = [s["rows_per_second"] for s in shards if s["rows_per_second"]]
    etas = [s["eta_seconds"] for s in shards if s["eta_seconds"] is not None]
    fingerprint = manifest.get("fingerprint")
    ours = result["output_exists"] and merged_output(Path(output_path), fingerprint)
    # the file an --overwrite run found there, kept until the job's merge replaces it
    replaced = bool(result["output_exists"] and not ours)
    replaced = replaced and replaces_output(manifest, Path(output_path))
    recorded = (manifest.get("fingerprint_fields") or {}).get("input")
    # a run now is refused (status cannot tell apart other changes: flags)
    changed = input_changed(directory)  # while a run of it ran
    if changed is None and isinstance(recorded, dict):
        changed = _change_since(recorded)
    return {
        **result,
        "output_is_this_jobs": ours,
        "output_replaced_by_merge": replaced,
        # merged from the parts as they are (a retry that stopped before its merge: not)
        "output_current": bool(ours) and output_is_current(directory, Path(output_path)),
        "input_changed": changed,
        "started_with_overwrite": bool((manifest.get("spec") or {}).get("overwrite")),
        "fingerprint": manifest.get("fingerprint"),
        "num_shards": n,
        "total_rows": total,
        "rows_done": sum(s["rows_done"] for s in shards),
        "errors": sum(s["errors"] for s in shards),
        "retrying": sum(s["retrying"] for s in shards),
        "running": any(s["running"] for s in shards),
        "complete": all(s["complete"] for s in shards),
        "rows_per_second": sum(rates) if rates else None,
        "eta_seconds": max(etas) if etas else None,
        "shards": shards,
    }
