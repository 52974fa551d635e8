"""`jobrunner run` end to end on a tiny model: input kinds, bad rows, ordering, exactness."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from jobrunner.cli import main
from model.generate import GenerationParams, generate_batch
from model.loading import load

MAX_TOKENS = 6


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Eight good rows (images of mixed sizes, some text-only) as JSONL."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    sizes = [(60, 200), (300, 80), (10, 7), (90, 90), None, (400, 120), None, (33, 250)]
    rows = []
    for i, size in enumerate(sizes):
        row = {"id": f"row-{i}", "prompt": "Describe the picture." + " Be brief." * (i % 3)}
        if size:
            write_image(root / "images" / f"{i}.png", *size, seed=i)
            row["image"] = f"images/{i}.png"
        rows.append(row)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", *args, "--quiet"], catch_exceptions=False)
    return result.exit_code, result.output


def run_to(source: Path, model_dir: Path, output: Path, *flags: str) -> tuple[int, str]:
    """``jobrunner run`` of ``source`` on ``model_dir`` into ``output``, with ``flags``."""
    return run(str(source), "--model", str(model_dir), "--output", str(output), *flags)


def run_in_threes(dataset: Path, model_dir: Path, output: Path) -> tuple[int, str]:
    """``jobrunner run`` of ``dataset`` in batches of three, ``MAX_TOKENS`` tokens a row."""
    return run(
        str(dataset), "--model", str(model_dir), "--output", str(output),
        "--max-tokens", str(MAX_TOKENS), "--batch-size", "3",
    )  # fmt: skip


def read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def expected(tiny_model_dir, dataset) -> dict[str, str]:
    """What each row gives when generated alone, straight through the model API."""
    model, processor = load(str(tiny_model_dir))
    out = {}
    for line in dataset.read_text().splitlines():
        row = json.loads(line)
        image = Image.open(dataset.parent / row["image"]) if "image" in row else None
        prepared = processor.prepare(row["prompt"], image)
        result = generate_batch(model, processor, [prepared], GenerationParams(MAX_TOKENS))
        out[row["id"]] = result[0].text
    return out


def test_jsonl_run_equals_rows_generated_alone(tiny_model_dir, dataset, expected, tmp_path):
    output = tmp_path / "out.parquet"
    code, text = run_in_threes(dataset, tiny_model_dir, output)
    assert code == 0, text
    rows = read(output)
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(8)]
    assert {r["id"]: r["output"] for r in rows} == expected
    assert all(r["finish_reason"] == "length" and r["output_tokens"] == MAX_TOKENS for r in rows)
    meta = json.loads(pq.read_schema(output).metadata[b"jobrunner"])
    assert meta["spec"]["max_tokens"] == MAX_TOKENS and meta["fingerprint"]
    # what the fingerprint covers, from the manifest (the runner's metadata used to blank it)
    assert meta["fingerprint_fields"]["max_tokens"] == MAX_TOKENS
    assert meta["fingerprint_fields"]["model_identity"]["weights"]
    summary = json.loads(output.with_name("out.parquet.summary.json").read_text())
    assert summary["rows_ok"] == 8 and summary["rows_error"] == 0
    assert 0 <= summary["padding_fraction"] < 1 and summary["generated_tokens"] == 8 * MAX_TOKENS


@pytest.mark.parametrize("failing", [None, "prefill", "join"])
def test_rows_that_stop_early_make_room_for_the_next_rows(
    tiny_model_dir, dataset, tmp_path, monkeypatch, failing
):
    """Rows that stop early leave the batch and the next planned rows take their slots while
    the others run on (continuous batching); every row still gets what it gets alone. Rows
    whose prefill fails as they join run one by one after the batch they were joining, whose
    rows are not run again; if joining itself fails, the batch's rows run one by one too."""
    import model.loading
    from jobrunner import runner
    from model.generate import Decoder

    tiny, processor = load(str(tiny_model_dir))
    lines = [json.loads(line) for line in dataset.read_text().splitlines()]
    prepared = [
        processor.prepare(
            r["prompt"], Image.open(dataset.parent / r["image"]) if "image" in r else None
        )
        for r in lines
    ]
    params = GenerationParams(MAX_TOKENS)
    free = [generate_batch(tiny, processor, [row], params)[0].token_ids for row in prepared]
    stops = {free[0][1], free[3][3], free[5][0]}  # a few rows stop at different steps
    processor.stop_token_ids |= stops
    alone = {
        r["id"]: generate_batch(tiny, processor, [row], params)[0]
        for r, row in zip(lines, prepared, strict=True)
    }
    assert len({result.output_tokens for result in alone.values()}) > 2

    real_load = model.loading.load

    def load_with_stops(*args, **kwargs):
        loaded, loaded_processor = real_load(*args, **kwargs)
        loaded_processor.stop_token_ids |= stops
        return loaded, loaded_processor

    monkeypatch.setattr(model.loading, "load", load_with_stops)
    alone_runs = []
    if failing:
        real_part, real_generate = getattr(Decoder, failing), runner._Session._generate

        def failing_part(self, items):
            if self.active:  # rows joining running rows
                raise RuntimeError("out of memory")
            return real_part(self, items)

        def counting_generate(self, ready):
            if failing == "prefill":  # once the batch they were joining is done
                assert not self.running
            alone_runs.extend(row.id for row, _ in ready)
            return real_generate(self, ready)

        monkeypatch.setattr(Decoder, failing, failing_part)
        monkeypatch.setattr(runner._Session, "_generate", counting_generate)
    output = tmp_path / "out.parquet"
    code, text = run_in_threes(dataset, tiny_model_dir, output)
    assert code == 0, text
    got = {r["id"]: r for r in read(output)}
    assert {i: r["output"] for i, r in got.items()} == {i: r.text for i, r in alone.items()}
    assert {i: r["finish_reason"] for i, r in got.items()} == {
        i: r.finish_reason for i, r in alone.items()
    }
    summary = json.loads(output.with_name("out.parquet.summary.json").read_text())
    if not failing:
        assert summary["rows_joined_running"] > 0
        return
    assert summary["rows_joined_running"] == 0
    assert alone_runs and len(set(alone_runs)) == len(alone_runs)  # each row alone once at most
    if failing == "prefill":  # only rows that tried to join ran alone, never the first batch's
        assert len(alone_runs) < len(lines) - 2
    else:  # the first batch's rows ran alone too
        assert len(alone_runs) > len(lines) - 3


def test_rows_own_token_limits_from_a_column(tiny_model_dir, dataset, tmp_path):
    """``--max-tokens-column``: each row generates at most its own limit, what it would alone
    under that limit, and rows that leave early make room for the next ones; a limit that is
    not a whole number from 1 to ``--max-tokens`` makes its row an error record."""
    tiny, processor = load(str(tiny_model_dir))
    limits = [2, None, 6, 1, "many", 4, 0, 3]
    lines = [json.loads(line) for line in dataset.read_text().splitlines()]
    source = tmp_path / "limits.jsonl"
    with source.open("w") as fh:
        for row, limit in zip(lines, limits, strict=True):
            image = str(dataset.parent / row["image"]) if "image" in row else None
            fh.write(json.dumps({**row, "image": image, "limit": limit}) + "\n")
    output = tmp_path / "out.parquet"
    flags = ["--max-tokens", str(MAX_TOKENS), "--batch-size", "3", "--max-tokens-column", "limit"]
    code, text = run_to(source, tiny_model_dir, output, *flags)
    assert code == 1, text  # rows with bad limits are error records
    got = read(output)
    for row, limit, result in zip(lines, limits, got, strict=True):
        if limit in ("many", 0):
            assert result["finish_reason"] == "error" and result["output"] is None
            assert "max tokens column 'limit'" in result["error"], result["error"]
            continue
        image = Image.open(dataset.parent / row["image"]) if "image" in row else None
        prepared = processor.prepare(row["prompt"], image)
        params = GenerationParams(limit or MAX_TOKENS)
        alone = generate_batch(tiny, processor, [prepared], params)[0]
        assert (result["output"], result["output_tokens"]) == (alone.text, limit or MAX_TOKENS)
    summary = json.loads(output.with_name("out.parquet.summary.json").read_text())
    assert summary["rows_joined_running"] > 0
    meta = json.loads(pq.read_schema(output).metadata[b"jobrunner"])
    assert meta["fingerprint_fields"]["max_tokens_column"] == "limit"


@pytest.mark.parametrize(("static", "max_tokens"), [(False, 250), (True, 200)])
def test_default_batches_keep_their_kv_cache_within_memory(
    tiny_model_dir, tmp_path, monkeypatch, static, max_tokens
):
    """Without --max-batch-tokens, a batch's KV cache (whole 256-position blocks: the longest
    prompt, bucketed to 128 under static shapes, plus max_tokens) must fit in half the memory
    left beside the model and its caches: here 1,100 positions, so two short rows (512 each,
    only through max_tokens or the bucket) or the long row alone (768) per batch. Short rows
    that ask for 8 tokens each (--max-tokens-column) take 256 positions: four to a batch."""
    from mlx.utils import tree_flatten

    import model.generate
    from model.cache import KVCache

    tiny, processor = load(str(tiny_model_dir))
    long_prompt = "Describe the red circle on the left. " * 30
    assert 255 <= processor.estimate_tokens(long_prompt, None) <= 510
    prompts = [long_prompt] + [f"Say {i} now." for i in range(7)]  # 14-15 tokens
    source = tmp_path / "rows.jsonl"
    limits = [None] + [8] * 7
    rows = [{"prompt": p, "limit": k} for p, k in zip(prompts, limits, strict=True)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    weights = sum(v.nbytes for _, v in tree_flatten(tiny.parameters()))
    caches = (1 << 30) + (256 << 20)  # the prefix cache's 1 GiB floor, the feature cache
    memory = weights + caches + 2 * 1100 * model.generate.kv_bytes_per_token(tiny)
    monkeypatch.setattr(model.generate, "device_memory_bytes", lambda: memory)
    monkeypatch.setattr(model.generate, "static_shapes", lambda params: static)
    allocated = []  # positions of each KV allocation, all its rows
    grow = KVCache._grow

    def recording_grow(self, keys, values, needed, batch=0):
        allocated.append((batch or keys.shape[0]) * self._size_for(needed))
        grow(self, keys, values, needed, batch)

    monkeypatch.setattr(KVCache, "_grow", recording_grow)
    summaries, outputs, peaks = [], [], []
    for extra in ([], ["--max-batch-tokens", "16384"], ["--max-tokens-column", "limit"]):
        allocated.clear()
        output = tmp_path / f"out{len(summaries)}.parquet"
        args = ["run", str(source), "--model", str(tiny_model_dir), "--output", str(output)]
        result = CliRunner().invoke(main, [*args, "--max-tokens", str(max_tokens), *extra])
        assert result.exit_code == 0, result.output
        assert ("KV cache within 1100 positions" in result.output) == ("16384" not in extra)
        summaries.append(json.loads(output.with_name(output.name + ".summary.json").read_text()))
        outputs.append([r["output"] for r in read(output)])
        peaks.append(max(allocated))
    assert summaries[0]["kv_positions_limit"] == 1100 and summaries[0]["batches"] == 5
    assert peaks[0] <= 1100
    assert summaries[1]["kv_positions_limit"] is None and summaries[1]["batches"] == 1
    assert peaks[1] > 1100  # an explicit budget is not held to memory
    assert outputs[0] == outputs[1]
    assert summaries[2]["batches"] == 3 and peaks[2] <= 1100  # the long row, then 4 + 3
    assert [r["output_tokens"] for r in read(output)][1:] == [8] * 7


def test_rows_beyond_the_context_or_memory_are_error_records_not_a_crash(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A row whose prompt and token limit exceed the model's context, or whose KV cache alone
    would not fit in memory, is an error record (allocating it could kill the process); a
    --max-tokens that leaves no room for any prompt is refused before anything is written."""
    from mlx.utils import tree_flatten

    import model.generate

    tiny, processor = load(str(tiny_model_dir))
    context = tiny.config.max_position_embeddings
    long_prompt = "Describe the red circle on the left. " * 30  # 255-510 tokens
    rows = [
        {"id": "long", "prompt": long_prompt, "n": 256},  # 768 KV positions
        {"id": "short", "prompt": "Say one.", "n": 256},  # 512
        {"id": "huge", "prompt": "Say two."},  # --max-tokens: past the context
    ]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    weights = sum(v.nbytes for _, v in tree_flatten(tiny.parameters()))
    caches = (1 << 30) + (256 << 20)  # the prefix cache's 1 GiB floor, the feature cache
    memory = weights + caches + 600 * model.generate.kv_bytes_per_token(tiny)  # one row: all
    monkeypatch.setattr(model.generate, "device_memory_bytes", lambda: memory)
    for budget in ([], ["--max-batch-tokens", "100000"]):  # a budget of one's own too
        output = tmp_path / f"out{len(budget)}.parquet"
        code, text = run_to(
            source, tiny_model_dir, output, "--max-tokens", str(context - 1),
            "--max-tokens-column", "n", "--temperature", "0", *budget,
        )  # fmt: skip
        assert code == 1, text
        got = {r["id"]: r for r in read(output)}
        assert got["short"]["error"] is None
        assert "exceed the model's context" in got["huge"]["error"]
        assert "fit in this machine's memory" in got["long"]["error"]
        assert "600" in got["long"]["error"]
        assert "lower --max-tokens" in got["long"]["error"]
    output = tmp_path / "none.parquet"
    code, text = run_to(source, tiny_model_dir, output, "--max-tokens", str(context))
    assert code == 2 and "leaves no room for a prompt" in text, text
    assert not output.with_name(output.name + ".parts").exists()
    # with per-row limits, --max-tokens is only their cap: the rows are checked one by one
    code, text = run_to(
        source, tiny_model_dir, output, "--max-tokens", str(context), "--max-tokens-column", "n"
    )
    assert code == 1, text
    assert "exceed the model's context" in {r["id"]: r for r in read(output)}["huge"]["error"]


def test_prompts_sharing_an_image_prefill_it_once(tiny_model_dir, tmp_path):
    """Several questions per image: the prompt up to the image is reused from the prefix
    cache, across batches, and every row still gets what it gets alone."""
    write_image(tmp_path / "a.png", 120, 90, seed=1)
    write_image(tmp_path / "b.png", 40, 300, seed=2)
    questions = ["Caption.", "What colour is the sky in this picture?", "How many people?"]
    rows = [
        {"id": f"{name}-{q}", "image": f"{name}.png", "prompt": question}
        for name in ("a", "b")
        for q, question in enumerate(questions)
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, processor = load(str(tiny_model_dir))
    alone = {}
    for row in rows:
        prepared = processor.prepare(row["prompt"], Image.open(tmp_path / row["image"]))
        alone[row["id"]] = generate_batch(model, processor, [prepared], GenerationParams(4))[0].text
    output = tmp_path / "qa.parquet"
    code, text = run(
        str(tmp_path / "qa.jsonl"), "--model", str(tiny_model_dir), "--output", str(output),
        "--max-tokens", "4", "--batch-size", "2",
    )  # fmt: skip
    assert code == 0, text
    assert {r["id"]: r["output"] for r in read(output)} == alone
    summary = json.loads(output.with_name("qa.parquet.summary.json").read_text())
    assert summary["prefix_hits"] == 4  # two images, three prompts each


@pytest.mark.parametrize(("flag", "hits"), [(None, 3), ("--no-group-images", 0)])
def test_rows_of_one_image_run_together_so_a_small_prefix_cache_still_hits(
    tiny_model_dir, tmp_path, monkeypatch, flag, hits
):
    """Three images of one size, a short and a long prompt each: a plain length sort runs the
    three long rows, then the three short ones, so a cache holding one prefix never hits. The
    planner keeps each image's rows together, so each image's second row finds its prefix."""
    from model.cache import PrefixCache
    from model.generate import kv_bytes_per_token, prompt_prefix

    for seed, name in enumerate("abc"):
        write_image(tmp_path / f"{name}.png", 64, 48, seed=seed)
    prompts = ["Caption.", "Describe every object in this picture, one by one, in detail."]
    rows = [
        {"id": f"{name}-{p}", "image": f"{name}.png", "prompt": prompt}
        for p, prompt in enumerate(prompts)
        for name in "abc"
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, processor = load(str(tiny_model_dir))
    prepared = processor.prepare(prompts[0], Image.open(tmp_path / "a.png"))
    one_prefix = prompt_prefix(prepared)[0] * kv_bytes_per_token(model)
    monkeypatch.setattr(
        PrefixCache, "for_memory", classmethod(lambda cls, *memory: cls(one_prefix * 3 // 2))
    )
    output = tmp_path / "qa.parquet"
    code, text = run(
        str(tmp_path / "qa.jsonl"), "--model", str(tiny_model_dir), "--output", str(output),
        "--max-tokens", "2", "--batch-size", "2", *([flag] if flag else []),
    )  # fmt: skip
    assert code == 0, text
    assert sorted(r["id"] for r in read(output)) == sorted(r["id"] for r in rows)
    summary = json.loads(output.with_name("qa.parquet.summary.json").read_text())
    assert summary["prefix_hits"] == hits


def test_parquet_with_bytes_and_template(tiny_model_dir, dataset, expected, tmp_path):
    records = [json.loads(line) for line in dataset.read_text().splitlines()]
    table = pa.table(
        {
            "key": [r["id"] for r in records],
            "picture": [
                (dataset.parent / r["image"]).read_bytes() if "image" in r else None
                for r in records
            ],
            "question": [r["prompt"] for r in records],
        }
    )
    source = tmp_path / "data.parquet"
    pq.write_table(table, source)
    output = tmp_path / "out.parquet"
    columns = ["--id-column", "key", "--image-column", "picture", "--keep-columns", "question"]
    flags = [*columns, "--prompt", "{question}", "--max-tokens", str(MAX_TOKENS)]
    code, text = run_to(source, tiny_model_dir, output, *flags)
    assert code == 0, text
    rows = read(output)
    assert {r["id"]: r["output"] for r in rows} == expected
    assert [r["question"] for r in rows] == [r["prompt"] for r in records]


def test_huggingface_datasets_image_struct(tiny_model_dir, dataset, expected, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [json.loads(line) for line in dataset.read_text().splitlines()]
    with_image = [r for r in records if "image" in r]
    ds = datasets.Dataset.from_dict(
        {
            "id": [r["id"] for r in with_image],
            "image": [str(dataset.parent / r["image"]) for r in with_image],
            "prompt": [r["prompt"] for r in with_image],
        }
    ).cast_column("image", datasets.Image())
    source = tmp_path / "hf.parquet"
    ds.to_parquet(str(source))
    output = tmp_path / "out.parquet"
    code, text = run_to(source, tiny_model_dir, output, "--max-tokens", str(MAX_TOKENS))
    assert code == 0, text
    assert {r["id"]: r["output"] for r in read(output)} == {
        r["id"]: expected[r["id"]] for r in with_image
    }


def bad_rows(root: Path) -> list[tuple[str, str]]:
    """(JSONL line, fragment the error must contain) for every bad-input case."""
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    good = write_image(root / "good.png", 80, 60, seed=1)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(buffer, "JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.new("1", (20000, 20000)).save(root / "bomb.png")
    os.mkfifo(root / "fifo.png")  # reading it would block: refused from its file type
    return [
        (json.dumps({"id": "missing", "image": "nope.png", "prompt": "x"}), "not found"),
        (json.dumps({"id": "zero", "image": "zero.png", "prompt": "x"}), "empty"),
        (json.dumps({"id": "text", "image": "text.png", "prompt": "x"}), "not an image"),
        (json.dumps({"id": "trunc", "image": "truncated.jpg", "prompt": "x"}), "truncated"),
        (json.dumps({"id": "bomb", "image": "bomb.png", "prompt": "x"}), "pixels"),
        ("{broken json", "invalid JSON"),
        (json.dumps({"id": "type", "image": 5, "prompt": "x"}), "image"),
        (json.dumps({"id": "prompt", "image": good.name, "prompt": ["x"]}), "prompt"),
        (json.dumps({"id": "tags", "prompt": "see <|image_2|>"}), "image tag"),
        (
            json.dumps({"id": "uri", "image": "data:image/png;base64,iVBORw0KGgo=", "prompt": "x"}),
            "is a data: URI",
        ),
        (
            json.dumps({"id": "b64", "image": "iVBORw0KGgo/" + "AAAA" * 80, "prompt": "x"}),
            "longer than any file name can be (base64 text?)",
        ),
        (json.dumps({"id": "nul", "image": "a\u0000b.png", "prompt": "x"}), "NUL byte"),
        (json.dumps({"id": "fifo", "image": "fifo.png", "prompt": "x"}), "not a regular file"),
    ]


def test_bad_inputs_become_error_rows_and_others_survive(tiny_model_dir, tmp_path, expected):
    cases = bad_rows(tmp_path)
    good = json.dumps({"id": "ok", "image": "good.png", "prompt": "Describe the picture."})
    lines = [good] + [line for line, _ in cases] + [good.replace('"ok"', '"ok2"')]
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.parquet"
    flags = ["--max-tokens", str(MAX_TOKENS), "--max-image-pixels", "100000000"]
    code, text = run_to(source, tiny_model_dir, output, *flags)
    assert code == 1, text  # the job ran; some rows are error records
    rows = read(output)
    assert len(rows) == len(lines)
    assert rows[0]["finish_reason"] == "length" and rows[-1]["finish_reason"] == "length"
    assert rows[0]["output"] == rows[-1]["output"]
    for row, (_, fragment) in zip(rows[1:-1], cases, strict=True):
        assert row["finish_reason"] == "error" and row["output"] is None
        assert fragment.lower() in row["error"].lower(), (row["id"], row["error"])


def test_duplicate_ids_warn_once_and_keep_every_row(tiny_model_dir, tmp_path):
    source = tmp_path / "dup.jsonl"
    source.write_text(
        "".join(json.dumps({"id": "same", "prompt": f"p{i}"}) + "\n" for i in range(3))
    )
    output = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        main,
        ["run", str(source), "--model", str(tiny_model_dir), "--output", str(output),
         "--max-tokens", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("repeat an id") == 1
    assert [r["id"] for r in read(output)] == ["same"] * 3


def test_misspelt_id_or_kept_column_warns(tiny_model_dir, tmp_path):
    """JSONL rows may leave out any column, so a misspelt --id-column or --keep-columns name is
    no error; the run ends with a warning for each name no row had."""
    source = tmp_path / "rows.jsonl"
    rows = [{"key": f"k{i}", "note": f"n{i}", "prompt": "Hi."} for i in range(3)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for extra, warned in (
        (["--id-column", "keys", "--keep-columns", "notes"], True),
        (["--id-column", "key", "--keep-columns", "note"], False),
    ):
        output = tmp_path / f"out{warned}.parquet"
        code, text = run_to(source, tiny_model_dir, output, "--max-tokens", "2", *extra)
        assert code == 0, text
        assert ("no row had a value in column 'keys' (from --id-column" in text) == warned
        assert ("so ids are row numbers" in text) == warned
        assert ("no row had a value in column 'notes' (from --keep-columns" in text) == warned
    assert [r["id"] for r in read(output)] == ["k0", "k1", "k2"]


def test_run_warnings_are_shown_after_many_row_errors_even_when_quiet(tiny_model_dir, tmp_path):
    """The row errors shown one by one are capped (MAX_ROW_ERRORS); warnings about the whole
    run come after them and must not be swallowed by that cap."""
    from jobrunner.progress import MAX_ROW_ERRORS

    source = tmp_path / "rows.jsonl"
    lines = [json.dumps({"id": "same", "prompt": f"p{i}"}) for i in range(3)]
    lines += ["{not json"] * (MAX_ROW_ERRORS + 1)
    source.write_text("\n".join(lines) + "\n")
    code, text = run_to(
        source, tiny_model_dir, tmp_path / "out.parquet", "--max-tokens", "2",
        "--image-column", "img", "--max-tokens-column", "limit",
    )  # fmt: skip
    assert code == 1, text
    assert "further row errors are not shown one by one" in text
    assert text.count("repeat an id") == 1
    assert "no row had an image in column 'img'" in text
    assert "no row had a value in column 'limit'" in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["missing.jsonl"], "input"),
        (["DATA", "--batch-size", "0"], "batch_size"),
        (["DATA", "--temperature", "-1"], "temperature"),
        (["DATA", "--model", "/no/such/model"], "model directory not found"),
        (["DATA", "--shard", "3/2"], "shard"),
        (["DATA", "--quantize", "3"], "quantize"),
    ],
)
def test_configuration_errors_exit_2_without_traceback(tiny_model_dir, dataset, args, fragment):
    args = [str(dataset) if a == "DATA" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in result.output


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch_size=st.integers(1, 9), window=st.integers(1, 10), tokens=st.integers(8, 400))
def test_output_in_input_order_each_row_once(
    tiny_model_dir, dataset, expected, tmp_path_factory, batch_size, window, tokens
):
    output = tmp_path_factory.mktemp("order") / "out.parquet"
    code, text = run(
        str(dataset), "--model", str(tiny_model_dir), "--output", str(output),
        "--max-tokens", str(MAX_TOKENS), "--batch-size", str(batch_size),
        "--sort-window", str(window), "--max-batch-tokens", str(tokens),
    )  # fmt: skip
    assert code == 0, text
    rows = read(output)
    assert [r["row_index"] for r in rows] == list(range(8))
    assert {r["id"]: r["output"] for r in rows} == expected


def test_finished_job_is_a_no_op(tiny_model_dir, dataset, tmp_path):
    output = tmp_path / "out.parquet"
    args = [str(dataset), "--model", str(tiny_model_dir), "--output", str(output)]
    assert run(*args, "--max-tokens", "2")[0] == 0
    before = output.stat().st_mtime_ns
    result = CliRunner().invoke(main, ["run", *args, "--max-tokens", "2"])
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert output.stat().st_mtime_ns == before


def test_a_file_that_is_not_this_jobs_output_is_never_replaced_without_overwrite(
    tiny_model_dir, dataset, tmp_path
):
    import shutil

    output = tmp_path / "out.parquet"
    # a finished job whose checkpoint was removed: its output is recognised, nothing runs
    assert run_to(dataset, tiny_model_dir, output, "--max-tokens", "2")[0] == 0
    shutil.rmtree(tmp_path / "out.parquet.parts")
    before = output.read_bytes()
    args = [str(dataset), "--model", str(tiny_model_dir), "--output", str(output)]
    result = CliRunner().invoke(main, ["run", *args, "--max-tokens", "2"])
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert output.read_bytes() == before
    # another job (other settings) writing there: refused, the file untouched
    code, text = run_to(dataset, tiny_model_dir, output, "--max-tokens", "3")
    assert code == 2 and "already exists and it was written by another job" in text
    assert "max_tokens: 2 → 3" in text
    assert "--overwrite" in text and output.read_bytes() == before
    # a file that is no jobrunner output at all: refused; --overwrite replaces it
    other = tmp_path / "precious.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), other)
    kept = other.read_bytes()
    assert run_to(dataset, tiny_model_dir, other, "--max-tokens", "2")[0] == 2
    assert other.read_bytes() == kept
    assert run_to(dataset, tiny_model_dir, other, "--max-tokens", "2", "--overwrite")[0] == 0
    assert pq.read_table(other).num_rows == pq.read_table(output).num_rows
    # a checkpoint of this very job does not license replacing a file it did not write
    pq.write_table(pa.table({"x": [1, 2, 3]}), other)
    kept = other.read_bytes()
    code, text = run_to(dataset, tiny_model_dir, other, "--max-tokens", "2")
    assert code == 2 and "it is not a file that jobrunner wrote" in text, text
    assert "nothing to do" not in text and other.read_bytes() == kept


def test_text_that_is_not_valid_unicode_is_an_error_row(tiny_model_dir, tmp_path):
    # Valid JSON whose \ud800-style escapes decode to lone surrogates, in each kind of field.
    source = tmp_path / "surrogates.jsonl"
    source.write_text(
        '{"id": "ok", "prompt": "Describe.", "note": "fine"}\n'
        '{"id": "prompt", "prompt": "bad \\ud800 text", "note": "fine"}\n'
        '{"id": "id\\udc80", "prompt": "Describe.", "note": "fine"}\n'
        '{"id": "kept", "prompt": "Describe.", "note": "x\\udc80"}\n'
        '{"id": "ok2", "prompt": "Describe.", "note": "fine"}\n'
    )
    output = tmp_path / "out.parquet"
    code, text = run_to(
        source, tiny_model_dir, output, "--max-tokens", "2", "--keep-columns", "note"
    )
    assert code == 1, text
    rows = read(output)
    assert [r["id"] for r in rows] == ["ok", "prompt", "id\\udc80", "kept", "ok2"]
    assert [r["finish_reason"] for r in rows[0::4]] == ["length", "length"]
    for row, column in zip(rows[1:4], ["prompt column", "id column", "kept column"], strict=True):
        assert row["finish_reason"] == "error", row
        assert f"{column} '" in row["error"] and "not valid Unicode" in row["error"], row
    assert rows[3]["note"] == "x\\udc80"  # stored escaped

    code, text = run(
        str(source), "--model", str(tiny_model_dir), "--output", str(tmp_path / "t.parquet"),
        "--max-tokens", "2", "--prompt", "Q: {prompt}",
    )  # fmt: skip
    assert code == 1, text
    error = read(tmp_path / "t.parquet")[1]["error"]
    assert "prompt template field 'prompt' holds text that is not valid Unicode" in error


def test_damaged_parquet_saves_the_rows_before_it_and_exits_2(tiny_model_dir, tmp_path):
    source = tmp_path / "data.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(30)], "prompt": ["Describe."] * 30})
    pq.write_table(table, source, row_group_size=10)
    chunk = pq.ParquetFile(source).metadata.row_group(2).column(1)
    data = bytearray(source.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 8] = b"\xff" * 8  # its page header
    source.write_bytes(bytes(data))
    output = tmp_path / "out.parquet"
    args = [str(source), "--model", str(tiny_model_dir), "--output", str(output)]
    for _ in range(2):  # a re-run stops at the same place, with the same message
        result = CliRunner().invoke(main, ["run", *args, "--max-tokens", "2", "--quiet"])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and not output.exists()
        assert f"{source} is damaged: row 20 and after (row group 2" in result.output
        assert "the rows before it are done and saved" in result.output
    status = CliRunner().invoke(main, ["status", str(output), "--json"])
    assert json.loads(status.output)["rows_done"] == 20


@pytest.mark.parametrize(("content", "fragment"), [("{bad", "not valid JSON"), ("[1]", "list")])
def test_broken_preprocessor_config_exits_2(tiny_model_dir, dataset, tmp_path, content, fragment):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "preprocessor_config.json").write_text(content)
    result = CliRunner().invoke(main, ["run", str(dataset), "--model", str(model)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "cannot load model" in result.output and "preprocessor_config.json" in result.output
    assert fragment in result.output


def test_misspelt_image_column_warns_that_every_row_ran_text_only(tiny_model_dir, tmp_path):
    """JSONL rows may leave out their image, so a wrong --image-column is no error; the run
    says that no row had an image in the named column."""
    write_image(tmp_path / "a.png", 40, 30, seed=1)
    source = tmp_path / "pics.jsonl"
    source.write_text(json.dumps({"id": "a", "picture": "a.png", "prompt": "Describe."}) + "\n")
    args = ["run", str(source), "--model", str(tiny_model_dir), "--max-tokens", "2"]
    for column, warned in (("pic", True), ("picture", False)):
        result = CliRunner().invoke(main, [*args, "--image-column", column, "--overwrite"])
        assert result.exit_code == 0, result.output
        assert ("no row had an image in column 'pic'" in result.output) == warned


def test_rows_with_a_null_image_among_rows_with_one_are_counted_in_a_warning(
    tiny_model_dir, tmp_path
):
    """A null image (how a Hugging Face image column stores a missing one) runs its row text
    only; where other rows have images, the run says how many rows had a null one, and
    which, since their outputs answer without one. A JSONL row that leaves the column out is
    text only by intent (the README's way): no warning for it."""
    image = write_image(tmp_path / "a.png", 40, 30, seed=1).read_bytes()
    images = [image, None, image, None, None, None]
    source = tmp_path / "pics.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(6)], "image": pa.array(images, pa.binary())})
    pq.write_table(table, source)
    args = ["--prompt", "Describe.", "--max-tokens", "2"]
    code, text = run_to(source, tiny_model_dir, tmp_path / "out.parquet", *args)
    assert code == 0, text
    assert "4 of 6 rows had a null image (column 'image')" in text, text
    assert "(ids 'r1', 'r3', 'r4', ...)" in text, text
    lines = [{"id": "a", "image": "a.png"}, {"id": "b"}, {"id": "c", "image": None}]
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, text = run_to(source, tiny_model_dir, tmp_path / "mixed.parquet", *args)
    assert code == 0 and "1 of 3 rows had a null image" in text, text  # c, not b
    assert "(ids 'c')" in text, text


def test_an_image_column_of_nulls_only_warns_that_every_row_ran_text_only(tiny_model_dir, tmp_path):
    """A Parquet image column that holds no image at all (an export whose images were left
    out) runs every row text only: the run says so, where it used to end silently (exit 0)."""
    source = tmp_path / "pics.parquet"
    for images in (pa.array([None, None], pa.binary()), pa.nulls(2)):
        pq.write_table(pa.table({"id": ["a", "b"], "image": images}), source)
        args = ["--prompt", "Describe.", "--max-tokens", "2", "--overwrite"]
        code, text = run_to(source, tiny_model_dir, tmp_path / "out.parquet", *args)
        assert code == 0, text
        assert "every row's image (column 'image') was null, so every row ran" in text, text
        assert "Check the column name" not in text, text


def test_an_input_of_no_rows_keeps_its_kept_columns(tiny_model_dir, tmp_path):
    """No part is written for no rows, and the merge took the kept columns from the parts: the
    output lacked them, so it did not stack with the outputs of the dataset's other files."""
    source = tmp_path / "empty.parquet"
    day = pa.timestamp("ms", tz="UTC")
    schema = pa.schema([("prompt", pa.string()), ("n", pa.int8()), ("t", day), ("c", pa.string())])
    pq.write_table(schema.empty_table(), source)
    output = tmp_path / "empty.out.parquet"
    code, text = run_to(source, tiny_model_dir, output, "--keep-columns", "n,t")
    assert code == 0, text
    kept = pq.read_schema(output)
    assert kept.names[-3:] == ["n", "t", "row_index"] and pq.read_table(output).num_rows == 0
    assert (kept.field("n").type, kept.field("t").type) == (pa.int8(), day)
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text("")
    code, text = run_to(jsonl, tiny_model_dir, tmp_path / "j.parquet", "--keep-columns", "n")
    assert code == 0, text
    assert pq.read_schema(tmp_path / "j.parquet").field("n").type == pa.string()


def test_misspelt_max_tokens_column_warns_that_every_row_took_max_tokens(tiny_model_dir, tmp_path):
    """JSONL rows may leave out their limit, so a wrong --max-tokens-column is no error; the run
    says that no row had a value in the named column (a row with a bad value had one)."""
    source = tmp_path / "rows.jsonl"
    lines = [{"id": "a", "prompt": "Hi.", "limit": 1}, {"id": "b", "prompt": "Yo.", "limit": 0}]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["run", str(source), "--model", str(tiny_model_dir), "--max-tokens", "2"]
    for column, warned in (("limits", True), ("limit", False)):
        result = CliRunner().invoke(main, [*args, "--max-tokens-column", column, "--overwrite"])
        assert result.exit_code == (0 if warned else 1), result.output
        message = "no row had a value in column 'limits'"
        assert (message in result.output) == warned, result.output


def test_show_prints_each_rows_finish_tokens_and_text_or_error(tiny_model_dir, tmp_path):
    source = tmp_path / "rows.jsonl"
    lines = [{"id": "a", "prompt": "Hi.", "n": 2}, {"id": "bb", "prompt": "Yo.", "n": 0}]
    lines += [{"id": f"c{i}", "prompt": "Go."} for i in range(3)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.parquet"
    code, text = run_to(
        source, tiny_model_dir, output, "--max-tokens", "3", "--max-tokens-column", "n"
    )
    assert code == 1, text
    result = CliRunner().invoke(main, ["show", str(output), "--limit", "3"])
    assert result.exit_code == 0, result.output
    header, first, second, third, more = result.output.splitlines()
    assert header.split() == ["id", "finish", "tokens", "output"]
    assert first.split()[:3] == ["a", "length", "2"]
    assert second.split()[:3] == ["bb", "error", "0"] and "ERROR: max tokens column" in second
    assert third.split()[:3] == ["c0", "length", "3"]
    assert more == "... 2 more rows"


def test_show_reads_only_the_rows_it_prints(tmp_path, monkeypatch):
    """``show`` prints the first rows: it read the output and error columns of every row
    first (1.5 GB of memory for 20 rows of an output of 500,000 rows of 1 kB of text)."""
    n = 5000
    reasons = ["error" if i % 1000 == 999 else "stop" for i in range(n)]
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "output": [None if r == "error" else f"text {i}" for i, r in enumerate(reasons)],
            "finish_reason": reasons,
            "error": [f"bad {i}" if r == "error" else None for i, r in enumerate(reasons)],
            "prompt_tokens": pa.array([3] * n, pa.int32()),
            "output_tokens": pa.array([2] * n, pa.int32()),
            "row_index": pa.array(range(n), pa.int64()),
        }
    )
    output = tmp_path / "out.parquet"
    pq.write_table(table, output, row_group_size=500)
    read_table = pq.read_table

    def narrow(*args, columns=None, **kwargs):
        assert columns == ["finish_reason"], f"whole columns read: {columns}"
        return read_table(*args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", narrow)
    result = CliRunner().invoke(main, ["show", str(output), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()] == ["id", "r0", "r1", "..."]
    assert result.output.splitlines()[-1] == f"... {n - 2} more rows"
    result = CliRunner().invoke(main, ["show", str(output), "--errors", "--limit", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["r999", "r1999", "r2999"]
    assert "ERROR: bad 999" in lines[1] and lines[-1] == "... 2 more error records"


def test_show_refuses_files_that_are_not_results(tmp_path, dataset):
    garbage, stranger = tmp_path / "garbage.parquet", tmp_path / "other.parquet"
    garbage.write_text("not parquet")
    pq.write_table(pa.table({"x": [1]}), stranger)
    for path in (garbage, stranger, dataset):
        result = CliRunner().invoke(main, ["show", str(path)])
        assert result.exit_code == 2, result.output
        assert "is not a jobrunner result file" in result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["show", str(stranger)])
    assert "it has no id, finish_reason, output_tokens, output, error (its columns: x)" in (
        result.output
    )
    result = CliRunner().invoke(main, ["show", str(stranger), "--limit", "-1"])
    assert result.exit_code == 2 and "--limit" in result.output


def test_no_chat_sends_prompts_as_they_are_and_untagged_image_rows_get_a_hint(
    tiny_model_dir, tmp_path
):
    write_image(tmp_path / "a.png", 64, 40, seed=3)
    prompts = ["<|image_1|>\nCaption:", "Caption:", "Once upon a time"]
    rows = [
        {"id": "tagged", "image": "a.png", "prompt": prompts[0]},
        {"id": "untagged", "image": "a.png", "prompt": prompts[1]},
        {"id": "text", "prompt": prompts[2]},
        {"id": "text-tagged", "prompt": "<|image_1|> Hi"},
    ]
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, text = run_to(source, tiny_model_dir, tmp_path / "raw.parquet", "--no-chat",
                        "--max-tokens", str(MAX_TOKENS))  # fmt: skip
    assert code == 1, text
    tagged, untagged, plain, text_tagged = read(tmp_path / "raw.parquet")
    assert "with --no-chat the prompt is sent as it is" in text_tagged["error"]
    model, processor = load(str(tiny_model_dir))
    image = Image.open(tmp_path / "a.png")
    direct = generate_batch(
        model,
        processor,
        [
            processor.prepare(prompts[0], image, chat=False),
            processor.prepare(prompts[2], None, chat=False),
        ],
        GenerationParams(MAX_TOKENS),
    )
    assert [tagged["output"], plain["output"]] == [r.text for r in direct]
    assert untagged["finish_reason"] == "error"
    assert "with --no-chat the prompt is sent as it is" in untagged["error"]
    assert "<|image_1|>" in untagged["error"]
    # with the chat template, the tag is the template's: the same row runs
    code, text = run_to(source, tiny_model_dir, tmp_path / "chat.parquet", "--max-tokens", "2")
    chat = read(tmp_path / "chat.parquet")
    assert chat[1]["finish_reason"] == "length" and chat[0]["finish_reason"] == "error"
    assert "the chat template puts the image tag before the prompt itself" in chat[0]["error"]
    assert "take the <|image_N|> tags out of the prompt" in chat[0]["error"]
    assert "this row has no image: take the tag out of the prompt" in chat[3]["error"]


def test_a_finished_job_run_again_reports_its_rows_and_errors(tiny_model_dir, tmp_path):
    from jobrunner.runner import run_job
    from jobrunner.spec import build_spec

    source = tmp_path / "mixed.jsonl"
    lines = [{"prompt": "Hi"}, {"prompt": "Hi", "image": "missing.png"}, {"prompt": "Yo"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in lines))
    output = tmp_path / "mixed.parquet"
    spec = build_spec(
        {}, {"input": source, "model": str(tiny_model_dir), "output": output, "max_tokens": 2}
    )
    first = run_job(spec)
    assert (first.rows_run, first.errors, first.nothing_to_do) == (3, 1, False)
    code, text = run_to(source, tiny_model_dir, tmp_path / "quiet.parquet", "--max-tokens", "2")
    last = text.splitlines()[-1]
    assert code == 1 and last.startswith("jobrunner: error records in the output: 1; "), text
    again = run_job(spec)  # with its checkpoint
    assert (again.rows_total, again.rows_done_before, again.errors) == (3, 3, 1)
    shutil.rmtree(tmp_path / "mixed.parquet.parts")
    again = run_job(spec)  # its finished output alone
    assert again.nothing_to_do and again.rows_run == 0
    assert (again.rows_total, again.rows_done_before, again.errors) == (3, 3, 1)


def test_rows_of_a_failed_batch_run_alone_are_checkpointed_as_they_go(
    tiny_model_dir, dataset, tmp_path, monkeypatch
):
    """A batch whose decoding fails runs its rows one by one; the checkpoint interval still
    holds while they do (a crash then loses one interval, not the whole batch)."""
    from jobrunner.parts import read_progress
    from model.generate import Decoder

    real_step = Decoder.step

    def step(self, drop=True):
        if self.active > 1:
            raise RuntimeError("out of memory")
        return real_step(self, drop)

    monkeypatch.setattr(Decoder, "step", step)
    output = tmp_path / "out.parquet"
    flags = ("--max-tokens", "2", "--batch-size", "8", "--checkpoint-every", "1")
    code, text = run_to(dataset, tiny_model_dir, output, *flags)
    assert code == 0, text
    records, _ = read_progress(tmp_path / "out.parquet.parts" / "shard-00000-of-00001")
    assert [record.rows for record in records] == [1] * 8
    assert [r["row_index"] for r in read(output)] == list(range(8))


# --- kept columns --------------------------------------------------------------------------------


def kept_columns_table() -> pa.Table:
    """Six text-only rows and a column of each type a user may keep, nulls included (row 3 is
    null everywhere), with values that a trip through Python or JSON would change."""
    ts = [1_704_110_401_000_000_001, -1, 0, None, 86_400_000_000_000, 7]
    point = pa.struct([("x", pa.int32()), ("tags", pa.list_(pa.string()))])
    return pa.table(
        {
            "prompt": [f"Describe item {i}." for i in range(6)],
            "price": pa.array(
                [decimal.Decimal("0.50"), decimal.Decimal("-" + "9" * 30 + ".25"), 0, None, 1, 2],
                pa.decimal128(38, 2),
            ),
            "big": pa.array(["1" * 60, "-2", "0", None, "3", "4"]).cast(pa.decimal256(70, 0)),
            "at": pa.array(ts, pa.timestamp("ns", "Europe/Paris")),
            "day": pa.array([dt.date(2024, 1, 1), dt.date(1, 1, 1), None, None, None, None]),
            "small": pa.array([-128, 127, 0, None, 1, 2], pa.int8()),
            "ratio": pa.array([0.1, -2.5, 0, None, 1e30, 3], pa.float32()),
            "flag": [True, False, True, None, False, True],
            "count": pa.array([2**64 - 1, 0, 1, None, 2**63, 5], pa.uint64()),
            "blob": [b"\x00\xff", b"", b"ab", None, b"\x80", b"z"],
            "nums": pa.array([[1, None], [], [3], None, [5], [6]], pa.list_(pa.int16())),
            "point": pa.array(
                [
                    {"x": 1, "tags": ["a"]},
                    {"x": None, "tags": []},
                    None,
                    None,
                    {"x": 5, "tags": ["b"]},
                    {"x": 6, "tags": []},
                ],
                point,
            ),
            "attrs": pa.array(
                [[("z", 1), ("a", 2)], [], [("k", 3)], None, [], []],
                pa.map_(pa.string(), pa.int64()),
            ),
            "label": pa.array(["cat", "dog", "cat", None, "eel", "dog"]).dictionary_encode(),
        }
    )


def run_keeping(source: Path, model_dir: Path, output: Path, *flags: str) -> pa.Table:
    keep = ",".join(c for c in pq.read_schema(source).names if c != "prompt")
    code, text = run_to(
        source, model_dir, output, "--max-tokens", "2", "--keep-columns", keep, *flags
    )
    assert code == 0, text
    return pq.read_table(output)


def parts_written(output: Path) -> int:
    from jobrunner.parts import read_progress

    records, _ = read_progress(output.with_name(output.name + ".parts") / "shard-00000-of-00001")
    return len(records)


def assert_kept_as_given(output: pa.Table, source: Path) -> None:
    """Each kept column has the input's type and values (a dictionary: its values' type)."""
    given = pq.read_table(source)
    for name in given.column_names[1:]:
        expected = given[name]
        if pa.types.is_dictionary(expected.type):
            expected = expected.cast(expected.type.value_type)
        assert output.schema.field(name).type == expected.type, name
        assert output[name].equals(expected), name


def test_kept_parquet_columns_keep_their_type_and_values_whatever_the_parts(
    tiny_model_dir, tmp_path
):
    source = tmp_path / "data.parquet"
    pq.write_table(kept_columns_table(), source, row_group_size=4)  # two dictionaries
    flags = ("--checkpoint-every", "1", "--batch-size", "1")  # rows end one at a time
    one = run_keeping(source, tiny_model_dir, tmp_path / "one.parquet", *flags)
    assert parts_written(tmp_path / "one.parquet") == 6
    assert_kept_as_given(one, source)
    every = run_keeping(
        source, tiny_model_dir, tmp_path / "all.parquet", "--checkpoint-every", "1000,1h"
    )
    assert parts_written(tmp_path / "all.parquet") == 1
    assert every.equals(one)  # parts of one row or of every row: the same file


def as_written_before_typed_kept_columns(shard_dir: Path, line: bytes) -> bytes:
    """Rewrite the part of a progress line as jobrunner wrote parts before kept Parquet columns
    kept their type (each value the JSON text of its Python value, object keys sorted, and the
    kinds of the values in the metadata); return the line that records it now."""
    import dataclasses
    import hashlib

    from jobrunner import writers
    from jobrunner.parts import PartRecord

    record = PartRecord.from_line(line)
    path = shard_dir / record.part
    table = pq.read_table(path)
    kinds = {}
    for name in writers.part_kept_types(table.schema):
        values = table[name].to_pylist()
        kinds[name] = sorted({writers.value_kind(v) for v in values})
        texts = [
            None if v is None else json.dumps(v, default=writers._json_default, sort_keys=True)
            for v in values
        ]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(texts))
    metadata = {writers.KINDS_METADATA_KEY: json.dumps(kinds).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    return dataclasses.replace(record, bytes=len(data), sha256=sha256).to_line()


def test_a_job_resumed_over_parts_of_the_old_format_merges_as_that_version_would(
    tiny_model_dir, tmp_path
):
    """A job checkpointed by the jobrunner that stored kept Parquet values as JSON text and
    resumed by this one (another checkpoint interval) merges, every row once, to the file that
    version gives: its kept columns typed from the JSON values, as then."""
    from jobrunner.parts import PartRecord

    pytest.importorskip("pandas")  # pyarrow gives nanoseconds to Python as pandas values
    source = tmp_path / "data.parquet"
    pq.write_table(kept_columns_table(), source)
    flags = ("--checkpoint-every", "1", "--batch-size", "1")  # a part a row
    typed = run_keeping(source, tiny_model_dir, tmp_path / "ref.parquet", *flags)
    results = {}
    for name, kept in (("old", 6), ("resumed", 3)):  # all parts old; three, then killed
        output = tmp_path / f"{name}.parquet"
        shutil.copytree(tmp_path / "ref.parquet.parts", tmp_path / f"{name}.parquet.parts")
        shard_dir = tmp_path / f"{name}.parquet.parts" / "shard-00000-of-00001"
        lines = (shard_dir / "progress.jsonl").read_bytes().splitlines(keepends=True)
        old = [as_written_before_typed_kept_columns(shard_dir, line) for line in lines[:kept]]
        (shard_dir / "progress.jsonl").write_bytes(b"".join(old))
        (shard_dir / "complete.json").unlink()
        for line in lines[kept:]:
            (shard_dir / PartRecord.from_line(line).part).unlink()
        results[name] = run_keeping(source, tiny_model_dir, output, "--checkpoint-every", "1h")
    assert results["resumed"].equals(results["old"])
    assert results["old"].schema.field("price").type == pa.string()  # JSON text, as then
    assert results["old"].schema.field("small").type == pa.int64()
    assert results["old"]["row_index"].to_pylist() == list(range(6))
    result_columns = ["id", "output", "finish_reason", "row_index"]
    assert results["old"].select(result_columns).equals(typed.select(result_columns))


def test_kept_jsonl_columns_keep_key_order_and_mixed_columns_are_json_text(
    tiny_model_dir, tmp_path
):
    source = tmp_path / "data.jsonl"
    notes = [{"z": 1, "a": {"y": [2, "b"], "b": None}}, None, {"m": "ü"}]
    tags = [1, "a", [1, "x"]]
    rows = [
        {"prompt": f"Describe {i}.", "note": note, "tag": tag, "n": i, "s": f"s{i}"}
        for i, (note, tag) in enumerate(zip(notes, tags, strict=True))
    ]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    output = tmp_path / "out.parquet"
    code, text = run_to(
        source, tiny_model_dir, output, "--max-tokens", "2", "--keep-columns", "note,tag,n,s"
    )
    assert code == 0, text
    table = pq.read_table(output)
    assert table.schema.field("n").type == pa.int64()
    assert table["s"].to_pylist() == ["s0", "s1", "s2"]
    # objects: JSON text with the input's key order, so json.loads gives the input's value
    assert table["note"].to_pylist() == ['{"z": 1, "a": {"y": [2, "b"], "b": null}}', None,
                                         '{"m": "ü"}']  # fmt: skip
    # mixed kinds: every value as JSON text, a string with its quotes (README, Output)
    assert table["tag"].to_pylist() == ["1", '"a"', '[1, "x"]']
    assert [json.loads(t) for t in table["tag"].to_pylist()] == tags


def test_kept_string_and_binary_views_come_out_as_plain_strings_and_bytes(tiny_model_dir, tmp_path):
    """Arrow's view types cannot be taken row by row: they come out as string and binary (as
    a dictionary comes out as its values), the values unchanged."""
    if not hasattr(pa, "string_view"):
        pytest.skip("this pyarrow has no view types")
    source = tmp_path / "views.parquet"
    texts, blobs = ["a", None, "ccc" * 20], [b"\x00", b"", None]
    table = pa.table(
        {
            "prompt": ["Say one.", "Say two.", "Say three."],
            "sv": pa.array(texts, pa.string_view()),
            "bv": pa.array(blobs, pa.binary_view()),
            "lv": pa.array([["a"], [], None], pa.list_(pa.string_view())),
            "st": pa.array(
                [{"a": "x", "n": 1}, None, {"a": None, "n": 2}],
                pa.struct([("a", pa.string_view()), ("n", pa.int8())]),
            ),
        }
    )
    pq.write_table(table, source)
    output = run_keeping(source, tiny_model_dir, tmp_path / "views.out.parquet")
    assert output.schema.field("sv").type == pa.string() and output["sv"].to_pylist() == texts
    assert output.schema.field("bv").type == pa.binary() and output["bv"].to_pylist() == blobs
    assert output.schema.field("lv").type == pa.list_(pa.string())
    assert output["lv"].to_pylist() == [["a"], [], None]
    assert output.schema.field("st").type == pa.struct([("a", pa.string()), ("n", pa.int8())])
    assert output["st"].to_pylist() == table["st"].to_pylist()


def test_one_error_record_is_counted_in_the_singular(tiny_model_dir, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text('{"id": "a", "prompt": "Hi."}\n{not json\n')
    args = ["run", str(source), "--model", str(tiny_model_dir), "--max-tokens", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "jobrunner: 1 error record\n" in result.output, result.output
    result = CliRunner().invoke(main, args)  # nothing to do
    assert "the output holds 1 error record; " in result.output, result.output


def test_quantized_model_on_the_cpu_says_how_its_layers_run(tiny_model_dir, tmp_path, monkeypatch):
    """--quantize on the CPU runs float layers of the quantized weights (MLX's quantized
    matmul is many times slower there) and says so; where they would not fit in memory the
    layers stay quantized, with a warning even when quiet."""
    source = tmp_path / "rows.jsonl"
    source.write_text('{"id": "a", "prompt": "Hi."}\n')
    args = ["run", str(source), "--model", str(tiny_model_dir), "--max-tokens", "2"]
    args += ["--quantize", "8"]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "a.parquet")])
    assert result.exit_code == 0, result.output
    assert "quantized layers run as float32 weights on the CPU" in result.output, result.output
    monkeypatch.setattr("model.loading.device_memory_bytes", lambda: 1 << 20)
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "b.parquet"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "quantized layers stay quantized" in result.output, result.output
    same = pq.read_table(tmp_path / "a.parquet").column("output").to_pylist()
    assert pq.read_table(tmp_path / "b.parquet").column("output").to_pylist() == same


def test_quantized_model_note_names_the_dtype_its_layers_run_in(tiny_model_dir, tmp_path):
    """With --dtype bfloat16 the expanded layers hold bfloat16 weights, and the note says so."""
    source = tmp_path / "rows.jsonl"
    source.write_text('{"id": "a", "prompt": "Hi."}\n')
    args = ["run", str(source), "--model", str(tiny_model_dir), "--max-tokens", "2"]
    args += ["--quantize", "8", "--dtype", "bfloat16", "--output", str(tmp_path / "a.parquet")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "quantized layers run as bfloat16 weights on the CPU" in result.output, result.output
    assert "float32 weights" not in result.output, result.output
    # and bfloat16 itself is slow on the CPU: said even when quiet
    result = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "b.parquet"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "--dtype bfloat16 on the CPU" in result.output, result.output
    result = CliRunner().invoke(main, [*args[:-4], "--output", str(tmp_path / "c.parquet")])
    assert result.exit_code == 0 and "on the CPU: MLX" not in result.output, result.output
