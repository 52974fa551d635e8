"""Records → tables, the part writer's flush policy, atomic JSON files, output metadata."""

import datetime as dt
import decimal
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from jobrunner import writers
from jobrunner.writers import (
    ParquetOutputMetadata,
    PartWriter,
    decode_kept,
    kept_type,
    part_kept_types,
    part_kinds,
    records_to_table,
    results_schema,
    write_summary,
)


def record(i: int, error: bool = False, **extra) -> dict:
    if error:
        base = {"output": None, "finish_reason": "error", "error": "bad image"}
    else:
        base = {"output": f"caption {i}", "finish_reason": "stop", "error": None}
    return {
        "index": i,
        "id": f"row-{i}",
        "prompt_tokens": 10 + i,
        "output_tokens": i,
        **base,
        **extra,
    }


class FakeStore:
    def __init__(self) -> None:
        self.parts: list[pa.Table] = []

    def write_part(self, table: pa.Table) -> None:
        self.parts.append(table)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_results_schema_order_and_types():
    schema = results_schema(["source", "width"], {"width": pa.int64()})
    assert schema.names == [
        "id",
        "output",
        "finish_reason",
        "error",
        "prompt_tokens",
        "output_tokens",
        "source",
        "width",
        "row_index",
    ]
    assert schema.field("prompt_tokens").type == pa.int32()
    assert schema.field("output_tokens").type == pa.int32()
    assert schema.field("row_index").type == pa.int64()
    assert schema.field("source").type == pa.string()
    assert schema.field("width").type == pa.int64()


@pytest.mark.parametrize("keep", [["output"], ["row_index"], ["a", "a"]])
def test_keep_columns_that_clash_are_refused(keep):
    with pytest.raises(ValueError):
        results_schema(keep)


def test_records_to_table_values_and_kinds():
    rows = [record(0, caption_src="x", n=1), record(1, error=True, extra={"caption_src": "y"})]
    table = records_to_table(rows, ["caption_src", "n"])
    assert table.column("id").to_pylist() == ["row-0", "row-1"]
    assert table.column("output").to_pylist() == ["caption 0", None]
    assert table.column("error").to_pylist() == [None, "bad image"]
    assert table.column("finish_reason").to_pylist() == ["stop", "error"]
    assert table.column("row_index").to_pylist() == [0, 1]
    assert table.schema.field("prompt_tokens").type == pa.int32()
    # kept values are JSON text in parts; 'extra' mapping and top-level keys both work
    assert table.column("caption_src").to_pylist() == ['"x"', '"y"']
    assert table.column("n").to_pylist() == ["1", None]
    assert part_kinds(table.schema) == {"caption_src": ["str"], "n": ["int", "null"]}


@pytest.mark.parametrize(
    "bad",
    [
        {"finish_reason": "eos"},
        {"finish_reason": "error", "output": "text", "error": "x"},
        {"finish_reason": "error", "output": None, "error": None},
        {"finish_reason": "stop", "error": "oops"},
        {"index": -1},
        {"index": "3"},
    ],
)
def test_invalid_records_are_refused(bad):
    with pytest.raises(ValueError):
        records_to_table([{**record(0), **bad}])
    with pytest.raises(ValueError):
        PartWriter(FakeStore()).add({**record(0), **bad})


def test_kept_type_is_chosen_from_all_kinds():
    assert kept_type(["int"]) == pa.int64()
    assert kept_type(["int", "float", "null"]) == pa.float64()
    assert kept_type(["bool"]) == pa.bool_()
    assert kept_type(["str", "null"]) == pa.string()
    assert kept_type(["null"]) == pa.string()
    assert kept_type(["int", "str"]) is None  # mixed: stays JSON text
    assert kept_type(["other"]) is None


def test_kept_values_round_trip():
    values = [1.5, None, 2]
    table = records_to_table([record(i, v=v) for i, v in enumerate(values)], ["v"])
    kinds = part_kinds(table.schema)["v"]
    decoded = decode_kept(table.column("v").combine_chunks(), kinds)
    assert decoded.type == pa.float64()
    assert decoded.to_pylist() == [1.5, None, 2.0]
    odd = [b"\x00\x01", dt.date(2024, 5, 1), {"b": 1, "a": [1, 2]}]
    table = records_to_table([record(i, v=v) for i, v in enumerate(odd)], ["v"])
    decoded = decode_kept(table.column("v").combine_chunks(), part_kinds(table.schema)["v"])
    # JSON text, a string with its quotes; object keys in the order they came in
    assert decoded.to_pylist() == ['"AAE="', '"2024-05-01"', '{"b": 1, "a": [1, 2]}']


def test_kept_ints_past_a_double_in_a_column_of_floats_are_the_nearest_double():
    # ints and floats make a float64 column; an int that no double holds exactly (past 2**53)
    # is the nearest double, as Python's float() gives it, never a failed merge
    values = [2**53 + 1, 0.5, -(2**63), None]
    table = records_to_table([record(i, v=v) for i, v in enumerate(values)], ["v"])
    decoded = decode_kept(table.column("v").combine_chunks(), part_kinds(table.schema)["v"])
    assert decoded.type == pa.float64()
    assert decoded.to_pylist() == [float(2**53), 0.5, -float(2**63), None]


def typed_columns() -> dict[str, pa.Array]:
    """A column of each kind a Parquet input may hold, each with a null, values that a trip
    through Python or JSON would change (nanoseconds, decimals past a float, uint64 past int64)."""
    struct = pa.struct([("z", pa.int32()), ("a", pa.list_(pa.string()))])
    return {
        "dec": pa.array([decimal.Decimal("0.50"), None, decimal.Decimal("-" + "1" * 30 + ".25")],
                        pa.decimal128(38, 2)),
        "dec256": pa.array([decimal.Decimal("9" * 60), None, 0], pa.decimal256(70, 0)),
        "ts": pa.array([1_704_110_401_000_000_001, None, -1], pa.timestamp("ns", "Asia/Tokyo")),
        "naive": pa.array([1, None, 2], pa.timestamp("ms")),
        "day": pa.array([dt.date(2024, 1, 1), None, dt.date(1, 1, 1)], pa.date32()),
        "clock": pa.array([1, None, 86_399_999_999], pa.time64("us")),
        "wait": pa.array([86_401_000_000_001, None, -1], pa.duration("ns")),
        "i8": pa.array([-128, None, 127], pa.int8()),
        "f32": pa.array([0.1, None, -2.5], pa.float32()),
        "flag": pa.array([True, None, False]),
        "u64": pa.array([2**64 - 1, None, 0], pa.uint64()),
        "raw": pa.array([b"\x00\xff", None, b""]),
        "nums": pa.array([[1, None], None, []], pa.list_(pa.int16())),
        "pair": pa.array([[1, 2], None, [3, 4]], pa.list_(pa.int32(), 2)),
        "obj": pa.array([{"z": 1, "a": ["x", None]}, None, {"z": None, "a": []}], struct),
        "map": pa.array([[("k", 1), ("a", 2)], None, []], pa.map_(pa.string(), pa.int64())),
        "text": pa.array(["x", None, ""], pa.large_string()),
    }  # fmt: skip


def test_typed_kept_columns_are_copied_exactly():
    columns = typed_columns()
    types = {name: array.type for name, array in columns.items()}
    records = [record(i, extra={n: a[i] for n, a in columns.items()}) for i in range(3)]
    records[1]["extra"] = {}  # a row without values (a JSONL-style miss): nulls of the type
    table = records_to_table(records, list(columns), types)
    assert part_kept_types(table.schema) == types
    assert part_kinds(table.schema) == {}
    for name, array in columns.items():
        assert table.column(name).combine_chunks().equals(array), name
    # a Python value where a scalar is expected is converted; a dictionary scalar decoded
    label = pa.array(["cat"]).dictionary_encode()[0]
    table = records_to_table([record(0, n=5, label=label)], ["n", "label"],
                             {"n": pa.uint8(), "label": pa.string()})  # fmt: skip
    assert table.schema.field("n").type == pa.uint8() and table.column("n").to_pylist() == [5]
    assert table.column("label").to_pylist() == ["cat"]


def test_text_that_is_not_valid_unicode_is_stored_escaped():
    # A lone surrogate (JSON "\\udc80") cannot be encoded as UTF-8: writing it must not fail.
    bad = record(0, error=True, id="row-\udc80", note="x\udc80", deep=["\ud800"])
    bad["error"] = "kept column 'note' holds \udc80"
    table = records_to_table([bad, record(1, note="caf\u00e9", deep=None)], ["note", "deep"])
    assert table.column("id").to_pylist() == ["row-\\udc80", "row-1"]
    assert table.column("error").to_pylist() == ["kept column 'note' holds \\udc80", None]
    kinds = part_kinds(table.schema)
    note = decode_kept(table.column("note").combine_chunks(), kinds["note"])
    assert note.to_pylist() == ["x\\udc80", "caf\u00e9"]  # six characters, not a surrogate
    deep = decode_kept(table.column("deep").combine_chunks(), kinds["deep"])
    assert deep.to_pylist() == ['["\\ud800"]', None]  # JSON text that names the surrogate


def test_part_writer_flushes_every_n_rows():
    store = FakeStore()
    writer = PartWriter(store, every_rows=3, every_seconds=None)
    flushed = []
    for i in range(7):
        writer.add(record(i, error=i == 4))
        flushed.append(writer.maybe_flush())
    assert flushed == [False, False, True, False, False, True, False]
    assert [t.num_rows for t in store.parts] == [3, 3]
    assert writer.pending == 1
    assert writer.flush() == 1
    assert writer.flush() == 0  # nothing pending → no empty part
    assert [t.num_rows for t in store.parts] == [3, 3, 1]
    assert writer.rows_written == 7 and writer.errors_written == 1 and writer.parts_written == 3
    got = [i for t in store.parts for i in t.column("row_index").to_pylist()]
    assert got == list(range(7))


def test_part_writer_flushes_after_interval():
    store, clock = FakeStore(), FakeClock()
    writer = PartWriter(store, every_rows=None, every_seconds=30, clock=clock)
    writer.add(record(0))
    clock.now += 29
    assert not writer.maybe_flush()
    clock.now += 1
    assert writer.maybe_flush()
    assert [t.num_rows for t in store.parts] == [1]
    writer.add(record(1))
    clock.now += 20
    assert not writer.maybe_flush()  # the interval restarted at the last flush
    clock.now += 100
    writer.flush()
    clock.now += 100
    assert not writer.maybe_flush()  # interval elapsed but nothing pending
    writer.add(record(2))
    # time since the last flush is unsaved work (the batch that produced this row): flush now
    assert writer.maybe_flush()
    assert [t.num_rows for t in store.parts] == [1, 1, 1]


@pytest.mark.parametrize("kwargs", [{"every_rows": 0}, {"every_seconds": -1}])
def test_part_writer_rejects_bad_intervals(kwargs):
    with pytest.raises(ValueError):
        PartWriter(FakeStore(), **kwargs)


def test_write_summary_is_atomic(tmp_path: Path, monkeypatch):
    path = tmp_path / "out.parquet.summary.json"
    write_summary(path, {"rows_ok": 3, "rows_error": 1})
    assert json.loads(path.read_text()) == {"rows_error": 1, "rows_ok": 3}

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(writers.os, "replace", crash)
    with pytest.raises(OSError):
        write_summary(path, {"rows_ok": 4, "rows_error": 0})
    # the old summary is intact and no temp file is left behind
    assert json.loads(path.read_text()) == {"rows_error": 1, "rows_ok": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_write_summary_respects_umask(tmp_path: Path):
    path = tmp_path / "summary.json"
    write_summary(path, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_output_metadata_json():
    meta = ParquetOutputMetadata(
        spec={"input": Path("/data/x.jsonl"), "max_tokens": 64},
        fingerprint="abc",
        fingerprint_fields={"model": "m"},
        model_id="microsoft/Phi-3.5-vision-instruct",
        model_revision="rev1",
    )
    data = json.loads(meta.to_json())
    assert data["spec"] == {"input": "/data/x.jsonl", "max_tokens": 64}
    assert data["fingerprint"] == "abc"
    assert data["model_revision"] == "rev1"
    assert data["versions"]["pyarrow"] == pa.__version__
    assert data["versions"]["python"]
