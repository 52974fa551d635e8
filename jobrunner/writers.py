"""Result records → Parquet tables, buffered part writes, atomic JSON files.

Takes plain result records (dicts) and turns them into Arrow tables with the output schema of
DESIGN.md; knows nothing of the model or of how rows were read. Durability of part files is the
checkpoint store's job (`jobrunner.checkpoint`); this module decides *when* to hand a part over.

Output columns, in order: ``id`` (string), ``output`` (string, null on error), ``finish_reason``
(``stop`` | ``length`` | ``error``), ``error`` (string, null on success), ``prompt_tokens`` (int32),
``output_tokens`` (int32), then the kept input columns, then ``row_index`` (int64, the input row
index; kept in the final file because it is the join key back to the input).

Kept columns (``--keep-columns``) reach the output in one of two ways, fixed before the run so
that the final type never depends on where part boundaries fell (a resumed job equals an
uninterrupted one):

- *Typed* (Parquet input): the column keeps the Arrow type of the input file's schema, passed in
  as ``kept_types``. The reader hands over each value as an Arrow scalar and `arrow_kept` copies
  it into the part as it is, never through Python, so decimals keep their precision and scale,
  timestamps their unit, time zone and nanoseconds, and unsigned, narrow and nested types
  (lists, structs, maps) stay what they were. A dictionary-encoded column is decoded to its
  value type (the dictionaries of row groups differ, and the output should not depend on which
  rows shared one). Part metadata lists these columns (``jobrunner.kept_arrow``); the merge
  keeps their type.
- *From JSON values* (JSONL input): part files store each kept value as JSON text (object keys
  in the input's order), together with the set of value kinds seen (``jobrunner.kept_kinds``).
  The merge picks one type per column from the kinds of *all* parts: only bools → bool, only
  ints → int64, ints and/or floats → float64, only strings → string, all null → string;
  anything else (lists, objects, mixed kinds) stays JSON text: each value, a string included,
  as its JSON text (``"a"`` with its quotes), so that every value of the column parses as JSON
  and a string is never confused with a number or a list.

Parts written before kept Parquet columns were typed (no ``jobrunner.kept_arrow``) hold JSON
text and kinds for them too. A job resumed across that change merges as the version that started
it would have: a column that any part holds as JSON text is typed from the kinds of all parts'
values, the typed parts' values written as their JSON text first (`jobrunner.merge`).

Text that is not valid Unicode (a lone surrogate, from a JSON ``"\\ud800"`` escape) cannot be
stored in Parquet: every string written is passed through `storable_text`, which writes such a
character as the six characters ``\\ud800``. The reader makes those rows error records; this only
guarantees that no value can make a part write fail.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import functools
import glob
import hashlib
import importlib.util
import json
import os
import platform
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from jobrunner.checkpoint import CheckpointStore

RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string()),
    pa.field("output", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
)
INDEX_COLUMN = "row_index"
RESERVED_COLUMNS = frozenset([f.name for f in RESULT_FIELDS] + [INDEX_COLUMN])
FINISH_REASONS = frozenset({"stop", "length", "error"})
KINDS_METADATA_KEY = b"jobrunner.kept_kinds"
ARROW_METADATA_KEY = b"jobrunner.kept_arrow"
OUTPUT_METADATA_KEY = b"jobrunner"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# --- schema ------------------------------------------------------------------------------------


def check_keep_columns(keep_columns: Sequence[str]) -> list[str]:
    """Return the kept column names, refusing duplicates and names the output already uses."""
    keep = list(keep_columns)
    clash = sorted(set(keep) & RESERVED_COLUMNS)
    if clash:
        raise ValueError(
            f"kept columns {clash} clash with output columns; rename them in the input"
        )
    if len(set(keep)) != len(keep):
        raise ValueError(f"kept columns are listed more than once: {keep}")
    return keep


def results_schema(
    keep_columns: Sequence[str] = (), kept_types: Mapping[str, pa.DataType] | None = None
) -> pa.Schema:
    """Final output schema: result fields, kept columns (string unless typed), ``row_index``."""
    kept_types = kept_types or {}
    kept = [pa.field(c, kept_types.get(c, pa.string())) for c in check_keep_columns(keep_columns)]
    return pa.schema([*RESULT_FIELDS, *kept, pa.field(INDEX_COLUMN, pa.int64())])


def part_schema(
    keep_columns: Sequence[str] = (), kept_types: Mapping[str, pa.DataType] | None = None
) -> pa.Schema:
    """Schema of a part file: typed kept columns have their type, the others hold JSON text
    (see module docstring)."""
    return results_schema(keep_columns, kept_types)


# --- kept values -------------------------------------------------------------------------------


def value_kind(value: Any) -> str:
    """Kind of a kept value: null, bool, int, float, str or other."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64_MIN <= value <= _INT64_MAX else "other"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "other"


def kept_type(kinds: Iterable[str]) -> pa.DataType | None:
    """Final Arrow type for a kept column given every kind seen; None means 'keep JSON text'."""
    kinds = set(kinds) - {"null"}
    if not kinds or kinds == {"str"}:
        return pa.string()
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds <= {"int", "float"}:
        return pa.float64()
    return None


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


def _plain(value: Any) -> Any:
    """Numpy scalars → Python scalars, so their kind is the kind of the number they hold."""
    if (
        hasattr(value, "item")
        and type(value).__module__ == "numpy"
        and getattr(value, "ndim", 1) == 0
    ):
        return value.item()
    return value


def encode_kept(value: Any, sort_keys: bool = False) -> str | None:
    """JSON text of a kept value (None stays None); object keys keep their order unless
    ``sort_keys`` (as parts stored them before 2026-11-24)."""
    if value is None:
        return None
    return json.dumps(value, default=_json_default, ensure_ascii=False, sort_keys=sort_keys)


def decode_kept(texts: pa.Array, kinds: Iterable[str]) -> pa.Array:
    """Turn a part's JSON-text column back into values of the column's final type."""
    target = kept_type(kinds)
    if target is None:
        return texts.cast(pa.string())
    values = [None if t is None else json.loads(t) for t in texts.to_pylist()]
    if target == pa.string():  # the JSON text "\\ud800" decodes to a lone surrogate again
        values = [storable_text(v) for v in values]
    if target == pa.float64():  # Arrow refuses an int past 2**53 as a double: its nearest one
        values = [None if v is None else float(v) for v in values]
    return pa.array(values, type=target)


def kept_json_text(
    values: Sequence[Any], sort_keys: bool = False
) -> tuple[list[str | None], set[str]]:
    """Kept values as parts store an untyped column: each value's JSON text (``encode_kept``),
    and their kinds."""
    plain = [_plain(value) for value in values]
    texts = [storable_text(encode_kept(value, sort_keys)) for value in plain]
    return texts, {value_kind(value) for value in plain}


def arrow_kept(values: Sequence[Any], arrow_type: pa.DataType) -> pa.Array:
    """A typed kept column: the reader's Arrow scalars copied as they are, None as null.

    Copying scalars (not ``as_py`` values) is what keeps nanoseconds, decimals past a float's
    precision and nested types exact. A value that is no scalar (a caller's Python value) is
    converted by pyarrow to ``arrow_type``.
    """
    if not values:
        return pa.array([], arrow_type)
    # pa.repeat builds from any scalar, where pa.array fails on some (a null list scalar)
    return pa.concat_arrays([pa.repeat(_kept_scalar(v, arrow_type), 1) for v in values])


def _kept_scalar(value: Any, arrow_type: pa.DataType) -> pa.Scalar:
    if not isinstance(value, pa.Scalar):
        return pa.scalar(value, arrow_type)
    if value.type != arrow_type:  # a dictionary value not yet decoded, say
        return value.cast(arrow_type)
    return value


# --- records → tables --------------------------------------------------------------------------


def _check_record(record: Mapping[str, Any]) -> None:
    reason = record.get("finish_reason")
    if reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {sorted(FINISH_REASONS)}, got {reason!r}")
    if reason == "error":
        if record.get("output") is not None or not record.get("error"):
            raise ValueError("an error record needs error text and output=None")
    elif record.get("error") is not None:
        raise ValueError(f"a {reason!r} record must have error=None")


def _record_index(record: Mapping[str, Any]) -> int:
    index = record.get("index", record.get(INDEX_COLUMN))
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"record needs a non-negative int 'index', got {index!r}")
    return index


def records_to_table(
    records: Sequence[Mapping[str, Any]],
    keep_columns: Sequence[str] = (),
    kept_types: Mapping[str, pa.DataType] | None = None,
) -> pa.Table:
    """Build a part table from result records.

    Args:
        records: dicts with ``index`` (input row index), ``id``, ``output``, ``finish_reason``,
            ``error``, ``prompt_tokens``, ``output_tokens``; kept columns either as top-level keys
            or inside an ``extra`` mapping (missing → null).
        keep_columns: names of the kept input columns.
        kept_types: the Arrow type of each typed kept column (Parquet input: the input's);
            their values are Arrow scalars or None. Other kept columns are stored as JSON text.

    Returns:
        A table with `part_schema(keep_columns, kept_types)`; its metadata lists the typed kept
        columns and the kinds of the others' values.
    """
    keep = check_keep_columns(keep_columns)
    kept_types = {name: kept_types[name] for name in keep if name in (kept_types or {})}
    for record in records:
        _check_record(record)
    columns: dict[str, Any] = {
        "id": [None if r.get("id") is None else storable_text(str(r["id"])) for r in records],
        "output": [storable_text(r.get("output")) for r in records],
        "finish_reason": [r["finish_reason"] for r in records],
        "error": [storable_text(r.get("error")) for r in records],
        "prompt_tokens": [int(r.get("prompt_tokens") or 0) for r in records],
        "output_tokens": [int(r.get("output_tokens") or 0) for r in records],
    }
    metadata = _add_kept_columns(columns, records, keep, kept_types)
    columns[INDEX_COLUMN] = [_record_index(r) for r in records]
    schema = part_schema(keep, kept_types).with_metadata(metadata)
    return pa.table(columns, schema=schema)


def _add_kept_columns(
    columns: dict[str, Any],
    records: Sequence[Mapping[str, Any]],
    keep: list[str],
    kept_types: Mapping[str, pa.DataType],
) -> dict[bytes, bytes]:
    """Add the kept columns to ``columns``, typed or as JSON text; return the part metadata
    that says which is which (typed columns) and what the JSON holds (kinds)."""
    kinds = {}
    for name in keep:
        values = [_kept_value(r, name) for r in records]
        if name in kept_types:
            columns[name] = arrow_kept(values, kept_types[name])
            continue
        columns[name], found = kept_json_text(values)
        kinds[name] = sorted(found)
    metadata = {KINDS_METADATA_KEY: json.dumps(kinds).encode()}
    if kept_types:  # parts of JSONL jobs stay as they were
        metadata[ARROW_METADATA_KEY] = json.dumps(list(kept_types)).encode()
    return metadata


def storable_text(text: str | None) -> str | None:
    """``text`` as valid UTF-8: each lone surrogate becomes its escape, ``\\udXXX``."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _kept_value(record: Mapping[str, Any], name: str) -> Any:
    if name in record:
        return record[name]
    extra = record.get("extra") or {}
    return extra.get(name)


def part_kinds(schema: pa.Schema) -> dict[str, list[str]]:
    """Kinds of kept values recorded in a part file's schema metadata."""
    raw = (schema.metadata or {}).get(KINDS_METADATA_KEY)
    return json.loads(raw) if raw else {}


def part_kept_types(schema: pa.Schema) -> dict[str, pa.DataType]:
    """The typed kept columns of a part file and their types; a part written before kept
    columns were typed has none (its kept columns are JSON text)."""
    raw = (schema.metadata or {}).get(ARROW_METADATA_KEY)
    return {name: schema.field(name).type for name in (json.loads(raw) if raw else [])}


def part_from_output(
    table: pa.Table, keep_columns: Sequence[str], json_kinds: Mapping[str, Sequence[str]]
) -> pa.Table:
    """Rows of a merged output as a part holds them, so that merging them again gives the same
    values and types (``CheckpointStore.import_parts``).

    Args:
        table: output rows (``results_schema``: result fields, kept columns, ``row_index``).
        keep_columns: the kept column names.
        json_kinds: the kinds of the values of each kept column the merge typed from JSON values
            (the output's ``kept_kinds`` metadata); the other kept columns are typed (Parquet
            input) and stay as they are.
    """
    keep = check_keep_columns(keep_columns)
    typed = {name: table.schema.field(name).type for name in keep if name not in json_kinds}
    kinds = {name: sorted(json_kinds[name]) for name in keep if name in json_kinds}
    schema = part_schema(keep, typed)
    columns = []
    for name in schema.names:
        column = table.column(name)
        if name in kinds:
            values = column.to_pylist()
            # a column left as JSON text holds each value's text already
            texts = values if kept_type(kinds[name]) is None else kept_json_text(values)[0]
            column = pa.array(texts, pa.string())
        columns.append(column)
    metadata = {KINDS_METADATA_KEY: json.dumps(kinds).encode()}
    if typed:
        metadata[ARROW_METADATA_KEY] = json.dumps(list(typed)).encode()
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(metadata))


# --- buffered part writer ----------------------------------------------------------------------


class PartWriter:
    """Buffers result records and hands them to the checkpoint store as part files.

    A part is written when `maybe_flush` finds ``every_rows`` records pending or ``every_seconds``
    elapsed since the last flush (either bound may be None), and always on `flush`. Call
    `maybe_flush` between steps of the run and `flush` before exiting, also on SIGINT/SIGTERM.
    ``kept_types``: the typed kept columns (see `records_to_table`).
    """

    def __init__(
        self,
        store: CheckpointStore,
        keep_columns: Sequence[str] = (),
        every_rows: int | None = 1000,
        every_seconds: float | None = 60.0,
        clock: Callable[[], float] = time.monotonic,
        kept_types: Mapping[str, pa.DataType] | None = None,
    ) -> None:
        if every_rows is not None and every_rows < 1:
            raise ValueError(f"every_rows must be >= 1 or None, got {every_rows}")
        if every_seconds is not None and every_seconds < 0:
            raise ValueError(f"every_seconds must be >= 0 or None, got {every_seconds}")
        self.store = store
        self.keep_columns = check_keep_columns(keep_columns)
        self.kept_types = dict(kept_types or {})
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self._clock = clock
        self._pending: list[Mapping[str, Any]] = []
        self._last_flush = clock()
        self.rows_written = 0
        self.errors_written = 0
        self.parts_written = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, record: Mapping[str, Any]) -> None:
        """Buffer one result record (validated now, so a bad record fails at its source)."""
        _check_record(record)
        _record_index(record)
        self._pending.append(record)

    def due(self) -> bool:
        """Whether a checkpoint interval has been reached with records pending."""
        if not self._pending:
            return False
        if self.every_rows is not None and len(self._pending) >= self.every_rows:
            return True
        elapsed = self._clock() - self._last_flush
        return self.every_seconds is not None and elapsed >= self.every_seconds

    def maybe_flush(self) -> bool:
        """Flush if `due`; returns whether a part was written."""
        if not self.due():
            return False
        self.flush()
        return True

    def flush(self) -> int:
        """Write every pending record as one durable part; returns the number of rows written."""
        self._last_flush = self._clock()
        if not self._pending:
            return 0
        table = records_to_table(self._pending, self.keep_columns, self.kept_types)
        self.store.write_part(table)
        rows = len(self._pending)
        self.rows_written += rows
        self.errors_written += sum(r["finish_reason"] == "error" for r in self._pending)
        self.parts_written += 1
        self._pending = []
        return rows


# --- atomic files and metadata -----------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, clean: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    ``clean``: first delete the temps of ``path`` that killed writes left (``remove_orphan_temps``,
    which lists the folder); False where the caller cleans the folder otherwise (a shard's
    parts: its open removes every temp, and listing a folder of thousands of parts for each
    new one made writing parts quadratic).
    """
    path = Path(path)
    if clean:
        remove_orphan_temps(path)
    tmp = temp_path_for(path)
    # O_EXCL with 0o666 (not mkstemp's 0o600) so the final file gets the user's umask.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def temp_path_for(path: Path) -> Path:
    """A unique hidden sibling of ``path`` ending in ``.tmp`` (what crash cleanup looks for),
    naming the host and process that write it."""
    return (
        path.parent
        / f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    )


def remove_orphan_temps(path: Path) -> list[Path]:
    """Delete the temp siblings of ``path`` that processes of this host left when they were
    killed mid-write; return them.

    A temp of another host, or of a process that still runs, may be a write in progress (shards
    of one job can merge from several machines), so it stays.
    """
    prefix, host = f".{path.name}.", socket.gethostname()
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        writer = tmp.name[len(prefix) : -len(".tmp")].rsplit(".", 2)
        if len(writer) != 3 or writer[0] != host or not writer[1].isdigit():
            continue
        if not _process_alive(int(writer[1])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write_bytes(Path(path), text.encode())


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Write ``OUTPUT.summary.json`` atomically (rows ok/error, tokens, timings, ...)."""
    atomic_write_json(Path(path), dict(summary))


def collect_versions() -> dict[str, str | None]:
    """Versions of Python and the packages that shape the output (without importing them)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    names = ("mlx-jobrunner", "mlx", "numpy", "pyarrow", "transformers", "tokenizers", "pillow")
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    versions["platform"] = f"{sys.platform}-{platform.machine()}"
    versions["jobrunner-code"] = code_digest()
    return versions


@functools.cache
def code_digest() -> str:
    """A digest of jobrunner's own source (``jobrunner`` and ``model``): its version number
    stays the same while the code that makes the rows changes."""
    digest = hashlib.sha256()
    for package in ("jobrunner", "model"):
        spec = importlib.util.find_spec(package)
        for root in spec.submodule_search_locations if spec else []:
            for path in sorted(Path(root).rglob("*.py")):
                digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass
class ParquetOutputMetadata:
    """What the final file's ``jobrunner`` metadata key holds (JSON)."""

    spec: dict[str, Any]
    fingerprint: str
    fingerprint_fields: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    model_revision: str | None = None
    versions: dict[str, str | None] = field(default_factory=collect_versions)
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=_json_default)


def read_output_metadata(path: Path) -> dict[str, Any] | None:
    """The ``jobrunner`` metadata of a Parquet file written by `merge`, or None."""
    raw = (pq.read_schema(path).metadata or {}).get(OUTPUT_METADATA_KEY)
    return json.loads(raw) if raw else None


def error_rows(path: Path) -> int:
    """How many rows of the result file ``path`` are error records."""
    reasons = pq.read_table(path, columns=["finish_reason"]).column("finish_reason")
    return pc.sum(pc.equal(reasons, "error")).as_py() or 0  # not a Python string a row


def merged_metadata(path: Path) -> dict[str, Any] | None:
    """``read_output_metadata`` of ``path`` if it is a file that jobrunner merged; None for
    anything else, never an error (a folder, a file that is not Parquet or has no such
    metadata; a FIFO or device is not opened, as reading it could block)."""
    if not Path(path).is_file():
        return None
    try:
        metadata = read_output_metadata(path)
    except Exception:  # not Parquet, unreadable
        return None
    return metadata if isinstance(metadata, dict) else None
