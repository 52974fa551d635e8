"""The job spec: one frozen dataclass built from a TOML job file and/or CLI flags.

Contract: ``load_job_file`` reads the file (relative paths resolved against its folder),
``build_spec`` merges it with the flags (flags that are not ``None`` win) and validates every value
once, up front, raising ``SpecError`` whose message names the field and says how to fix it. Nothing
here reads the dataset or the model.

The **fingerprint** hashes everything that changes the output file: the model identity, the input
file's identity, the prompt template, chat wrapping, column mapping, generation parameters, crops,
dtype, quantization and image limits. It leaves out what only changes speed or bookkeeping
(batch size, token budget, sort window, workers, checkpoint interval, quiet, shard, overwrite,
retrying errors), so
a job resumed with a bigger batch still resumes. With greedy decoding (``temperature == 0``) the
sampling parameters (``top_p``, ``top_k``, ``seed``) cannot change the output and are left out too.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import os
import re
import string
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from jobrunner.writers import INDEX_COLUMN, RESULT_FIELDS

INPUT_SUFFIXES = (".jsonl", ".parquet")
# Output columns every result row has, in file order; kept input columns may not reuse these
# names. Derived from the writer's schema so the two never disagree.
RESERVED_COLUMNS = (*(f.name for f in RESULT_FIELDS), INDEX_COLUMN)
# What a template field may do to its value: the three conversions str.format knows.
_CONVERSIONS = (None, "r", "s", "a")
DTYPES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "auto": None,
}
# Bumped whenever the meaning of the hashed fields changes, so old checkpoints refuse to resume.
FINGERPRINT_VERSION = 1
_SAMPLE_BYTES = 1 << 20
_PATH_FIELDS = ("input", "output", "image_root", "checkpoint_dir")


class SpecError(ValueError):
    """A job spec value that cannot be served. ``fields`` lists the offending field names."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """Everything one captioning job needs; every CLI flag and TOML key is a field.

    Attributes:
        input: dataset, ``.jsonl`` or ``.parquet`` (absolute path).
        model: local model folder or Hugging Face hub id.
        output: result Parquet file; default ``INPUT_STEM.out.parquet`` next to the input.
        prompt: template applied to every row, ``{column}`` fields filled from the row (``{{`` and
            ``}}`` for literal braces); ``None`` = use each row's ``prompt_column``.
        id_column, image_column, prompt_column: input column names (``id``, ``image``, ``prompt``).
        keep_columns: input columns copied to the output unchanged.
        max_tokens: most generated tokens per row (256).
        max_tokens_column: input column holding a row's own limit on generated tokens (a whole
            number from 1 to ``max_tokens``; a missing or null value takes ``max_tokens``);
            ``None``: every row takes ``max_tokens``.
        temperature, top_p, top_k, seed: sampling; ``temperature == 0`` is greedy (0.0, 1.0, 0
            = off, 0). Each row samples from its own seed derived from ``seed`` and its id.
        batch_size: most rows per batch (16).
        max_batch_tokens: most prompt slots per batch, padding counted: rows x longest row;
            ``None``: 16384, and every batch's KV cache kept within memory
            (``model.generate.memory_kv_positions``).
        num_crops: HD-transform crop budget; ``None`` = the model's preprocessor_config.json.
        dtype: ``float16`` | ``bfloat16`` | ``float32``; ``None`` = the checkpoint's own.
        quantize: 4 or 8 to quantize the weights at load; ``None`` = as stored.
        shard: ``(k, n)``: run only rows with ``index % n == k``; ``None`` = every row.
        overwrite: discard an existing checkpoint instead of resuming; the output there is
            replaced when the new job merges.
        retry_errors: run the rows whose saved record is an error again, finished job or not
            (the other rows stay done); ``overwrite`` runs every row again anyway.
        quiet: no progress output (for cron).
        image_root: when set, image paths must resolve (symlinks included) inside this folder.
        checkpoint_every_rows: write a part after this many finished rows (256; 0 = never by rows).
        checkpoint_every_seconds: ... or after this many seconds (60; 0 = never by time). A
            checkpoint is written when either is reached, so a kill loses at most about
            min(256 rows, 60 s) of work on any job size.
        max_image_pixels: refuse images whose header claims more pixels (50,000,000), without
            decoding them.
        sort_window: rows sorted by length together before batching (4096); 1 = input order.
        group_images: keep the rows of one image side by side in each sorted window (True), so
            its features and prompt prefix are reused from small caches; False: a plain length
            sort, less padding when one image's prompts differ much in length.
        workers: preprocessing threads (decode, HD transform, tokenize) (2).
        checkpoint_dir: parts, manifest and lock; ``None`` = ``OUTPUT.parts/``.
        chat: wrap the prompt in the chat template (``<|user|>`` ... ``<|assistant|>``) (True).
    """

    input: Path
    model: str
    output: Path
    prompt: str | None = None
    id_column: str = "id"
    image_column: str = "image"
    prompt_column: str = "prompt"
    keep_columns: tuple[str, ...] = ()
    max_tokens: int = 256
    max_tokens_column: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 16
    max_batch_tokens: int | None = None
    num_crops: int | None = None
    dtype: str | None = None
    quantize: int | None = None
    shard: tuple[int, int] | None = None
    overwrite: bool = False
    retry_errors: bool = False
    quiet: bool = False
    image_root: Path | None = None
    checkpoint_every_rows: int = 256
    checkpoint_every_seconds: float = 60.0
    max_image_pixels: int = 50_000_000
    sort_window: int = 4096
    group_images: bool = True
    workers: int = 2
    checkpoint_dir: Path | None = None
    chat: bool = True

    @property
    def parts_dir(self) -> Path:
        """The checkpoint folder: ``checkpoint_dir`` or ``OUTPUT.parts/`` next to the output."""
        return self.checkpoint_dir or default_parts_dir(self.output)

    def owns_row(self, index: int) -> bool:
        """Whether row ``index`` belongs to this job's shard (a stable partition by index)."""
        return self.shard is None or index % self.shard[1] == self.shard[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (paths as strings, tuples as lists) for metadata and manifests."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Rebuild a spec written by ``to_dict`` (no validation: the input may be gone)."""
        values = dict(data)
        for key in _PATH_FIELDS:
            if values.get(key) is not None:
                values[key] = Path(values[key])
        values["keep_columns"] = tuple(values.get("keep_columns") or ())
        if values.get("shard") is not None:
            values["shard"] = tuple(values["shard"])
        return cls(**values)


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(JobSpec))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(JobSpec)}


def default_output(source: Path) -> Path:
    """The output of a job that names none: ``INPUT_STEM.out.parquet`` next to the input."""
    return source.with_name(source.stem + ".out.parquet")


def default_parts_dir(output: Path) -> Path:
    """The checkpoint folder of a job that names none: ``OUTPUT.parts/`` next to the output."""
    return output.with_name(output.name + ".parts")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# ---------------------------------------------------------------------------------------------
# Job file


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML job file into a dict of field values.

    Keys are the ``JobSpec`` field names (see its docstring for each one), all at the top level.
    ``input``, ``output``, ``image_root`` and ``checkpoint_dir`` are resolved against the job
    file's folder when relative; so is ``model`` when that relative path exists (otherwise it is
    taken as a hub id). ``shard`` may be ``"K/N"`` or ``[K, N]``. A leading UTF-8 byte order
    mark (as some Windows editors save) is skipped.

    Raises:
        SpecError: the file is missing, not UTF-8 or not TOML, sets a key twice, holds a key that
            is not a field or a table, names an environment variable in a path, or names a
            relative model found only in the current folder.
    """
    path = Path(path)
    data = _read_toml(path)
    for key, value in data.items():
        if key not in FIELD_NAMES:
            raise SpecError(
                f"unknown key '{key}' in job file {path}: {_key_fix(key, value)}", (key,)
            )
    _refuse_variables(path, data)
    base = path.parent.absolute()
    for key in _PATH_FIELDS:  # "" stays "", refused by validation, not taken as the folder
        if isinstance(data.get(key), str) and data[key]:
            data[key] = base / Path(data[key]).expanduser()
    model = data.get("model")
    if isinstance(model, str) and model and not Path(model).is_absolute():
        if (base / model).exists():
            data["model"] = str(base / model)
        elif Path(model).exists():  # the loader would take it from the current folder
            raise SpecError(
                f"`model` = {model!r} in job file {path}: there is no {base / model}, but there "
                "is a folder of that name in the current folder; a job file's relative paths "
                "are taken from its own folder, so write the model's path from there or in full",
                ("model",),
            )
    return data


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
        text = raw[bom:].decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise SpecError(f"job file not found: {path}", ("job_file",)) from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"job file {path} is not UTF-8 text (byte {bom + exc.start}); TOML files must be "
            "UTF-8: save it with that encoding",
            ("job_file",),
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(_toml_error(path, text, exc), ("job_file",)) from None
    except OSError as exc:
        raise SpecError(f"cannot read job file {path}: {exc}", ("job_file",)) from None


def _refuse_variables(path: Path, data: Mapping[str, Any]) -> None:
    """A path naming ``$NAME`` would be kept as text: a folder literally named ``$DATE``."""
    for key in (*_PATH_FIELDS, "model"):
        if isinstance(data.get(key), str) and (var := _ENV_VAR.search(data[key])):
            flag = "" if key == "input" else f", or give it as {_flag(key)} for the shell to expand"
            raise SpecError(
                f"`{key}` = {data[key]!r} in job file {path}: job files do not expand "
                f"environment variables ({var.group()}); write the path out in full{flag}",
                (key,),
            )


# $NAME or ${NAME}: a shell variable that a job file would otherwise keep as literal text
_ENV_VAR = re.compile(r"\$(?:\w+|\{\w+\})")
_DUPLICATE = "Cannot overwrite a value"


def _toml_error(path: Path, text: str, exc: Exception) -> str:
    """The parser's message, or for a key set twice which key and where (the parser names
    neither, and points past the file's end when the second one is on its last line)."""
    message = f"cannot read job file {path}: {exc}"
    if not str(exc).startswith(_DUPLICATE):
        return message
    lines = text.splitlines()
    found = re.search(r"at line (\d+)", str(exc))
    last = len(lines) - next((i for i, line in enumerate(reversed(lines)) if line.strip()), 0)
    where = int(found.group(1)) if found else last
    key = _key_of(lines[where - 1] if 0 < where <= len(lines) else "")
    if key is None:
        return message
    first = next((n for n, line in enumerate(lines[: where - 1], 1) if _key_of(line) == key), 0)
    lines_named = f"lines {first} and {where}" if first else f"line {where} and before"
    return f"job file {path} sets `{key}` more than once ({lines_named}): keep one of them"


def _key_of(line: str) -> str | None:
    """The key a ``key = value`` line sets (bare or quoted), or None."""
    match = re.match(r"""\s*(["']?)([\w-]+)\1\s*=""", line)
    return match and match[2]


def _key_fix(key: str, value: Any) -> str:
    """What to do about a key that is not a field."""
    if isinstance(value, dict):  # [key] or key.x = ...: the keys inside were never read
        return (
            "a table ([" + key + "] or dotted keys) is not read; job files set every key at the "
            "top level (see jobs/captions.example.toml): move its keys out of the table"
        )
    if key.replace("-", "_") == "checkpoint_every":  # the flag's name, which joins two keys
        return (
            "in a job file --checkpoint-every is two keys: set `checkpoint_every_rows` and/or "
            "`checkpoint_every_seconds`"
        )
    hint = difflib.get_close_matches(key, sorted(FIELD_NAMES), n=1)
    if hint:
        return f"did you mean '{hint[0]}'?"
    return "remove it (jobs/captions.example.toml lists every key)"


def job_file_paths(values: Mapping[str, Any]) -> tuple[Path, Path]:
    """The output file and checkpoint folder a job file's values name, validating nothing else
    (``jobrunner status`` and ``merge`` find a job this way, even when its input is gone).

    Raises:
        SpecError: the file names neither ``output`` nor ``input``.
    """
    output, source = values.get("output"), values.get("input")
    if not isinstance(output, Path):
        if not isinstance(source, Path):
            raise SpecError("the job file sets no `output` or `input` path", ("output",))
        output = default_output(source)
    checkpoint_dir = values.get("checkpoint_dir")
    return output, checkpoint_dir if isinstance(checkpoint_dir, Path) else default_parts_dir(output)


# ---------------------------------------------------------------------------------------------
# Validation


class _Bad(Exception):
    """Internal: a value failed a rule; the argument says what was expected."""


def _integer(minimum: int, maximum: int | None = None, optional: bool = False) -> Callable:
    expected = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")

    def check(value: Any) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(expected)
        if value < minimum or (maximum is not None and value > maximum):
            raise _Bad(expected)
        return value

    return check


def _number(minimum: float, maximum: float | None = None, open_min: bool = False) -> Callable:
    low = f"> {minimum}" if open_min else f">= {minimum}"
    expected = f"a number {low}" + (f" and <= {maximum}" if maximum is not None else "")

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(expected)
        value = float(value)
        too_low = value <= minimum if open_min else value < minimum
        if not math.isfinite(value) or too_low or (maximum is not None and value > maximum):
            raise _Bad(expected)
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _column(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad("a non-empty column name")
    return value


def _optional_column(value: Any) -> str | None:
    return None if value is None else _column(value)


def _keep_columns(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _Bad("a list of column names (or one comma-separated string)")
    clash = [name for name in value if name in RESERVED_COLUMNS]
    if clash:
        names = ", ".join(RESERVED_COLUMNS)
        raise _Bad(f"column names other than the output columns {names}; rename them in the input")
    return tuple(dict.fromkeys(value))


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in DTYPES:
        raise _Bad("one of float16, bfloat16, float32 (or auto)")
    return DTYPES[value.lower()]


def _quantize(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or value not in (4, 8):
        raise _Bad("4 or 8 (bits), or unset for no quantization")
    return int(value)


def _shard(value: Any) -> tuple[int, int] | None:
    expected = "'K/N' with integers 0 <= K < N, e.g. '0/4'"
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise _Bad(expected)
        value = (int(parts[0]), int(parts[1]))
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Bad(expected)
    k, n = value
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (k, n)) or not 0 <= k < n:
        raise _Bad(expected)
    # One shard of one is the whole job: store it as "not sharded" so both share checkpoints.
    return None if n == 1 else (k, n)


def _template(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a non-empty template string with {column} fields")
    try:
        template_fields(value)
    except ValueError as exc:
        raise _Bad(f"a valid template ({exc})") from None
    return value


def _model(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a local model folder or a Hugging Face hub id")
    local = Path(value).expanduser()
    return _normal(local) if local.exists() else value


def _path(value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _Bad("a file system path")
    return Path(_normal(Path(value).expanduser()))


def _normal(path: Path) -> str:
    """``path`` absolute; one with ``.`` or ``..`` in it is resolved (symbolic links followed,
    as the system follows them: ``link/..`` is the parent of the link's target), so that one
    folder named from two places is one job (the fingerprint). Paths without them stay as
    given, as they were before this, so that jobs fingerprinted then still resume."""
    absolute = str(path.absolute())
    return absolute if os.path.normpath(absolute) == absolute else os.path.realpath(absolute)


_RULES: dict[str, Callable[[Any], Any]] = {
    "input": _path,
    "model": _model,
    "output": _path,
    "prompt": _template,
    "id_column": _column,
    "image_column": _column,
    "prompt_column": _column,
    "keep_columns": _keep_columns,
    "max_tokens": _integer(1),
    "max_tokens_column": _optional_column,
    "temperature": _number(0.0),
    "top_p": _number(0.0, 1.0, open_min=True),
    "top_k": _integer(0),
    "seed": _integer(0, 2**63 - 1),
    "batch_size": _integer(1),
    "max_batch_tokens": _integer(1, optional=True),
    "num_crops": _integer(1, optional=True),
    "dtype": _dtype,
    "quantize": _quantize,
    "shard": _shard,
    "overwrite": _boolean,
    "retry_errors": _boolean,
    "quiet": _boolean,
    "image_root": _path,
    "checkpoint_every_rows": _integer(0),
    "checkpoint_every_seconds": _number(0.0),
    "max_image_pixels": _integer(1),
    "sort_window": _integer(1),
    "workers": _integer(1),
    "checkpoint_dir": _path,
    "chat": _boolean,
    "group_images": _boolean,
}


# fields whose command-line spelling is not --FIELD-NAME
_FLAGS = {
    "input": "the INPUT argument",
    "checkpoint_every_rows": "--checkpoint-every",
    "checkpoint_every_seconds": "--checkpoint-every",
    "chat": "--no-chat",
}


def _flag(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _fix(field: str) -> str:
    return f"set {_flag(field)} or `{field}` in the job file"


def template_fields(template: str) -> tuple[str, ...]:
    """The column names a prompt template refers to, in order of first use.

    Raises:
        ValueError: unbalanced braces, positional fields (``{}``, ``{0}``), attribute or index
            access (``{a.b}``, ``{a[0]}``), a conversion other than ``!r``/``!s``/``!a``, nested
            fields in a format spec, or a format spec no value could take (``{a:zz}``).
    """
    try:
        template.encode("utf-8")
    except UnicodeEncodeError as err:  # bytes a shell passed that are not UTF-8
        bad = template[err.start : err.end].encode("utf-8", "backslashreplace").decode()
        raise ValueError(f"the template holds text that is not valid Unicode ({bad})") from None
    names: list[str] = []
    for _literal, name, format_spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("positional field '{" + name + "}'; name a column, e.g. {caption}")
        if "." in name or "[" in name:
            raise ValueError(f"field '{{{name}}}' uses attribute/index access; use a plain column")
        if conversion not in _CONVERSIONS:
            raise ValueError(
                f"field '{{{name}!{conversion}}}' has an unknown conversion; use !r, !s, !a or none"
            )
        if format_spec and "{" in format_spec:
            raise ValueError(f"field '{{{name}}}' has a nested field in its format spec")
        if format_spec and _too_wide(format_spec):  # checked before formatting a sample
            raise ValueError(
                f"field '{{{name}}}' pads or cuts to more than {_MAX_WIDTH:,} characters "
                f"(':{format_spec}'); no model's prompt is that long"
            )
        if format_spec and not _formattable(format_spec, converted=conversion is not None):
            raise ValueError(f"field '{{{name}}}' has an invalid format spec ':{format_spec}'")
        names.append(name)
    return tuple(dict.fromkeys(names))


_MAX_WIDTH = 100_000
# width and precision in a standard format spec: [[fill]align][sign][z][#][0][width][,_][.prec]
_WIDTHS = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?", re.DOTALL)


def _too_wide(format_spec: str) -> bool:
    """Whether ``format_spec`` asks for a width or precision above ``_MAX_WIDTH`` (formatting
    even one value with it would take that much memory: ``{a:>1000000000}`` is a gigabyte)."""
    match = _WIDTHS.match(format_spec)  # DOTALL: the fill may be any character, "\n" too
    # digits counted before int(): a long run of them is past Python's int() limit too
    return match is not None and any(
        len((n or "").lstrip("0")) > 6 or int(n or 0) > _MAX_WIDTH for n in match.groups()
    )


def _formattable(format_spec: str, converted: bool) -> bool:
    """Whether some column value could take ``format_spec``: text, or (unconverted) a number or
    a date and time (``{taken:%Y-%m-%d}``).

    A spec only numbers take (``{n:.2f}``) passes: whether a row's value is a number is known
    per row, and a row that is not becomes an error record.
    """
    samples = ("",) if converted else ("", 0, 0.0)
    if not converted and "%" in format_spec:  # a date's spec (a date takes any other text too)
        samples += (datetime.datetime(2000, 1, 1),)
    for sample in samples:
        try:
            format(sample, format_spec)
        except ValueError:
            continue
        return True
    return False


def build_spec(
    file_values: Mapping[str, Any] | None = None, cli_values: Mapping[str, Any] | None = None
) -> JobSpec:
    """Merge job-file values with CLI values and validate them all.

    Args:
        file_values: from ``load_job_file`` (or ``{}``).
        cli_values: flag values by field name; ``None`` means "flag not given" and keeps the
            file's value, so pass ``None`` (not ``False``) for boolean flags left off.

    Returns:
        The validated, normalised spec (absolute paths, default output filled in).

    Raises:
        SpecError: listing every invalid field with the fix, one per line.
    """
    merged: dict[str, Any] = {}
    for source in (file_values or {}, cli_values or {}):
        for key, value in source.items():
            if key not in FIELD_NAMES:
                raise SpecError(f"{key}: unknown option; it is not a job spec field", (key,))
            if value is not None:
                merged[key] = value
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name, rule in _RULES.items():
        default = _DEFAULTS[name]
        if name not in merged:
            values[name] = None if default is dataclasses.MISSING else default
            continue
        try:
            values[name] = rule(merged[name])
        except _Bad as exc:
            problems.append((name, f"got {merged[name]!r}, expected {exc}; {_fix(name)}"))
    failed = {name for name, _ in problems}
    if not failed & {"input", "output", "checkpoint_dir"}:
        problems += _check_input_output(values)
    if not failed & _OTHER_CHECKED:
        problems += _check_other(values)
    if problems:
        lines = "\n".join(f"  {name}: {message}" for name, message in problems)
        raise SpecError(f"invalid job spec:\n{lines}", tuple(name for name, _ in problems))
    return JobSpec(**values)


def _check_input_output(values: dict[str, Any]) -> list[tuple[str, str]]:
    source: Path | None = values["input"]
    if source is None:
        return [("input", "missing; give the dataset as INPUT or `input` in the job file")]
    if not source.exists():
        hint = " (relative paths in a job file are resolved against the file's folder)"
        return [("input", f"file not found: {source}; check the path{hint}")]
    if not source.is_file():
        return [("input", f"{source} is not a file; give a .jsonl or .parquet file")]
    if source.suffix.lower() not in INPUT_SUFFIXES:
        got = source.suffix or "no suffix"
        return [("input", f"unsupported file type ({got}) for {source}; use .jsonl or .parquet")]
    output: Path | None = values["output"]
    if output is None:
        output = values["output"] = default_output(source)
    if output.suffix.lower() != ".parquet":
        return [("output", f"{output} must end with .parquet; {_fix('output')}")]
    if output.resolve() == source.resolve():
        return [("output", f"{output} is the input file; choose another output path")]
    if output.is_dir():
        return [("output", f"{output} is a folder; give a file name ending in .parquet")]
    if values["checkpoint_dir"] is not None and values["checkpoint_dir"] == output:
        return [("checkpoint_dir", "must differ from the output file; " + _fix("checkpoint_dir"))]
    # Checked now, before the model loads, not when the lock or the merge first writes there.
    folders = [("output", output.parent), ("checkpoint_dir", values["checkpoint_dir"])]
    if values["checkpoint_dir"] is None:  # OUTPUT.parts/: the output's place is to blame
        folders[1] = ("output", default_parts_dir(output))
    problems: dict[str, str] = {}
    for field, folder in folders:
        if field not in problems and (why := _unwritable(folder)):
            problems[field] = f"{why}; {_fix(field)} to a writable place"
    return list(problems.items())


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (made when missing), or None if they can."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create the folder {folder}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in the folder {existing} (read-only file system or no permission)"
    return None


_OTHER_CHECKED = {
    "model",
    "image_root",
    "id_column",
    "image_column",
    "prompt_column",
    "max_tokens_column",
    "checkpoint_every_rows",
    "checkpoint_every_seconds",
}


def _check_other(values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    if values["model"] is None:
        problems.append(("model", "missing; set --model PATH_OR_HUB_ID or `model` in the job file"))
    root: Path | None = values["image_root"]
    if root is not None:
        if not root.is_dir():
            message = f"{root} is not an existing folder; {_fix('image_root')}"
            problems.append(("image_root", message))
        else:
            values["image_root"] = Path(os.path.realpath(root))
    columns = [values[name] for name in ("id_column", "image_column", "prompt_column")]
    if len(set(columns)) != len(columns):
        problems.append(("id_column", f"id, image and prompt columns must differ, got {columns}"))
    read = columns if values.get("prompt") is None else columns[:2]  # a template: none read
    if values["max_tokens_column"] in read:
        message = (
            f"'{values['max_tokens_column']}' is already the id, image or prompt column; "
            f"name the column of per-row limits ({_fix('max_tokens_column')})"
        )
        problems.append(("max_tokens_column", message))
    if values["checkpoint_every_rows"] == 0 and values["checkpoint_every_seconds"] == 0:
        message = "rows and seconds are both 0; set at least one of them above 0"
        problems.append(("checkpoint_every_rows", message))
    return problems


# ---------------------------------------------------------------------------------------------
# Fingerprint


def _hashed_whole(size: int) -> bool:
    """Whether ``input_identity`` hashes a file of ``size`` bytes whole (not head and tail)."""
    return size <= 2 * _SAMPLE_BYTES


def input_identity(path: str | Path) -> dict[str, Any]:
    """What identifies the input file's content: real path, size and a content sample, and the
    modification time where the sample is not the whole file.

    The sample is the SHA-256 of the whole file up to 2 MiB, else of its first and last MiB, so
    a rewrite is noticed without reading a large dataset. A file hashed whole needs no mtime:
    touching it or writing the same bytes again changes nothing, so its job still resumes.
    """
    real = Path(path).resolve()
    stat = real.stat()
    digest = hashlib.sha256()
    with real.open("rb") as fh:
        if _hashed_whole(stat.st_size):
            digest.update(fh.read())
        else:
            digest.update(fh.read(_SAMPLE_BYTES))
            fh.seek(-_SAMPLE_BYTES, os.SEEK_END)
            digest.update(fh.read(_SAMPLE_BYTES))
    identity = {"path": str(real), "size": stat.st_size}
    if not _hashed_whole(stat.st_size):
        identity["mtime_ns"] = stat.st_mtime_ns
    return identity | {"sample_sha256": digest.hexdigest()}


def input_change(recorded: Mapping[str, Any]) -> str | None:
    """What changed, in words, in the input file since ``recorded`` (an ``input_identity``,
    of any fingerprint version), by the fingerprint's rule (a large file's modification time
    counts); None where nothing did.

    Raises:
        OSError: the file cannot be read now (nothing can be told).
    """
    now = input_identity(recorded.get("path", ""))
    before, after = (comparable_fields({"input": dict(x)})["input"] for x in (recorded, now))
    if before == after:
        return None
    if before.get("size") != after.get("size"):
        return f"size {before.get('size')} → {after.get('size')} bytes"
    return "same size, other content or modification time"


def fingerprint_fields(
    spec: JobSpec, model_identity: Mapping[str, Any], input_identity: Mapping[str, Any]
) -> dict[str, Any]:
    """The JSON-able values the fingerprint hashes (store them to report what changed).

    Args:
        model_identity: e.g. ``{"id": ..., "revision": ..., "weights_sha256": ...}`` plus any
            model default the spec leaves open (the effective ``num_crops``, ``dtype``).
        input_identity: from ``input_identity(spec.input)``.
    """
    greedy = spec.temperature == 0.0
    fields = {
        "version": FINGERPRINT_VERSION,
        "model": spec.model,
        "model_identity": dict(model_identity),
        "input": dict(input_identity),
        "prompt": spec.prompt,
        "chat": spec.chat,
        "id_column": spec.id_column,
        "image_column": spec.image_column,
        "prompt_column": spec.prompt_column,
        "keep_columns": list(spec.keep_columns),
        "image_root": None if spec.image_root is None else str(spec.image_root),
        "max_image_pixels": spec.max_image_pixels,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "top_p": None if greedy else spec.top_p,
        "top_k": None if greedy else spec.top_k,
        "seed": None if greedy else spec.seed,
        # a value spelt out that is the model's default is the same job as one left open
        "num_crops": _unless_default(spec.num_crops, model_identity.get("default_num_crops")),
        "dtype": _unless_default(spec.dtype, model_identity.get("default_dtype")),
        "quantize": spec.quantize,
    }
    if spec.max_tokens_column is not None:  # absent otherwise: older fingerprints still match
        fields["max_tokens_column"] = spec.max_tokens_column
    return fields


def _unless_default(value: Any, default: Any) -> Any:
    """None (what a spec that leaves it open records) for the model's own default value."""
    return None if value is not None and value == default else value


# Fields later fingerprints added, compared only where both sides recorded them: a checkpoint
# from before one was added is still the same job
_LATER_FIELDS = (("model_identity", "prompt_encoding"),)


def comparable_fields(
    fields: Mapping[str, Any], recorded: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Fingerprint fields as compared to tell whether two are one job, whichever version of the
    fingerprint recorded them: without the input's mtime where its sample is the whole file
    (fingerprints until 2026-11-24 had it), with a crop count or dtype that equals the
    model's recorded default as None (left open), and, compared with ``recorded`` (the other
    side), without a field added later that it lacks (``_LATER_FIELDS``)."""
    out = json.loads(json.dumps(dict(fields), default=str))
    for group, key in _LATER_FIELDS if recorded is not None else ():
        if key not in (recorded.get(group) or {}) and isinstance(out.get(group), dict):
            out[group].pop(key, None)
    source = out.get("input") if isinstance(out.get("input"), dict) else {}
    size = source.get("size")
    if isinstance(size, int) and _hashed_whole(size):
        source.pop("mtime_ns", None)
    model = out.get("model_identity") if isinstance(out.get("model_identity"), dict) else {}
    for key, default in (("num_crops", "default_num_crops"), ("dtype", "default_dtype")):
        if key in out:
            out[key] = _unless_default(out[key], model.get(default))
    return out


def fingerprint(
    spec: JobSpec, model_identity: Mapping[str, Any], input_identity: Mapping[str, Any]
) -> str:
    """SHA-256 (hex) of ``fingerprint_fields``; equal fingerprints mean equal outputs."""
    fields = fingerprint_fields(spec, model_identity, input_identity)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
