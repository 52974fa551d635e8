"""Readers: a dataset file in, ``Row`` objects out, one at a time; knows nothing of the model.

- **Streaming.** JSONL is read line by line, Parquet record batch by record batch (only the
  columns the job uses), so memory does not grow with the number of rows.
- **Indices.** ``Row.index`` is the 0-based position of the row in the input. Blank JSONL lines
  (only whitespace) are skipped and get no index; every other line gets one, invalid or not, so
  every input row appears exactly once downstream. ``count_rows`` counts the same way.
- **Bad rows are data, not exceptions.** Invalid JSON, a non-object line, wrong value types, a
  missing template field, text that is not valid Unicode (a lone surrogate such as JSON's
  ``"\\ud800"``, in the id, prompt, template fields or kept columns), a Parquet value Python cannot
  hold (a timestamp past year 9999) in a column the row is made from (not a kept column: those
  stay Arrow values) or an image path outside ``image_root`` give a ``Row`` with
  ``error`` set. Configuration problems found before the first row (``check_input``: missing
  file or column, a Parquet limit column that does not hold numbers, JSONL that is not UTF-8)
  raise ``ReaderConfigError``; a Parquet file that is damaged partway (a corrupt data page, or
  one whose checksum does not match)
  raises ``InputReadError`` when the reader gets there, after yielding every row before the
  damage.
- **Kept columns** (``keep_columns``) land in ``Row.extra``. From JSONL they are the values
  ``json.loads`` gave; from Parquet they are Arrow scalars of the types ``kept_column_types``
  names (the input's, a dictionary column decoded to its values), never converted to Python,
  so the writer copies them exactly (nanoseconds, decimals, unsigned and nested types).
- **Images** are referenced, not decoded: a path (relative paths resolve against the dataset
  file's folder; absolute paths are kept), raw bytes, or the Hugging Face ``datasets`` struct
  ``{bytes, path}`` (bytes win when present; other fields of the struct are passed over).
  ``image_size`` reads only the header;
  ``load_image`` decodes. Both raise ``ImageError`` with a message fit for the output's ``error``
  column and check the pixel limit from the header *before* decoding. EXIF orientation is not
  applied and the mode is left as stored (``hd_transform`` converts to RGB), matching the Hugging
  Face Phi-3-V processor, which the model was trained with.
"""

from __future__ import annotations

import dataclasses
import decimal
import errno
import hashlib
import io
import json
import math
import os
import re
import stat
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from jobrunner.spec import INPUT_SUFFIXES, JobSpec, template_fields

if TYPE_CHECKING:
    import pyarrow as pa

_PARQUET_BATCH_ROWS = 256


class ReaderConfigError(ValueError):
    """The input cannot be read as configured (missing file, missing column): nothing was run."""


class InputReadError(Exception):
    """The input became unreadable partway (a damaged Parquet page); the rows before it were
    yielded. The message names the file and the first row that could not be read."""


class ImageError(Exception):
    """An image that cannot be used; the message says which image and what is wrong."""


class OverPixelLimit(ImageError):
    """An image refused for its pixel count (``--max-image-pixels``, part of the job)."""


class StorageError(ImageError):
    """An image that could not be read for a reason of the storage rather than of the file: an
    I/O error, a network share or FUSE mount that went away. The same read may work once the
    storage is back. (A missing file is the row's: a folder deleted on purpose or a wrong path
    would otherwise stop every run of the job.)"""


# errno values of a read that failed in the storage (disk, network share, FUSE mount)
_STORAGE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO",
        "ESTALE",
        "ENOTCONN",
        "ETIMEDOUT",
        "ENETDOWN",
        "ENETUNREACH",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "ECONNRESET",
        "ECONNABORTED",
        "ENODEV",
        "ENOMEDIUM",
        "EREMOTEIO",
    )  # fmt: skip
    if hasattr(errno, name)
)


def _cannot_read(path: str, exc: OSError) -> ImageError:
    kind = StorageError if exc.errno in _STORAGE_ERRNOS else ImageError
    return kind(f"cannot read image file {path}: {exc.strerror or exc}")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where a row's image is: a file ``path``, or in-memory ``data`` (``path`` is then a label)."""

    path: str | None = None
    data: bytes | None = None

    def describe(self) -> str:
        if self.data is None:
            return str(self.path)
        label = f" from {self.path}" if self.path else ""
        return f"<{len(self.data)} image bytes{label}>"


@dataclasses.dataclass(slots=True)
class Row:
    """One input row. ``error`` set means the row is an error record (its other fields may be
    partial); ``extra`` holds the ``keep_columns`` values (``None`` where absent): Arrow
    scalars for Parquet input, JSON values for JSONL (see the module docstring)."""

    index: int
    id: str
    image: ImageRef | None
    prompt: str | None
    extra: dict[str, Any]
    error: str | None = None
    max_tokens: int | None = None  # the row's own limit (``max_tokens_column``); None: the job's
    limit_given: bool = False  # the row had a value in ``max_tokens_column``, valid or not
    # of the id column and ``keep_columns``, those the row had a value in (for the warnings
    # on misspelt names: a JSONL row may leave any of them out)
    columns_given: frozenset[str] = frozenset()
    # the image column is there but null: a Parquet table's missing image (a JSONL row says it
    # has none by leaving the column out)
    image_null: bool = False


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """What the reader needs from the job spec."""

    id_column: str = "id"
    image_column: str = "image"
    prompt_column: str = "prompt"
    prompt_template: str | None = None
    keep_columns: tuple[str, ...] = ()
    image_root: Path | None = None
    max_tokens_column: str | None = None
    max_tokens: int = 256  # the job's limit: the most a row's own may be

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ReadOptions:
        return cls(
            id_column=spec.id_column,
            image_column=spec.image_column,
            prompt_column=spec.prompt_column,
            prompt_template=spec.prompt,
            keep_columns=spec.keep_columns,
            image_root=spec.image_root,
            max_tokens_column=spec.max_tokens_column,
            max_tokens=spec.max_tokens,
        )

    @property
    def template_fields(self) -> tuple[str, ...]:
        return () if self.prompt_template is None else template_fields(self.prompt_template)


_DEFAULT_OPTIONS = ReadOptions()


# ---------------------------------------------------------------------------------------------
# Up-front checks


def check_input(path: str | Path, options: ReadOptions | None = None) -> None:
    """Fail before any work if the input cannot be read as configured.

    JSONL rows may each carry different keys, so for JSONL only the file itself is checked.
    For Parquet the schema is: the prompt column must exist unless a template is given; template
    fields and ``keep_columns`` must exist; the id and image columns may be absent only under
    their default names (rows are then numbered by index / text-only), and not where a column
    differs from that name only in case (``Image``); no column the job reads may repeat.

    Raises:
        ReaderConfigError: with a message that names the file or column and the fix.
    """
    options = options or _DEFAULT_OPTIONS
    path = Path(path)
    if not path.is_file():
        raise ReaderConfigError(f"input file not found: {path}")
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise ReaderConfigError(f"unsupported input {path}: use a .jsonl or .parquet file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ReaderConfigError(f"cannot read input {path}: {exc.strerror}") from None
    if path.suffix.lower() == ".parquet":
        missing = _missing_parquet_columns(_parquet_schema(path), options)
        if missing:
            raise ReaderConfigError(f"{path}: " + "; ".join(missing))
    elif encoding := _not_utf8(path):
        raise ReaderConfigError(
            f"{path} is not UTF-8 text (it looks like {encoding}); JSONL must be UTF-8: convert "
            f"it, e.g. iconv -f {encoding} -t UTF-8 IN > OUT (or save it as UTF-8)"
        )


_WIDE_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def _not_utf8(path: Path) -> str | None:
    """ "UTF-16" or "UTF-32" when the file starts with their byte-order mark or its text is NUL
    interleaved (a quarter of the first 4 KiB or more is NUL bytes), else None.

    Read as UTF-8 such a file would split into wrong lines (each an invalid JSON row); JSON text
    in UTF-8 never holds a raw NUL, so a single NUL-broken line stays an error row only.
    """
    with path.open("rb") as fh:
        head = fh.read(4096)
    for bom, encoding in _WIDE_BOMS:
        if head.startswith(bom):
            return encoding
    nuls = head.count(0)
    if head and nuls * 4 >= len(head):
        return "UTF-32" if nuls * 4 >= len(head) * 3 else "UTF-16"
    return None


def _parquet_schema(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).schema_arrow
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad footer
        raise ReaderConfigError(f"{path} is not a readable Parquet file: {exc}") from None


def _missing_parquet_columns(schema, options: ReadOptions) -> list[str]:
    names = list(schema.names)
    have = set(names)
    if repeated := _repeated_columns(names, options):
        return repeated  # the checks below would look at one of them only
    types = dict(zip(names, schema.types, strict=True))
    problems = []
    for flag, column, default in (
        ("--id-column", options.id_column, _DEFAULT_OPTIONS.id_column),
        ("--image-column", options.image_column, _DEFAULT_OPTIONS.image_column),
    ):
        twin = _case_twin(names, column)
        if column not in have and column != default:
            problems.append(f"no column '{column}' (from {flag}); columns are {names}")
        elif column not in have and twin:  # 'Image': every row would run without its image
            problems.append(
                f"no column '{column}', but there is '{twin}' (column names are case-sensitive); "
                f"give {flag} '{twin}', or rename the column"
            )
    problems += _wrong_column_types(types, options)
    if options.prompt_template is None and options.prompt_column not in have:
        twin = _case_twin(names, options.prompt_column)
        hint = f" (there is '{twin}': column names are case-sensitive)" if twin else ""
        problems.append(
            f"no prompt column '{options.prompt_column}'{hint} and no --prompt template; "
            "set --prompt-column or give --prompt"
        )
    for field in options.template_fields:
        if field not in have:
            problems.append(f"--prompt template field '{{{field}}}' is not a column ({names})")
    for column in options.keep_columns:
        if column not in have:
            problems.append(f"--keep-columns '{column}' is not a column ({names})")
    column = options.max_tokens_column
    if column is not None and column not in have:
        problems.append(f"--max-tokens-column '{column}' is not a column ({names})")
    elif column is not None and not _numeric(types[column]):
        problems.append(
            f"--max-tokens-column '{column}' holds {types[column]}, not numbers; name a column "
            "of whole numbers"
        )
    return problems


def _case_twin(names: Sequence[str], column: str) -> str | None:
    """The column whose name is ``column`` but for case (``Image`` for ``image``), if any."""
    if column in names:
        return None
    return next((name for name in names if name.casefold() == column.casefold()), None)


def _repeated_columns(names: Sequence[str], options: ReadOptions) -> list[str]:
    """The columns the job reads that the file holds more than once (pyarrow writes such a
    file; pandas and SQL engines do not): which one a name means is anyone's guess."""
    used = [*_row_columns(options), *options.keep_columns]
    return [
        f"column '{name}' appears {names.count(name)} times; rename or drop all but one"
        for name in dict.fromkeys(used)
        if names.count(name) > 1
    ]


def _is_view(arrow_type, kind: str) -> bool:
    """Whether ``arrow_type`` is Arrow's ``string_view`` or ``binary_view`` (``kind``); False
    under a pyarrow without view types."""
    import pyarrow.types as pt

    return getattr(pt, f"is_{kind}_view", lambda _: False)(arrow_type)


def _wrong_column_types(types: Mapping[str, Any], options: ReadOptions) -> list[str]:
    """The id, image and prompt columns of a type no row could use: refused before the run,
    since every row would otherwise become an error record that a re-run skips."""
    import pyarrow.types as pt

    def text(t) -> bool:
        t = t.value_type if pt.is_dictionary(t) else t
        return pt.is_string(t) or pt.is_large_string(t) or pt.is_null(t) or _is_view(t, "string")

    def binary(t) -> bool:
        t = t.value_type if pt.is_dictionary(t) else t
        plain = pt.is_binary(t) or pt.is_large_binary(t) or pt.is_fixed_size_binary(t)
        return plain or _is_view(t, "binary")

    def image(t) -> bool:
        fields = {field.name for field in t} if pt.is_struct(t) else set()
        return text(t) or binary(t) or bool(fields & {"bytes", "path"})

    def identifier(t) -> bool:
        return text(t) or pt.is_integer(t) or pt.is_floating(t) or pt.is_decimal(t)

    def prompt(t) -> bool:  # a column of nulls only gives no row a prompt
        return text(t) and not pt.is_null(t)

    checks = (
        ("id", "--id-column", options.id_column, identifier, "strings or whole numbers"),
        ("image", "--image-column", options.image_column, image,
         "paths (strings), bytes or {bytes, path} structs"),
    )  # fmt: skip
    if options.prompt_template is None:
        checks += (("prompt", "--prompt-column", options.prompt_column, prompt, "text"),)
    return [
        f"the {what} column '{column}' holds {types[column]}, not {wanted}; name another "
        f"column with {flag}, or convert it"
        for what, flag, column, fits, wanted in checks
        if column in types and not fits(types[column])
    ]


def _numeric(arrow_type) -> bool:
    import pyarrow.types as pt

    return any(
        check(arrow_type) for check in (pt.is_integer, pt.is_floating, pt.is_decimal, pt.is_null)
    )


def kept_column_types(path: str | Path, keep_columns: Sequence[str]) -> dict[str, pa.DataType]:
    """The Arrow type each kept column of a Parquet input has in ``Row.extra`` and the output:
    the input's type, a dictionary's value type (rows are decoded one by one, and which rows
    shared a dictionary should not show in the output). JSONL input: {} (typed from its values
    by `jobrunner.writers`). Call ``check_input`` first."""
    path = Path(path)
    if path.suffix.lower() != ".parquet" or not keep_columns:
        return {}
    schema = _parquet_schema(path)
    return {name: _decoded_type(schema.field(name).type) for name in keep_columns}


def _decoded_type(arrow_type: pa.DataType) -> pa.DataType:
    """A kept column's type in the output: a dictionary's value type, and a string or binary
    view as a plain string or binary (which Arrow can take rows of and write in parts)."""
    import pyarrow as pa
    import pyarrow.types as pt

    if pt.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if _is_view(arrow_type, "string"):
        return pa.string()
    if _is_view(arrow_type, "binary"):
        return pa.binary()
    if pt.is_struct(arrow_type):
        return pa.struct([f.with_type(_view_free(f.type)) for f in arrow_type])
    if pt.is_map(arrow_type):
        key, item = arrow_type.key_field, arrow_type.item_field
        return pa.map_(
            key.with_type(_view_free(key.type)),
            item.with_type(_view_free(item.type)),
            keys_sorted=arrow_type.keys_sorted,
        )
    for is_list, make in ((pt.is_list, pa.list_), (pt.is_large_list, pa.large_list)):
        if is_list(arrow_type):
            return make(arrow_type.value_field.with_type(_view_free(arrow_type.value_type)))
    if pt.is_fixed_size_list(arrow_type):
        field = arrow_type.value_field.with_type(_view_free(arrow_type.value_type))
        return pa.list_(field, arrow_type.list_size)
    return arrow_type


def _view_free(arrow_type: pa.DataType) -> pa.DataType:
    """``arrow_type`` with string and binary views inside it made plain (a dictionary inside
    a nested type is kept: Arrow takes rows of it)."""
    import pyarrow.types as pt

    return arrow_type if pt.is_dictionary(arrow_type) else _decoded_type(arrow_type)


def count_rows(path: str | Path) -> int:
    """Rows in the input, counted like ``iter_rows`` indexes them (Parquet: from metadata)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


# ---------------------------------------------------------------------------------------------
# Rows


def iter_rows(
    path: str | Path,
    options: ReadOptions | None = None,
    wanted: Callable[[int], bool] | None = None,
) -> Iterator[Row]:
    """Stream the rows of a ``.jsonl`` or ``.parquet`` file, in input order.

    Call ``check_input`` first: configuration problems found here surface as exceptions from
    pyarrow or ``open``, while every problem with a single row becomes ``Row.error``. With
    ``wanted``, only the rows whose index it accepts (a shard's) are built and yielded; the
    others keep their place in the numbering.
    """
    options = options or _DEFAULT_OPTIONS
    path = Path(path)
    base_dir = path.absolute().parent
    if path.suffix.lower() == ".parquet":
        records = _parquet_records(path, options)
    else:
        records = _jsonl_records(path)
    for index, (record, problem) in enumerate(records):
        if wanted is not None and not wanted(index):
            continue  # another shard's: building its row (ids, paths, prompt) is its work
        if problem is None:
            yield _checked_row(index, record, options, base_dir)
        elif record:  # readable apart from some values (set to None): say what else is wrong
            row = _checked_row(index, record, options, base_dir)
            row.error = "; ".join(filter(None, [problem, row.error]))
            yield row
        else:
            empty = dict.fromkeys(options.keep_columns)
            yield Row(index, str(index), None, None, empty, problem)


def _jsonl_records(path: Path) -> Iterator[tuple[Mapping[str, Any], str | None]]:
    with path.open("rb") as fh:
        for line_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
                yield {}, f"invalid JSON on line {line_number}: {exc}"
                continue
            if not isinstance(record, dict):
                kind = type(record).__name__
                yield {}, f"line {line_number} is a JSON {kind}, expected an object {{...}}"
                continue
            if _SURROGATE_ESCAPE.search(line):
                record = _MaySurrogate(record)
            yield record, None


# Only a \u escape gives a JSON string a lone surrogate (UTF-8 bytes cannot encode one, and
# Arrow strings are valid UTF-8), so only such lines' kept values are searched for one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _MaySurrogate(dict):
    """A JSONL record whose line holds a surrogate escape."""


class _ParquetRecord(dict):
    """A Parquet row: Python values of the columns that make the row (id, image, prompt,
    template fields, limit), and ``kept``, the kept columns as Arrow scalars."""

    def __init__(self, values: Mapping[str, Any], kept: dict[str, Any]) -> None:
        super().__init__(values)
        self.kept = kept


def _parquet_records(path: Path, options: ReadOptions) -> Iterator[tuple[Mapping, str | None]]:
    """Records row group by row group, so a damaged one is named (``InputReadError``)."""
    import pyarrow.parquet as pq

    # a page whose checksum (Spark's, or pyarrow's write_page_checksum) does not match is
    # damaged: unverified, its bytes would decode to wrong values and the job end as if fine
    parquet = pq.ParquetFile(path, page_checksum_verification=True)
    have = set(parquet.schema_arrow.names)
    python = [name for name in _row_columns(options) if name in have]
    kept = [name for name in options.keep_columns if name in have]
    columns = list(dict.fromkeys([*python, *kept]))
    if not columns:  # nothing to read: one empty record per row
        for group in range(parquet.num_row_groups):
            for _ in range(parquet.metadata.row_group(group).num_rows):
                yield {}, None
        return
    start = 0
    for group in range(parquet.num_row_groups):
        size, read = parquet.metadata.row_group(group).num_rows, 0
        batches = parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=[group], columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except MemoryError:  # pyarrow's included: the machine's trouble, not the file's
                raise
            except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ... for bad pages
                why = " ".join(str(exc).split()).rstrip(".")  # pyarrow's may span lines
                raise InputReadError(
                    f"{path} is damaged: row {start + read} and after (row group {group}, rows "
                    f"{start}-{start + size - 1}) cannot be read ({why})"
                ) from None
            if batch is None:
                break
            read += batch.num_rows
            yield from _batch_records(batch, python, kept)
        start += size


def _row_columns(options: ReadOptions) -> list[str]:
    """The columns a row's own fields are made from (read as Python values), in order."""
    prompt_column = [options.prompt_column] if options.prompt_template is None else []
    wanted = [
        options.id_column,
        options.image_column,
        *prompt_column,
        *options.template_fields,
        *filter(None, [options.max_tokens_column]),
    ]
    return list(dict.fromkeys(wanted))


def _batch_records(
    batch, python: list[str], kept: list[str]
) -> Iterator[tuple[_ParquetRecord, str | None]]:
    """Records of a record batch: ``python`` columns as Python values (``_python_records``),
    ``kept`` columns as Arrow scalars. A kept column needs no Python value, so a value Python
    cannot hold there is copied as it is instead of making its row an error."""

    arrays = {name: _decoded(batch.column(name)) for name in kept}
    records = _python_records(batch.select(python))
    for i, (values, problem) in enumerate(records):
        yield (
            _ParquetRecord(values, {name: _own(array, i) for name, array in arrays.items()}),
            problem,
        )


def _decoded(array):
    """A kept column as ``_decoded_type`` gives it."""
    import pyarrow.types as pt

    if pt.is_dictionary(array.type):
        array = array.dictionary_decode()
    wanted = _decoded_type(array.type)
    return array if wanted == array.type else array.cast(wanted)


def _own(array, i: int):
    """Row ``i`` of ``array`` as a scalar holding its own copy of the value. A scalar of a
    string, binary or nested column refers to the whole record batch's buffers, and a shard
    that keeps 1 row in N would hold N times its rows' data."""
    import pyarrow.types as pt

    if pt.is_primitive(array.type) or pt.is_decimal(array.type):  # the scalar holds its value
        return array[i]
    return array.take([i])[0]


def _python_records(batch) -> Iterator[tuple[dict[str, Any], str | None]]:
    """A record batch as dicts; a value Python cannot hold (a timestamp past year 9999, ...)
    becomes None, with a problem for its row, instead of failing the batch."""
    try:
        records = batch.to_pylist()
    except Exception:  # noqa: BLE001 - convert value by value below to find the bad ones
        pass
    else:
        yield from ((record, None) for record in records)
        return
    for i in range(batch.num_rows):
        record, problems = {}, []
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            try:
                record[name] = column[i].as_py()
            except Exception as exc:  # noqa: BLE001 - OverflowError, ValueError, ...
                record[name] = None
                problems.append(f"column '{name}' holds a value Python cannot represent: {exc}")
        yield record, "; ".join(problems) or None


def unforeseen(exc: BaseException) -> str:
    """An error no check foresaw, for a row's error record: its type, message and the line
    that raised it (no traceback is printed for a row's error, and a report needs the place)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        frame = frames[-1]
        where = f" at {Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return f"{type(exc).__name__}: {exc}{where}"


def _checked_row(
    index: int, record: Mapping[str, Any], options: ReadOptions, base_dir: Path
) -> Row:
    """``_make_row``, with a failure that its checks did not foresee as the row's error: an
    exception out of the reader stops the job, and every resume at the same row again."""
    try:
        return _make_row(index, record, options, base_dir)
    except MemoryError:  # the machine's trouble, not the row's
        raise
    except Exception as exc:  # noqa: BLE001 - a value no check foresaw
        try:
            row_id = _row_id(record.get(options.id_column), index, options, [])
        except Exception:  # noqa: BLE001 - the id may be what failed
            row_id = str(index)
        error = f"cannot read this row ({unforeseen(exc)}); a jobrunner bug, please report it"
        return Row(index, row_id, None, None, dict.fromkeys(options.keep_columns), error)


def _make_row(index: int, record: Mapping[str, Any], options: ReadOptions, base_dir: Path) -> Row:
    problems: list[str] = []
    row_id = _row_id(record.get(options.id_column), index, options, problems)
    image = _image_ref(record.get(options.image_column), options, base_dir, problems)
    prompt = _prompt(record, options, problems)
    if isinstance(record, _ParquetRecord):
        extra = {name: record.kept.get(name) for name in options.keep_columns}
    else:
        extra = {name: record.get(name) for name in options.keep_columns}
    if isinstance(record, _MaySurrogate):  # walking every kept value of every row costs
        for name, value in extra.items():
            _check_text(value, f"kept column '{name}'", problems)
    limit = _max_tokens(record, options, problems)
    given = options.max_tokens_column is not None and _has_value(record, options.max_tokens_column)
    named = (options.id_column, *options.keep_columns)
    columns = frozenset(name for name in named if _has_value(record, name))
    error = "; ".join(problems) or None
    null = options.image_column in record and record[options.image_column] is None
    return Row(index, row_id, image, prompt, extra, error, limit, given, columns, null)


def _scalar_has_value(scalar: pa.Scalar) -> bool:
    import pyarrow.types as pt

    if not scalar.is_valid:
        return False
    # NaN counts as no value, as for Python values: pandas writes a float column's nulls so
    return not (pt.is_floating(scalar.type) and math.isnan(scalar.as_py()))


_LIMIT_PROBLEM = "max tokens column"


def _has_value(record: Mapping[str, Any], column: str) -> bool:
    """Whether ``record`` holds a value in ``column`` (not missing, null or NaN)."""
    if isinstance(record, _ParquetRecord) and column in record.kept:
        return _scalar_has_value(record.kept[column])
    value = record.get(column)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _max_tokens(record: Mapping[str, Any], options: ReadOptions, problems: list[str]) -> int | None:
    """The row's own limit on generated tokens, or None (no column, or a missing or null
    value, or NaN, which is how pandas writes a null into a float column): the job's. Whole
    numbers come as integers, or as floats or decimals that hold one."""
    column = options.max_tokens_column
    if column is None:
        return None
    if not _has_value(record, column):
        return None
    value = record[column]
    if isinstance(value, bool):
        whole = False
    elif isinstance(value, int):
        whole = True
    elif isinstance(value, float):
        whole = value.is_integer()  # False for inf
    elif isinstance(value, decimal.Decimal):
        whole = value.is_finite() and value == value.to_integral_value()
    else:
        whole = False
    if not whole:
        problems.append(
            f"{_LIMIT_PROBLEM} '{column}' must be a whole number from 1 to {options.max_tokens}, "
            f"got {_spelt(value)}"
        )
        return None
    value = int(value)
    if value < 1:
        problems.append(f"{_LIMIT_PROBLEM} '{column}' is {value}; a row's limit is at least 1")
        return None
    if value > options.max_tokens:
        problems.append(
            f"{_LIMIT_PROBLEM} '{column}' is {value}, above --max-tokens {options.max_tokens}, the "
            "most a row may ask for; fix the row, or run the job with --max-tokens at least the "
            "column's largest value (a higher --max-tokens is a new job: --overwrite)"
        )
        return None
    return value


def _spelt(value: Any) -> str:
    """``value`` as the input spells it: JSON for JSON's types, the digits of a decimal, else
    its type."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bool, str, int, float)):
        return json.dumps(value)
    return type(value).__name__


def _check_text(value: Any, what: str, problems: list[str]) -> bool:
    """Note a lone surrogate in ``value`` (a string, or strings inside lists and dicts); True
    when there is none. JSON's ``"\\ud800"`` decodes to one; no tokenizer or file takes it."""
    bad = _lone_surrogate(value)
    if bad is None:
        return True
    problems.append(
        f"{what} holds text that is not valid Unicode: a lone surrogate \\u{ord(bad):04x} "
        "(a JSON \\u escape without its pair); fix the text in the input"
    )
    return False


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in ``value`` or in the strings nested in it (any depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return item[exc.start]
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def _row_id(value: Any, index: int, options: ReadOptions, problems: list[str]) -> str:
    if value is None:
        return str(index)
    if isinstance(value, str):
        _check_text(value, f"id column '{options.id_column}'", problems)
        return value  # the writer stores a lone surrogate as its escape, \\udXXX
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (float, decimal.Decimal)):
        if value.is_nan() if isinstance(value, decimal.Decimal) else math.isnan(value):
            return str(index)  # pandas' missing number
        # pandas' integers with gaps (7.0), SQL's decimal(p, 0)
        if isinstance(value, float):
            whole = value.is_integer()
        else:
            whole = value.is_finite() and value == value.to_integral_value()
        if whole:
            return str(int(value))
        problems.append(f"id column '{options.id_column}' must hold whole numbers, got {value}")
        return str(index)
    kind = type(value).__name__
    problems.append(f"id column '{options.id_column}' must be a string or integer, got {kind}")
    return str(index)


def _prompt(record: Mapping[str, Any], options: ReadOptions, problems: list[str]) -> str | None:
    template = options.prompt_template
    if template is None:
        value = record.get(options.prompt_column)
        if isinstance(value, str):
            valid = _check_text(value, f"prompt column '{options.prompt_column}'", problems)
            return value if valid else None
        if value is None:
            problems.append(
                f"no prompt: column '{options.prompt_column}' is missing or null in this row "
                "and no --prompt template was given"
            )
        else:
            kind = type(value).__name__
            problems.append(f"prompt column '{options.prompt_column}' must be a string, got {kind}")
        return None
    for field in options.template_fields:
        if record.get(field) is None:
            state = "missing from" if field not in record else "null in"
            problems.append(f"prompt template field '{field}' is {state} this row")
            return None
    try:
        prompt = template.format_map(record)
    # a numeric format spec on a string value; a number it cannot take (``:c`` past U+10FFFF,
    # ``:.2f`` of an integer too large for a float) raises OverflowError
    except (ValueError, TypeError, OverflowError) as exc:
        problems.append(f"cannot fill the prompt template: {exc}")
        return None
    if _lone_surrogate(prompt) is None:
        return prompt
    bad = [f for f in options.template_fields if _lone_surrogate(record.get(f)) is not None]
    what = f"prompt template field '{bad[0]}'" if bad else "the prompt filled from the template"
    _check_text(prompt, what, problems)
    return None


# ---------------------------------------------------------------------------------------------
# Image references


def _image_ref(
    value: Any, options: ReadOptions, base_dir: Path, problems: list[str]
) -> ImageRef | None:
    column = options.image_column
    if value is None:
        return None  # text-only row
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageRef(data=bytes(value))
    # other fields beside them (an export's width, height, ...) are not the image's, so they
    # are passed over, as ``check_input`` accepts a struct with either field
    if isinstance(value, dict) and (not value or value.keys() & {"bytes", "path"}):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)):
            return ImageRef(path=path if isinstance(path, str) else None, data=bytes(data))
        if data is not None:
            kind = type(data).__name__
            problems.append(f"image column '{column}': struct 'bytes' must be binary, got {kind}")
            return None
        if path is None:
            problems.append(f"image column '{column}': struct has neither 'bytes' nor 'path'")
            return None
        value = path
    if not isinstance(value, str):
        kind = type(value).__name__
        problems.append(
            f"image column '{column}' must be a path string, bytes or a {{bytes, path}} struct, "
            f"got {kind}"
        )
        return None
    return _path_ref(value, options, base_dir, problems)


def _clip(value: str, most: int = 60) -> str:
    """``value`` quoted, cut to ``most`` characters (base64 text can run to megabytes)."""
    return repr(value) if len(value) <= most else f"{value[:most]!r}... ({len(value):,} chars)"


def _path_ref(
    value: str, options: ReadOptions, base_dir: Path, problems: list[str]
) -> ImageRef | None:
    if not value:
        problems.append(f"image column '{options.image_column}' is an empty string")
        return None
    if "://" in value:
        problems.append(f"image {value!r} is a URL; only local files are read (download first)")
        return None
    if value[:5].lower() == "data:":
        problems.append(
            f"image {_clip(value)} is a data: URI; give a file path, or the bytes in a Parquet "
            "binary column"
        )
        return None
    if "\x00" in value:
        problems.append(f"image path {_clip(value)} contains a NUL byte, which no file name has")
        return None
    try:
        os.fsencode(value)  # a JSON "\ud800" escape: no file name holds a lone surrogate
    except UnicodeEncodeError as exc:
        problems.append(
            f"image path {_clip(value)} holds text that is not valid Unicode: a lone surrogate "
            f"\\u{ord(value[exc.start]):04x} (a JSON \\u escape without its pair), which no "
            "file name has; fix the text in the input"
        )
        return None
    too_long = len(value) > 4096  # PATH_MAX; base64 text's "/" leave it short parts
    if too_long or any(len(part) > 255 for part in value.replace(os.sep, "/").split("/")):
        problems.append(  # no file name is that long (base64 text has "/" too, so: any part)
            f"image {_clip(value)} is not a file path: a part of it is longer than any file "
            "name can be (base64 text?); give a file path, or the bytes in a Parquet binary "
            "column"
        )
        return None
    path = os.path.join(base_dir, value)  # an absolute value replaces base_dir
    if options.image_root is None:
        return ImageRef(path=path)
    # Confinement: follow every symlink, then require the real path to be under the real root.
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(options.image_root))
    if not real.is_relative_to(root):
        problems.append(f"image {value!r} resolves to {real}, outside --image-root {root}")
        return None
    return ImageRef(path=str(real))


# ---------------------------------------------------------------------------------------------
# Image decoding (called from worker threads)


def image_size(ref: ImageRef, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header only, without decoding pixels.

    Raises:
        ImageError: missing, empty or unreadable file, not an image, or over ``max_pixels``.
    """
    with _open_source(ref) as fh:
        return _open_header(fh, ref, max_pixels).size


def allow_pixels(max_pixels: int) -> None:
    """Let Pillow open images of up to ``max_pixels``: its own guard is a process-wide limit
    (``Image.MAX_IMAGE_PIXELS``, refusing above twice it: 179M pixels by default) that would
    override a larger --max-image-pixels. Only ever raised, never lowered; the job's limit is
    checked from each image's header instead."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def load_image(ref: ImageRef, max_pixels: int) -> Image.Image:
    """Decode an image fully (first frame, mode as stored, no EXIF rotation).

    The pixel count is checked from the header before decoding; truncated data is an error
    (as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default, False).

    Raises:
        ImageError: everything ``image_size`` raises, plus corrupt or truncated pixel data.
    """
    with _open_source(ref) as fh:
        image = _open_header(fh, ref, max_pixels)
        try:
            image.load()
        except OSError as exc:
            if exc.errno in _STORAGE_ERRNOS:  # the read failed, not the decoder
                raise _cannot_read(ref.describe(), exc) from None
            raise ImageError(f"corrupt or truncated image {ref.describe()}: {exc}") from None
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, ...
            raise ImageError(f"corrupt or truncated image {ref.describe()}: {exc}") from None
    return image


def _open_source(ref: ImageRef) -> IO[bytes]:
    if ref.data is not None:
        if not ref.data:
            raise ImageError(f"image is empty (0 bytes): {ref.describe()}")
        return io.BytesIO(ref.data)
    path = str(ref.path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except OSError as exc:
        raise _cannot_read(path, exc) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"image path is a folder, not a file: {path}")
    if not stat.S_ISREG(info.st_mode):  # a FIFO, a device: reading could block or never end
        raise ImageError(f"image path is not a regular file: {path}")
    if info.st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    try:
        return open(path, "rb")  # the caller closes it
    except OSError as exc:
        raise _cannot_read(path, exc) from None


_PIXELS_FLAG = "--max-image-pixels / max_image_pixels"
# the limit is part of the job: a higher one is a new job, not a retry of these rows
_PIXELS_HINT = "a higher --max-image-pixels is another job (--overwrite runs every row again)"


def _open_header(fh: IO[bytes], ref: ImageRef, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(fh)
    except UnidentifiedImageError:
        raise ImageError(f"not an image (unrecognised format): {ref.describe()}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fired first (a process-wide limit; ``allow_pixels`` raises it)
        raise OverPixelLimit(
            f"image over the pixel limit of {max_pixels:,} ({_PIXELS_FLAG}), refused without "
            f"decoding: {ref.describe()} ({exc}); {_PIXELS_HINT}"
        ) from None
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:  # the read failed, not the header
            raise _cannot_read(ref.describe(), exc) from None
        raise ImageError(f"cannot read image header of {ref.describe()}: {exc}") from None
    except Exception as exc:  # malformed headers raise many kinds of errors
        raise ImageError(f"cannot read image header of {ref.describe()}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise OverPixelLimit(
            f"image is {width}x{height} = {width * height:,} pixels, over the pixel limit of "
            f"{max_pixels:,} ({_PIXELS_FLAG}); refused without decoding: {ref.describe()}; "
            f"{_PIXELS_HINT}"
        )
    return image


# ---------------------------------------------------------------------------------------------
# Duplicate ids


class DuplicateIdTracker:
    """Notes ids seen more than once (one set of ids: per-row bookkeeping).

    Duplicates are not errors — every row is still written — but the runner warns once.
    The set holds a 16-byte digest of each id, not the id: the runner keeps it for every row
    of the shard, and ids can be long (paths, URLs, whole texts), so held as they are they
    took memory in proportion to the input's ids (200,000 ids of 2 kB: 400 MB more).
    """

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.duplicates = 0
        self.first_duplicate: str | None = None

    def add(self, row_id: str) -> bool:
        """Record ``row_id``; True when it was seen before."""
        key = hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if key in self._seen:
            self.duplicates += 1
            if self.first_duplicate is None:
                self.first_duplicate = row_id
            return True
        self._seen.add(key)
        return False

    def warning(self) -> str | None:
        """One warning line for the whole job, or None when every id was unique."""
        if not self.duplicates:
            return None
        return (
            f"{self.duplicates} row(s) repeat an id already seen (first: {self.first_duplicate!r});"
            " each row is still written, so the output has repeated ids"
        )
