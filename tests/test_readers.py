"""Readers: streaming rows from JSONL and Parquet, image references, per-row errors, images."""

import io
import json
import os
import struct
import sys
import tracemalloc
import zlib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobrunner.readers import (
    DuplicateIdTracker,
    ImageError,
    ImageRef,
    InputReadError,
    ReaderConfigError,
    ReadOptions,
    Row,
    check_input,
    count_rows,
    image_size,
    iter_rows,
    kept_column_types,
    load_image,
)

LIMIT = 50_000_000


def save_image(path: Path, size: tuple[int, int] = (8, 6), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, fmt)
    return path


def png_bytes(size: tuple[int, int] = (5, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "blue").save(buffer, "PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, lines: list) -> Path:
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n")
    return path


def rows_of(path: Path, **options) -> list[Row]:
    return list(iter_rows(path, ReadOptions(**options)))


# --- JSONL ---------------------------------------------------------------------------------------


def test_jsonl_rows_paths_and_indices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    save_image(data_dir / "imgs" / "a.png")
    absolute = save_image(tmp_path / "elsewhere" / "b.png")
    source = write_jsonl(
        data_dir / "rows.jsonl",
        [
            {"id": "x", "image": "imgs/a.png", "prompt": "one", "note": 1},
            "",
            "   ",
            {"image": str(absolute), "prompt": "two"},
            {"id": 7, "prompt": "text only"},
        ],
    )
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    rows = rows_of(source, keep_columns=("note",))
    assert [(r.index, r.id, r.prompt, r.error) for r in rows] == [
        (0, "x", "one", None),
        (1, "1", "two", None),
        (2, "7", "text only", None),
    ]
    assert rows[0].image == ImageRef(path=str(data_dir / "imgs" / "a.png"))
    assert rows[1].image == ImageRef(path=str(absolute))
    assert rows[2].image is None
    assert [r.extra for r in rows] == [{"note": 1}, {"note": None}, {"note": None}]
    assert count_rows(source) == 3
    assert image_size(rows[0].image, LIMIT) == (8, 6)


def test_jsonl_bad_lines_become_error_rows(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_bytes(
        b'{"prompt": "ok"}\n'
        b'{"prompt": "broken"\n'
        b"[1, 2]\n"
        b'{"prompt": "\xff\xfe bad utf8"}\n'
        b'{"prompt": "last"}'  # no trailing newline
    )
    rows = rows_of(source)
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert [r.prompt for r in rows] == ["ok", None, None, None, "last"]
    assert rows[0].error is None and rows[4].error is None
    assert "invalid JSON on line 2" in rows[1].error
    assert "line 3 is a JSON list" in rows[2].error
    assert "line 4" in rows[3].error
    assert count_rows(source) == 5


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"image": 3, "prompt": "p"}, "image column 'image' must be a path string"),
        ({"image": ["a.png"], "prompt": "p"}, "got list"),
        ({"image": {"bytes": "aGk=", "path": None}, "prompt": "p"}, "must be binary"),
        ({"image": {}, "prompt": "p"}, "neither 'bytes' nor 'path'"),
        ({"image": "", "prompt": "p"}, "empty string"),
        ({"image": "http://x/a.png", "prompt": "p"}, "URL"),
        ({"prompt": 5}, "prompt column 'prompt' must be a string, got int"),
        ({"prompt": None}, "no prompt"),
        ({"other": "x"}, "no prompt"),
        ({"id": 1.5, "prompt": "p"}, "id column 'id' must hold whole numbers, got 1.5"),
        ({"id": [1], "prompt": "p"}, "got list"),
    ],
)
def test_wrong_types_are_error_rows(tmp_path: Path, record: dict, needle: str) -> None:
    source = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "fine"}, record, {"prompt": "also"}])
    rows = rows_of(source)
    assert len(rows) == 3
    assert rows[0].error is None and rows[2].error is None
    assert needle in rows[1].error
    assert rows[1].id == "1"


def test_lone_surrogates_are_error_rows(tmp_path: Path) -> None:
    # Valid JSON: a \\ud800 escape without its low half decodes to a lone surrogate, which no
    # tokenizer or Parquet string takes.
    source = tmp_path / "rows.jsonl"
    source.write_text(
        '{"id": "ok", "prompt": "fine", "note": "n"}\n'
        '{"id": "p", "prompt": "bad \\ud800 text"}\n'
        '{"id": "i\\udc80", "prompt": "fine"}\n'
        '{"id": "k", "prompt": "fine", "note": {"deep": ["\\udfff"]}}\n'
        '{"id": "pair", "prompt": "emoji \\ud83d\\ude00", "note": "\\u00e9"}\n'
    )
    rows = rows_of(source, keep_columns=("note",))
    assert [r.error for r in rows[0::4]] == [None, None]
    assert rows[4].prompt == "emoji \U0001f600"
    assert "prompt column 'prompt' holds text that is not valid Unicode" in rows[1].error
    assert "lone surrogate \\ud800" in rows[1].error and rows[1].prompt is None
    assert "id column 'id' holds text that is not valid Unicode" in rows[2].error
    assert rows[2].id == "i\udc80"  # kept: the writer stores it escaped
    assert "kept column 'note' holds text that is not valid Unicode" in rows[3].error

    rows = rows_of(source, prompt_template="Q: {prompt}")
    assert "prompt template field 'prompt' holds text that is not valid Unicode" in rows[1].error
    assert rows[1].prompt is None and rows[0].prompt == "Q: fine"


def test_kept_values_nested_deeper_than_the_call_stack_are_searched(tmp_path: Path) -> None:
    def row(leaf: str, extra: str = "") -> str:  # "note" nested 800 lists deep
        return '{"prompt": "p"' + extra + ', "note": ' + "[" * 800 + leaf + "]" * 800 + "}\n"

    source = tmp_path / "rows.jsonl"
    escape = '"\\ud800"'  # the six characters \ud800 in the JSON text
    source.write_text(row('"fine"') + row('"fine"', ', "s": ' + escape) + row(escape))
    rows = rows_of(source, keep_columns=("note",))
    assert rows[0].error is None and rows[1].error is None  # an escape, but not in a kept value
    assert "kept column 'note' holds text that is not valid Unicode" in rows[2].error


def test_jsonl_path_struct(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", (3, 2))
    source = write_jsonl(tmp_path / "rows.jsonl", [{"image": {"path": "a.png"}, "prompt": "p"}])
    (row,) = rows_of(source)
    assert row.image == ImageRef(path=str(tmp_path / "a.png"))
    assert load_image(row.image, LIMIT).size == (3, 2)


# --- prompt templates -----------------------------------------------------------------------------


def test_template_fills_fields_and_names_missing_ones(tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"title": "Cat", "n": 7, "prompt": "ignored"},
            {"n": 3},
            {"title": None, "n": 1},
            {"title": "Dog", "n": "seven"},
        ],
    )
    rows = rows_of(source, prompt_template="{title} #{n:03d} {{literal}}")
    assert rows[0].prompt == "Cat #007 {literal}" and rows[0].error is None
    assert rows[1].error == "prompt template field 'title' is missing from this row"
    assert rows[2].error == "prompt template field 'title' is null in this row"
    assert "cannot fill the prompt template" in rows[3].error
    assert all(r.prompt is None for r in rows[1:])


@pytest.mark.parametrize("template", ["Letter {n:c}", "Score {n:.2f}"])
def test_template_value_out_of_the_specs_range_is_the_rows_error(tmp_path: Path, template) -> None:
    """A number a valid format spec cannot take (a code point past U+10FFFF for ``:c``, an
    integer too large for a float for ``:.2f``) raises OverflowError: the row's error, not an
    exception out of the reader (the job stopped with exit 4 there, on every resume)."""
    source = write_jsonl(tmp_path / "rows.jsonl", [{"n": 66}, {"n": 10**400}, {"n": 67}])
    rows = rows_of(source, prompt_template=template)
    assert len(rows) == 3 and rows[0].error is None and rows[2].error is None
    assert "cannot fill the prompt template" in rows[1].error and rows[1].prompt is None


def test_a_row_that_fails_in_a_way_no_check_foresaw_is_its_own_error(tmp_path, monkeypatch):
    """Whatever a row's values make the reader raise, that row is an error record with its id,
    and the rows after it are read: an exception out of the reader would stop the job at that
    row on every resume (two such holes were found: OverflowError, UnicodeEncodeError)."""
    from jobrunner import readers

    source = write_jsonl(
        tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(3)]
    )
    real = readers._prompt

    def fails_on_p1(record, options, problems):
        if record.get("prompt") == "p1":
            raise RuntimeError("unforeseen")
        return real(record, options, problems)

    monkeypatch.setattr(readers, "_prompt", fails_on_p1)
    rows = rows_of(source)
    assert [r.id for r in rows] == ["r0", "r1", "r2"]
    assert rows[0].error is None and rows[2].error is None and rows[2].prompt == "p2"
    error = rows[1].error
    assert error.startswith("cannot read this row (RuntimeError: unforeseen at "), error
    assert "in fails_on_p1)" in error, error  # where it was raised, for the report


# --- Parquet --------------------------------------------------------------------------------------


def test_parquet_streams_by_record_batch(tmp_path: Path) -> None:
    save_image(tmp_path / "imgs" / "a.png")
    table = pa.table(
        {
            "id": pa.array(range(10, 20), pa.int64()),
            "image": ["imgs/a.png"] * 9 + [None],
            "prompt": [f"p{i}" for i in range(10)],
            "note": [f"n{i}" for i in range(10)],
            "unused": [b"x" * 10] * 10,
        }
    )
    source = tmp_path / "rows.parquet"
    pq.write_table(table, source, row_group_size=3)
    check_input(source, ReadOptions(keep_columns=("note",)))
    rows = rows_of(source, keep_columns=("note",))
    assert [r.index for r in rows] == list(range(10))
    assert [r.id for r in rows] == [str(i) for i in range(10, 20)]
    assert rows[0].image == ImageRef(path=str(tmp_path / "imgs" / "a.png"))
    assert rows[9].image is None
    # kept Parquet values are Arrow scalars, copied to the output without Python in between
    assert [r.extra["note"] for r in rows] == [pa.scalar(f"n{i}") for i in range(10)]
    assert count_rows(source) == 10


def test_parquet_value_python_cannot_hold_is_an_error_row(tmp_path: Path) -> None:
    # A timestamp past year 9999 is valid Arrow but not a Python datetime: converting its
    # record batch fails as a whole; only its row may become an error record.
    source = tmp_path / "rows.parquet"
    ts = pa.array([0, 300_000_000_000_000, None], pa.timestamp("ms"))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["p"] * 3, "ts": ts}), source)
    rows = rows_of(source, prompt_template="at {ts}", keep_columns=("ts",))
    assert [r.id for r in rows] == ["a", "b", "c"]
    assert rows[0].error is None and rows[0].prompt == "at 1970-01-01 00:00:00"
    assert rows[1].error.startswith("column 'ts' holds a value Python cannot represent")
    assert rows[2].error == "prompt template field 'ts' is null in this row"
    # kept, the value needs no Python: it is carried as it is, error row or not
    assert [r.extra["ts"] for r in rows] == [ts[0], ts[1], ts[2]]


def test_parquet_kept_values_are_arrow_scalars_of_the_input_type(tmp_path: Path) -> None:
    source = tmp_path / "rows.parquet"
    far = pa.array([300_000_000_000_000, None], pa.timestamp("ms", "UTC"))  # year 11476
    label = pa.array(["cat", None]).dictionary_encode()
    pq.write_table(pa.table({"prompt": ["p", "p"], "far": far, "label": label}), source)
    keep = ("far", "label")
    rows = rows_of(source, keep_columns=keep)
    assert [r.error for r in rows] == [None, None]  # a kept value Python cannot hold: no error
    assert [r.extra["far"] for r in rows] == [far[0], far[1]]
    assert [r.extra["label"] for r in rows] == [pa.scalar("cat"), pa.scalar(None, pa.string())]
    assert rows[0].columns_given == {"far", "label"} and rows[1].columns_given == frozenset()
    assert kept_column_types(source, keep) == {"far": far.type, "label": pa.string()}
    assert kept_column_types(tmp_path / "rows.jsonl", keep) == {}


def test_damaged_parquet_page_names_where_after_the_rows_before(tmp_path: Path) -> None:
    source = tmp_path / "rows.parquet"
    table = pa.table(
        {"id": [f"r{i}" for i in range(30)], "prompt": [f"p{i}" * 40 for i in range(30)]}
    )
    pq.write_table(table, source, row_group_size=10, compression="snappy")
    chunk = pq.ParquetFile(source).metadata.row_group(2).column(1)
    data = bytearray(source.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 8] = b"\xff" * 8  # its page header
    source.write_bytes(bytes(data))
    check_input(source)  # the footer is intact: the damage shows only when the rows are read
    rows = iter_rows(source)
    assert [next(rows).id for _ in range(20)] == [f"r{i}" for i in range(20)]
    with pytest.raises(InputReadError) as caught:
        next(rows)
    assert f"{source} is damaged: row 20 and after (row group 2, rows 20-29)" in str(caught.value)


def test_damaged_page_is_found_by_its_checksum(tmp_path: Path) -> None:
    """A page written with a checksum (Spark's default, pyarrow's write_page_checksum) whose
    bytes changed decodes to wrong values without complaint: its checksum tells."""
    source = tmp_path / "rows.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(20)], "prompt": ["p"] * 20, "k": range(20)})
    pq.write_table(
        table, source, row_group_size=10, compression="none", use_dictionary=False,
        write_page_checksum=True,
    )  # fmt: skip
    chunk = pq.ParquetFile(source).metadata.row_group(1).column(2)
    data = bytearray(source.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 8] ^= 0xFF  # row 19's k
    source.write_bytes(bytes(data))
    rows = iter_rows(source, ReadOptions(keep_columns=("k",)))
    assert [next(rows).extra["k"].as_py() for _ in range(10)] == list(range(10))
    with pytest.raises(InputReadError) as caught:
        next(rows)
    message = str(caught.value)
    assert "row 10 and after (row group 1, rows 10-19) cannot be read" in message
    assert "CRC checksum verification failed" in message and "\n" not in message


def test_parquet_bytes_column(tmp_path: Path) -> None:
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": pa.array([png_bytes((5, 4))], pa.binary())}), source)
    (row,) = rows_of(source, prompt_template="Describe.")
    assert row.error is None and row.image.data is not None and row.id == "0"
    assert image_size(row.image, LIMIT) == (5, 4)
    assert load_image(row.image, LIMIT).size == (5, 4)


def test_parquet_wrong_column_types_are_refused_up_front(tmp_path: Path) -> None:
    """A column type no row could use is a configuration error: every row would otherwise be
    an error record, which a re-run after the fix skips. Read anyway, each row is an error."""
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": [1, 2], "prompt": [3, 4], "id": [[1], [2]]}), source)
    with pytest.raises(ReaderConfigError) as refused:
        check_input(source)
    message = str(refused.value)
    assert "the image column 'image' holds int64, not paths (strings), bytes or" in message
    assert "the prompt column 'prompt' holds int64, not text; name another column with" in message
    assert "the id column 'id' holds list<element: int64>, not strings or whole numbers" in message
    rows = rows_of(source, id_column="x")
    assert len(rows) == 2
    assert all("image column 'image'" in r.error and "prompt column" in r.error for r in rows)


def test_parquet_without_any_needed_column(tmp_path: Path) -> None:
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"other": [1, 2, 3]}), source, row_group_size=2)
    rows = rows_of(source, prompt_template="Say hi.")
    assert [(r.index, r.prompt, r.image, r.error) for r in rows] == [
        (i, "Say hi.", None, None) for i in range(3)
    ]


def test_hf_datasets_image_struct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # datasets stores the paths as given: relative to this folder
    save_image(tmp_path / "a.png", (7, 3))
    save_image(tmp_path / "b.png", (2, 9))
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    from_paths = datasets.Dataset.from_dict(
        {"image": ["a.png", str(tmp_path / "b.png")], "prompt": ["p", "q"]}
    ).cast_column("image", datasets.Image())
    from_pil = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (6, 5)), Image.new("L", (4, 4))], "prompt": ["r", "s"]},
        features=features,
    )
    sizes = []
    for name, dataset in (("paths", from_paths), ("pil", from_pil)):
        source = tmp_path / f"{name}.parquet"
        dataset.to_parquet(str(source))
        image_type = pq.ParquetFile(source).schema_arrow.field("image").type
        assert image_type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        check_input(source)
        rows = rows_of(source)
        assert [r.error for r in rows] == [None, None]
        sizes += [load_image(r.image, LIMIT).size for r in rows]
    assert sizes == [(7, 3), (2, 9), (6, 5), (4, 4)]


def test_hf_struct_prefers_bytes_over_path(tmp_path: Path) -> None:
    source = tmp_path / "rows.parquet"
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": png_bytes((3, 3)), "path": "does-not-exist.png"}], struct_type)
    pq.write_table(pa.table({"image": images, "prompt": ["p"]}), source)
    (row,) = rows_of(source, image_root=tmp_path / "elsewhere")
    assert row.error is None
    assert row.image.path == "does-not-exist.png"
    assert load_image(row.image, LIMIT).size == (3, 3)


def test_image_struct_with_other_fields_too(tmp_path: Path) -> None:
    """check_input takes a struct with a 'bytes' or 'path' field; its rows read the image
    whatever other fields the struct has (an export's width, height), not an error each."""
    source = tmp_path / "rows.parquet"
    save_image(tmp_path / "b.png", (2, 9))
    images = pa.array(
        [
            {"bytes": png_bytes((3, 3)), "path": None, "width": 3},
            {"bytes": None, "path": "b.png", "width": 2},
        ]
    )
    pq.write_table(pa.table({"image": images, "prompt": ["p", "q"]}), source)
    check_input(source)
    rows = rows_of(source)
    assert [r.error for r in rows] == [None, None]
    assert [load_image(r.image, LIMIT).size for r in rows] == [(3, 3), (2, 9)]


def test_rows_own_token_limits(tmp_path: Path) -> None:
    """A row's limit is a whole number from 1 to the job's; missing, null or NaN (pandas' null
    in a float column) takes the job's; anything else makes the row an error record that says
    what to fix, and the other rows still run."""
    values = [5, None, "missing", 12, 7.0, float("nan"), 0, 13, 2.5, "ten", True, [3]]
    lines = [{"prompt": "p"} if v == "missing" else {"prompt": "p", "n": v} for v in values]
    source = write_jsonl(tmp_path / "rows.jsonl", lines)  # NaN as JSON's non-standard NaN
    rows = rows_of(source, max_tokens_column="n", max_tokens=12)
    got = [(r.max_tokens, r.error) for r in rows]
    assert got[:6] == [(5, None), (None, None), (None, None), (12, None), (7, None), (None, None)]
    # a value, valid or not, counts as given (a run warns when no row gives one)
    assert [r.limit_given for r in rows] == [True, False, False, True, True, False] + [True] * 6
    shown = [
        "is 0; a row's limit is at least 1",
        "is 13, above --max-tokens 12",
        "from 1 to 12, got 2.5",
        'from 1 to 12, got "ten"',
        "from 1 to 12, got true",  # as JSON spells it
        "from 1 to 12, got list",
    ]
    for (limit, error), what in zip(got[6:], shown, strict=True):
        assert limit is None and error.startswith("max tokens column 'n'"), error
        assert what in error, error
    assert all(r.max_tokens is None for r in rows_of(source))  # no column named: the job's
    table = {"prompt": ["a", "b", "c"], "n": pa.array([4.0, None, 2.0])}  # pandas' int + null
    parquet = parquet_with(tmp_path, **table)
    check_input(parquet, ReadOptions(max_tokens_column="n"))
    rows = rows_of(parquet, max_tokens_column="n", max_tokens=4)
    assert [(r.max_tokens, r.error) for r in rows] == [(4, None), (None, None), (2, None)]
    decimals = pa.array([Decimal("3"), Decimal("2.50"), Decimal("4.00")], pa.decimal128(5, 2))
    parquet = parquet_with(tmp_path, prompt=["a", "b", "c"], n=decimals)
    check_input(parquet, ReadOptions(max_tokens_column="n"))
    rows = rows_of(parquet, max_tokens_column="n", max_tokens=4)
    assert [r.max_tokens for r in rows] == [3, None, 4]
    assert "got 2.50" in rows[1].error
    parquet = parquet_with(tmp_path, prompt=["a"], n=["5"])  # text: refused before any row runs
    with pytest.raises(ReaderConfigError, match="--max-tokens-column 'n' holds string"):
        check_input(parquet, ReadOptions(max_tokens_column="n"))


# --- up-front checks ------------------------------------------------------------------------------


def parquet_with(tmp_path: Path, **columns) -> Path:
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table(columns), source)
    return source


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({}, "no prompt column 'prompt'"),
        ({"prompt_template": "Describe {title}."}, "'{title}' is not a column"),
        ({"prompt_template": "x", "keep_columns": ("gone",)}, "--keep-columns 'gone'"),
        ({"prompt_template": "x", "image_column": "picture"}, "no column 'picture'"),
        ({"prompt_template": "x", "id_column": "key"}, "no column 'key'"),
        ({"prompt_template": "x", "max_tokens_column": "limit"}, "--max-tokens-column 'limit'"),
    ],
)
def test_check_input_parquet_columns(tmp_path: Path, options: dict, needle: str) -> None:
    source = parquet_with(tmp_path, image=["a.png"], caption=["c"])
    with pytest.raises(ReaderConfigError, match=needle):
        check_input(source, ReadOptions(**options))


def test_check_input_accepts_default_columns_absent(tmp_path: Path) -> None:
    # no 'id' (rows numbered) and no 'image' (text-only): both fine under their default names
    check_input(parquet_with(tmp_path, prompt=["p"]))
    check_input(parquet_with(tmp_path, caption=["c"]), ReadOptions(prompt_template="{caption}"))


@pytest.mark.parametrize(("column", "flag"), [("Image", "--image-column"), ("ID", "--id-column")])
def test_check_input_refuses_a_default_column_that_differs_in_case(
    tmp_path: Path, column: str, flag: str
) -> None:
    """'Image' is not 'image': absent under the default name, every row would run text only
    (or be numbered) and exit 0. A column that differs only in case is named instead."""
    source = parquet_with(tmp_path, prompt=["p"], **{column: ["a.png"]})
    with pytest.raises(ReaderConfigError) as refused:
        check_input(source)
    assert f"no column '{column.lower()}', but there is '{column}'" in str(refused.value)
    assert f"give {flag} '{column}'" in str(refused.value)
    check_input(source, ReadOptions(**{flag[2:].replace("-", "_"): column}))
    source = parquet_with(tmp_path, Prompt=["p"])
    with pytest.raises(ReaderConfigError, match="no prompt column 'prompt' \\(there is 'Prompt'"):
        check_input(source)


def test_check_input_refuses_a_column_the_file_holds_twice(tmp_path: Path) -> None:
    """pyarrow writes a file with one name twice; which column a flag means is then a guess
    (a kept one failed with a KeyError, an image one was judged by the other's type)."""
    source = tmp_path / "rows.parquet"
    arrays = [pa.array(["a.png"]), pa.array(["p"]), pa.array([1]), pa.array([2])]
    pq.write_table(pa.Table.from_arrays(arrays, ["image", "prompt", "k", "k"]), source)
    with pytest.raises(ReaderConfigError, match="column 'k' appears 2 times; rename or drop"):
        check_input(source, ReadOptions(keep_columns=("k",)))
    check_input(source)  # a column the job does not read may repeat
    arrays[2] = pa.array([3])
    pq.write_table(pa.Table.from_arrays(arrays, ["image", "prompt", "image", "k"]), source)
    with pytest.raises(ReaderConfigError) as refused:
        check_input(source)
    assert str(refused.value).endswith("column 'image' appears 2 times; rename or drop all but one")


def test_check_input_files(tmp_path: Path) -> None:
    with pytest.raises(ReaderConfigError, match="not found"):
        check_input(tmp_path / "missing.jsonl")
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ReaderConfigError, match="not a readable Parquet"):
        check_input(fake)
    csv = tmp_path / "rows.csv"
    csv.write_text("a\n")
    with pytest.raises(ReaderConfigError, match=".jsonl or .parquet"):
        check_input(csv)
    # JSONL rows may differ in keys: nothing about columns is checked up front
    check_input(write_jsonl(tmp_path / "rows.jsonl", [{"x": 1}]), ReadOptions(id_column="key"))


@pytest.mark.parametrize(
    ("encoding", "name"),
    [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")],
)
def test_check_input_refuses_jsonl_that_is_not_utf8(
    tmp_path: Path, encoding: str, name: str
) -> None:
    # Windows tools write UTF-16 (with a BOM); read as UTF-8 its lines split in the wrong places.
    source = tmp_path / "rows.jsonl"
    source.write_bytes(
        '{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "yo"}\n'.encode(encoding)
    )
    with pytest.raises(ReaderConfigError, match=f"is not UTF-8 text \\(it looks like {name}\\)"):
        check_input(source)


def test_check_input_accepts_utf8_with_bom_and_a_nul_line(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n\x00\x00\n{"prompt": "\xc3\xa9t\xc3\xa9"}\n')
    check_input(source)
    rows = rows_of(source)
    assert [r.prompt for r in rows] == ["a", None, "\u00e9t\u00e9"]
    assert "invalid JSON on line 2" in rows[1].error


# --- image_root confinement ----------------------------------------------------------------------


def test_image_root_confines_paths_including_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inside = save_image(root / "in.png")
    outside = save_image(tmp_path / "secret" / "out.png")
    os.symlink(outside, root / "escape.png")
    os.symlink(inside, root / "alias.png")
    os.symlink(tmp_path / "secret", root / "dirlink")
    source = write_jsonl(
        root / "rows.jsonl",
        [
            {"image": "in.png"},
            {"image": "alias.png"},
            {"image": str(inside)},
            {"image": "escape.png"},
            {"image": "../secret/out.png"},
            {"image": str(outside)},
            {"image": "dirlink/out.png"},
        ],
    )
    rows = rows_of(source, prompt_template="p", image_root=root)
    assert [r.error is None for r in rows] == [True] * 3 + [False] * 4
    assert all(r.image == ImageRef(path=str(inside.resolve())) for r in rows[:3])
    for row in rows[3:]:
        assert "outside --image-root" in row.error and row.image is None
    # without confinement the same rows are fine
    assert all(r.error is None for r in rows_of(source, prompt_template="p"))


def test_image_path_that_is_not_valid_unicode_is_the_rows_error(tmp_path: Path) -> None:
    """A JSON "\\ud800" escape in an image path names no file (no file system takes a lone
    surrogate): with --image-root, resolving it must make the row an error, not stop the
    reader (which ended the job with exit 4 at that row, every time it was run)."""
    root = tmp_path / "root"
    save_image(root / "in.png")
    source = root / "rows.jsonl"
    source.write_text('{"image": "a\\ud800b.png"}\n{"image": "in.png"}\n', encoding="utf-8")
    for options in ({"image_root": root}, {}):
        rows = rows_of(source, prompt_template="p", **options)
        assert len(rows) == 2 and rows[1].error is None
        assert "not valid Unicode" in rows[0].error and rows[0].image is None


# --- images ---------------------------------------------------------------------------------------


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def bilevel_png(width: int, height: int, valid_pixels: bool = True) -> bytes:
    """A 1-bit black PNG: tiny on disk whatever its size (a decompression bomb when huge)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    if valid_pixels:
        compressor = zlib.compressobj(9)
        row = b"\x00" * (1 + (width + 7) // 8)
        pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:
        pixels = b"garbage, never decoded"
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


def truncated_jpeg() -> bytes:
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def test_image_errors_for_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "folder.png").mkdir()
    cases = {
        "missing.png": "not found",
        "empty.png": r"empty \(0 bytes\)",
        "text.jpg": "not an image",
        "folder.png": "is a folder",
    }
    for name, needle in cases.items():
        ref = ImageRef(path=str(tmp_path / name))
        for read in (image_size, load_image):
            with pytest.raises(ImageError, match=needle) as info:
                read(ref, LIMIT)
            assert name in str(info.value)
    cut = ImageRef(path=str(tmp_path / "cut.jpg"))
    assert image_size(cut, LIMIT) == (64, 64)  # the header is intact ...
    with pytest.raises(ImageError, match="truncated"):  # ... the pixels are not
        load_image(cut, LIMIT)


def test_image_errors_for_bad_bytes() -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image(ImageRef(data=b""), LIMIT)
    with pytest.raises(ImageError, match="not an image"):
        image_size(ImageRef(data=b"hello"), LIMIT)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(ImageRef(data=bilevel_png(10, 10, valid_pixels=False)), LIMIT)


def test_pixel_limit_refuses_before_decoding(tmp_path: Path) -> None:
    # Garbage pixel data: decoding would fail differently, so the limit must come first.
    big = ImageRef(data=bilevel_png(3000, 3000, valid_pixels=False))
    for read in (image_size, load_image):
        with pytest.raises(ImageError, match="3000x3000 = 9,000,000 pixels, over the pixel limit"):
            read(big, 1_000_000)
    with pytest.raises(ImageError, match=r"a higher --max-image-pixels is another job \(--over"):
        image_size(big, 1_000_000)  # says why --retry-errors with a higher limit is refused
    assert image_size(ImageRef(data=bilevel_png(3000, 3000)), 9_000_000) == (3000, 3000)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bilevel_png(20_000, 20_000))  # 400 Mpx, about 60 KB on disk
    assert bomb.stat().st_size < 200_000
    ref = ImageRef(path=str(bomb))
    tracemalloc.start()
    try:
        for read in (image_size, load_image):
            with pytest.raises(ImageError, match="pixel limit") as info:
                read(ref, LIMIT)
            assert "bomb.png" in str(info.value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # decoding would take 50 MB (1 bit/px) or 1.2 GB as RGB


def test_a_pixel_limit_above_pillows_own_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses images over twice its process-wide ``MAX_IMAGE_PIXELS`` by itself;
    ``allow_pixels`` (called by run_job) raises it to --max-image-pixels, never lowers it."""
    from jobrunner.readers import allow_pixels

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # refuses above 2M
    header = ImageRef(data=bilevel_png(2000, 1500, valid_pixels=False))  # 3M
    with pytest.raises(ImageError, match="max_image_pixels"):
        image_size(header, 4_000_000)
    allow_pixels(4_000_000)
    assert image_size(header, 4_000_000) == (2000, 1500)
    allow_pixels(10)
    assert Image.MAX_IMAGE_PIXELS == 4_000_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # turned off by someone: left off
    allow_pixels(10)
    assert Image.MAX_IMAGE_PIXELS is None


def test_load_image_decodes_without_exif_rotation(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 4), "green")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise"
    path = tmp_path / "rot.jpg"
    image.save(path, "JPEG", exif=exif.tobytes())
    loaded = load_image(ImageRef(path=str(path)), LIMIT)
    assert loaded.size == (8, 4)
    assert loaded.getpixel((0, 0))[1] > 100  # pixels are really decoded


# --- streaming and duplicates ---------------------------------------------------------------------


def blocks_growth(rows: Iterator[Row], check_every: int = 1000) -> tuple[int, Row]:
    """Most live Python memory blocks gained while iterating (checked every ``check_every`` rows).

    ``sys.getallocatedblocks`` is exact and, unlike tracemalloc, costs nothing per allocation.
    Rows hold no reference cycles, so reference counting alone frees the ones already seen.
    """
    before = sys.getallocatedblocks()
    growth, row = 0, None
    for count, row in enumerate(rows, start=1):  # noqa: B007 - the last row is returned
        if count % check_every == 0:
            growth = max(growth, sys.getallocatedblocks() - before)
    return growth, row


def test_jsonl_streams_without_materialising(tmp_path: Path) -> None:
    source = tmp_path / "big.jsonl"
    with source.open("w") as fh:
        for i in range(100_000):
            fh.write(f'{{"id": "r{i}", "image": "img/{i % 50}.png", "prompt": "Describe {i}"}}\n')
    growth, last = blocks_growth(iter_rows(source))
    assert last.index == 99_999 and last.id == "r99999"
    assert growth < 5_000  # keeping the rows would add several blocks per row (> 500,000)


def test_parquet_streams_without_materialising(tmp_path: Path) -> None:
    source = tmp_path / "big.parquet"
    n = 100_000
    table = pa.table({"id": [f"r{i}" for i in range(n)], "prompt": ["Say something " * 8] * n})
    pq.write_table(table, source, row_group_size=5_000)
    del table
    arrow_before = pa.total_allocated_bytes()
    arrow_peak = 0

    def watched():
        nonlocal arrow_peak
        for row in iter_rows(source):
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_before)
            yield row

    growth, last = blocks_growth(watched())
    assert last.index == n - 1 and last.id == f"r{n - 1}"
    assert growth < 5_000
    assert arrow_peak < 4_000_000  # about one row group, not the whole 100k-row table


def test_tracemalloc_peak_while_streaming(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    write_jsonl(source, [{"id": f"r{i}", "prompt": "x" * 200} for i in range(20_000)])
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_rows(source))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20_000
    assert peak < 1_000_000  # the rows held at once would take well over 5 MB


def test_duplicate_id_tracker() -> None:
    tracker = DuplicateIdTracker()
    assert tracker.warning() is None
    flags = [tracker.add(i) for i in ["a", "b", "a", "c", "b", "a"]]
    assert flags == [False, False, True, False, True, True]
    assert tracker.duplicates == 3 and tracker.first_duplicate == "a"
    assert "3 row(s)" in tracker.warning() and "'a'" in tracker.warning()


def test_duplicate_id_tracker_memory_does_not_grow_with_id_length() -> None:
    """The tracker holds one entry per row of the shard: not the ids themselves, which can
    be long (2,000 ids of 5,000 characters are 10 MB)."""
    tracker = DuplicateIdTracker()
    tracemalloc.start()
    try:
        for i in range(2000):  # each id dropped once added, as the runner's rows are
            tracker.add(f"{i}-" + "k" * 5000)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1_000_000
    assert tracker.add("7-" + "k" * 5000) and tracker.first_duplicate == "7-" + "k" * 5000
    assert not tracker.add("\ud800")  # a lone surrogate (JSON's escape) is an id too
    assert tracker.add("\ud800") and tracker.duplicates == 2


def test_parquet_whole_float_ids_are_integers(tmp_path: Path) -> None:
    """pandas stores integer ids with gaps as floats: 7.0 is the id 7, NaN and null are
    missing (the row number); a fraction is still an error."""
    ids = pa.array([7.0, None, float("nan"), 12.0, 2.5])
    source = parquet_with(tmp_path, id=ids, prompt=["p"] * 5)
    check_input(source)
    rows = rows_of(source)
    assert [r.id for r in rows] == ["7", "1", "2", "12", "4"]
    assert [r.error is None for r in rows] == [True] * 4 + [False]
    assert "id column 'id' must hold whole numbers, got 2.5" in rows[4].error
    # SQL exports write integer keys as decimal(p, 0)
    import decimal

    ids = pa.array([decimal.Decimal(7), decimal.Decimal("12.50")], pa.decimal128(10, 2))
    source = parquet_with(tmp_path, id=ids, prompt=["p"] * 2)
    check_input(source)
    rows = rows_of(source)
    assert [r.id for r in rows] == ["7", "1"] and "got 12.50" in rows[1].error


def test_a_prompt_column_of_nulls_only_is_refused(tmp_path: Path) -> None:
    source = parquet_with(tmp_path, prompt=pa.array([None, None], pa.null()))
    with pytest.raises(ReaderConfigError, match="the prompt column 'prompt' holds null"):
        check_input(source)
    check_input(source, ReadOptions(prompt_template="Describe."))  # not read then


def test_a_kept_value_does_not_hold_its_whole_record_batch(tmp_path: Path) -> None:
    """Rows are held for planning (a sort window): a kept list or string must not keep the
    256-row batch it was read from in memory (a shard keeping 1 row in N held N times its
    rows' data)."""
    import gc

    source = tmp_path / "rows.parquet"
    vectors = pa.array([[float(i)] * 10_000 for i in range(256)], pa.list_(pa.float32()))
    texts = pa.array(["t" * 40_000 + str(i) for i in range(256)])
    pq.write_table(pa.table({"prompt": ["p"] * 256, "v": vectors, "s": texts}), source)
    gc.collect()
    before = pa.total_allocated_bytes()
    held = [row.extra for row in rows_of(source, keep_columns=("v", "s"))][::64]  # 4 rows
    gc.collect()
    grown = pa.total_allocated_bytes() - before
    assert [extra["v"].as_py()[0] for extra in held] == [0.0, 64.0, 128.0, 192.0]
    assert held[1]["s"].as_py() == "t" * 40_000 + "64"
    assert grown < 4 * (40_000 + 10_000 * 4) + 2**20  # the 4 rows, not the 20 MB batch


def test_dictionary_encoded_image_columns_are_accepted(tmp_path: Path) -> None:
    for images in (pa.array([b"x", b"y"]), pa.array(["a.png", "b.png"])):
        source = parquet_with(tmp_path, image=images.dictionary_encode(), prompt=["p", "q"])
        check_input(source)


def test_decimal_ids_of_any_size(tmp_path: Path) -> None:
    import decimal

    ids = pa.array([decimal.Decimal(10**30), decimal.Decimal("0.5")], pa.decimal256(70, 30))
    source = parquet_with(tmp_path, id=ids, prompt=["p"] * 2)
    rows = rows_of(source)
    assert rows[0].id == str(10**30) and rows[0].error is None
    assert "must hold whole numbers" in rows[1].error


def test_rows_another_shard_owns_are_not_built(tmp_path: Path, monkeypatch) -> None:
    """A shard reads the whole input but builds only its own rows (ids, paths, prompts): each
    of N shards built every row, N times the reading work of one run. Indices keep their
    place, invalid lines included."""
    from jobrunner import readers

    lines = [json.dumps({"id": f"r{i}", "prompt": "p"}) for i in range(9)]
    lines[4] = "{not json"
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(lines) + "\n\n")
    built = []
    make_row = readers._make_row

    def counting(index, *args):
        built.append(index)
        return make_row(index, *args)

    monkeypatch.setattr(readers, "_make_row", counting)
    rows = list(iter_rows(source, ReadOptions(), wanted=lambda i: i % 3 == 1))
    assert [r.index for r in rows] == [1, 4, 7] and built == [1, 7]
    assert [r.id for r in rows] == ["r1", "4", "r7"] and rows[1].error.startswith("invalid JSON")
