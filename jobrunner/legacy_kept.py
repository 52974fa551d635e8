"""Kept columns of part files written before kept Parquet columns were typed: JSON text → Arrow.

Such parts (no ``jobrunner.kept_arrow`` in their metadata, see `jobrunner.writers`) hold every
kept value as the JSON text of the Python value pyarrow gave for it: decimals, dates, times and
timestamps as their ``str`` / ISO text, bytes as base64, maps as lists of ``[key, value]``,
durations as ``str(timedelta)`` (or pandas' ``Timedelta``), objects with sorted keys. A job
checkpointed then and resumed now has parts of both formats; the merge reads the old parts'
values back as the column's Arrow type (the input's, which the new parts carry) with
`json_to_arrow`, so the column has one type whatever wrote each part. What the old format had
already lost stays lost: a struct's fields are found by name, so sorted keys do not matter, but
a value that pyarrow could not give Python (a timestamp past year 9999) was written as null.

Takes Arrow arrays and types; knows nothing of files or jobs.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.types as pt

_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
# ISO text with up to nine fraction digits (pandas' Timestamp writes nanoseconds, which
# datetime.fromisoformat would drop): the fraction is read apart
_ISO_TIMESTAMP = re.compile(
    r"^(.+[T ]\d\d:\d\d(?::\d\d)?)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d(?::\d\d(?:\.\d+)?)?)?$"
)
_ISO_TIME = re.compile(r"^(\d\d):(\d\d)(?::(\d\d))?(?:\.(\d{1,9}))?$")
# str(datetime.timedelta): "1 day, 0:00:03.000005", "-1 day, 23:59:59", "0:00:01";
# str(pandas.Timedelta): "0 days 00:00:00.000000001", "-1 days +23:59:59.999999999"
_DURATION = re.compile(r"^(?:(-?\d+) days?,? \+?)?(\d+):(\d\d):(\d\d)(?:\.(\d{1,9}))?$")
_LISTS = (pt.is_list, pt.is_large_list, pt.is_fixed_size_list)
_BINARIES = (pt.is_binary, pt.is_large_binary, pt.is_fixed_size_binary)


def json_to_arrow(texts: pa.Array, arrow_type: pa.DataType) -> pa.Array:
    """An old part's kept column (JSON text, null for null) as an array of ``arrow_type``.

    Raises:
        ValueError: a value that does not read as ``arrow_type``.
    """
    try:
        values = [
            None if text is None else _value(json.loads(text), arrow_type)
            for text in texts.to_pylist()
        ]
        return pa.array(values, type=arrow_type)
    except (ValueError, TypeError, KeyError, OverflowError, decimal.InvalidOperation) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    except pa.ArrowException as exc:
        raise ValueError(str(exc)) from None


def _value(value: Any, arrow_type: pa.DataType) -> Any:
    """``value`` (as the old part's JSON held it) as pyarrow takes it for ``arrow_type``."""
    if value is None:
        return None
    if pt.is_decimal(arrow_type):
        return decimal.Decimal(str(value))
    if pt.is_timestamp(arrow_type):
        return _timestamp(value, arrow_type.unit)
    if pt.is_date(arrow_type):
        return dt.date.fromisoformat(value)
    if pt.is_time(arrow_type):
        return _time(value, arrow_type.unit)
    if pt.is_duration(arrow_type):
        return _duration(value, arrow_type.unit)
    if any(check(arrow_type) for check in _BINARIES):
        return base64.b64decode(value, validate=True)
    if any(check(arrow_type) for check in _LISTS):
        return [_value(item, arrow_type.value_type) for item in value]
    if pt.is_map(arrow_type):
        return [(_value(k, arrow_type.key_type), _value(v, arrow_type.item_type)) for k, v in value]
    if pt.is_struct(arrow_type):
        return {f.name: _value(value.get(f.name), f.type) for f in arrow_type}
    return value  # numbers, bools and strings: JSON held them as they were


def _fraction(digits: str | None, per_second: int) -> int:
    """Decimal fraction digits of a second, in units of 1/per_second."""
    return int((digits or "").ljust(9, "0")) * per_second // 10**9


def _timestamp(text: str, unit: str) -> int:
    """ISO text → count of ``unit`` since the epoch (naive text: wall time, as Arrow stores it)."""
    match = _ISO_TIMESTAMP.match(text)
    if match is None:
        raise ValueError(f"not an ISO timestamp: {text!r}")
    head, digits, offset = match.groups()
    moment = dt.datetime.fromisoformat(head + (offset or "").replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    seconds = (moment - _EPOCH) // dt.timedelta(seconds=1)
    per_second = _PER_SECOND[unit]
    return seconds * per_second + _fraction(digits, per_second)


def _time(text: str, unit: str) -> int:
    """``HH:MM[:SS[.fraction]]`` → count of ``unit`` since midnight."""
    match = _ISO_TIME.match(text)
    if match is None:
        raise ValueError(f"not a time of day: {text!r}")
    hours, minutes, seconds, digits = match.groups()
    per_second = _PER_SECOND[unit]
    whole = int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)
    return whole * per_second + _fraction(digits, per_second)


def _duration(text: str, unit: str) -> int:
    """``str`` of a timedelta → count of ``unit``."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    days, hours, minutes, seconds, digits = match.groups()
    per_second = _PER_SECOND[unit]
    whole = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds)
    return whole * per_second + _fraction(digits, per_second)
