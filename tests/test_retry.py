"""``--retry-errors``: the rows saved as errors run again, the others stay done, end to end.

The property under test: once what made rows fail is fixed (a drive mounted, a file restored), a
retry ends with the output a fresh run of the fixed data gives, and runs only the failed rows.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.test_resume import Job, cli, parts_dir, rows

ROWS = 12
MISSING = (1, 6, 7)  # rows whose image is not there at first; 6 and 7 share one
ARGS = ("--max-tokens", "3", "--batch-size", "2", "--checkpoint-every", "2")


def image_name(i: int) -> str:
    return f"{min(i, 6)}.png" if i in (6, 7) else f"{i}.png"


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    """A dataset with an image on every row, those of ``MISSING`` held back in ``spare/``; the
    output path and the `run` arguments."""
    (tmp_path / "spare").mkdir()
    lines = []
    for i in range(ROWS):
        name = image_name(i)
        folder = tmp_path / "spare" if i in MISSING else tmp_path
        pixels = np.random.default_rng(i).integers(0, 256, (30 + i, 50 - i, 3), np.uint8)
        Image.fromarray(pixels).save(folder / name)
        lines.append(
            {"id": f"r{i}", "image": name, "prompt": f"Describe {i}." + " More." * (i % 3)}
        )
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.parquet"
    return output, [
        "run",
        str(source),
        "--model",
        str(tiny_model_dir),
        "--output",
        str(output),
        *ARGS,
    ]


def restore_images(output: Path) -> None:
    for path in (output.parent / "spare").iterdir():
        shutil.copy(path, output.parent / path.name)


def fresh_run(output: Path, args: list[str], tmp_path: Path) -> list[dict]:
    """The output of the job run from scratch on the data as it is now."""
    other = tmp_path / "fresh.parquet"
    code, text = cli(*[str(other) if a == str(output) else a for a in args])
    assert code == 0, text
    return rows(other)


def summary(output: Path) -> dict:
    return json.loads(output.with_name(output.name + ".summary.json").read_text())


def errors_of(output: Path) -> list[int]:
    return [r["row_index"] for r in rows(output) if r["finish_reason"] == "error"]


def test_a_retry_runs_only_the_error_rows_and_ends_as_a_fresh_run(job, tmp_path):
    output, args = job
    code, text = cli(*args)
    assert code == 1 and errors_of(output) == list(MISSING), text
    assert "3 error records; where the cause is outside the input" in text, text
    first = rows(output)
    code, text = cli("show", str(output), "--errors")
    assert code == 0 and [line.split()[0] for line in text.splitlines()] == ["id", "r1", "r6", "r7"]
    restore_images(output)
    code, text = cli(*args)  # without the flag, a finished job is finished
    assert code == 0 and "nothing to do" in text and rows(output) == first, text
    assert "the output holds 3 error records; where the cause is outside" in text, text
    code, text = cli(*args, "--retry-errors")
    assert code == 0, text
    assert f"retrying 3 error rows; {ROWS - 3} of {ROWS} rows stay done" in text, text
    assert summary(output)["rows_run"] == 3 and summary(output)["rows_error"] == 0
    assert rows(output) == fresh_run(output, args, tmp_path)
    code, text = cli(*args, "--retry-errors")  # nothing left to retry
    assert code == 0 and "nothing to do" in text, text
    assert cli("show", str(output), "--errors") == (0, f"{output}: no error records\n")


def test_no_retry_hint_where_every_error_came_from_the_rows_themselves(tmp_path, tiny_model_dir):
    """A retry cannot help an image tag in a prompt, a malformed line or an image over the
    pixel limit (a setting): the run does not suggest one. A missing image file can be
    restored: with one among them, it does."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "small.png")
    Image.new("RGB", (200, 200), "blue").save(tmp_path / "large.png")
    lines = [
        json.dumps({"id": "ok", "image": "small.png", "prompt": "Describe."}),
        json.dumps({"id": "tag", "image": "small.png", "prompt": "Describe <|image_1|>."}),
        json.dumps({"id": "large", "image": "large.png", "prompt": "Describe."}),
        "{not json",
    ]
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(lines) + "\n")
    args = ["run", str(source), "--model", str(tiny_model_dir), *ARGS]
    args += ["--max-image-pixels", "10000"]
    code, text = cli(*args, "--output", str(tmp_path / "a.parquet"))
    assert code == 1 and "3 error records" in text, text
    assert "--retry-errors" not in text, text
    source.write_text(source.read_text() + json.dumps({"id": "gone", "image": "gone.png"}) + "\n")
    # (--prompt: one prompt for every row, the tag row then fine)
    code, text = cli(*args, "--output", str(tmp_path / "b.parquet"), "--prompt", "Describe.")
    assert code == 1 and "3 error records; where the cause is outside the input" in text, text


def test_rows_that_fail_again_are_error_records_again(job, tmp_path):
    output, args = job
    job_file = tmp_path / "job.toml"
    source, model = args[1], args[3]
    job_file.write_text(
        f'input = "{source}"\nmodel = "{model}"\noutput = "{output}"\nmax_tokens = 3\n'
        "batch_size = 2\ncheckpoint_every_rows = 2\nretry_errors = true\n"
    )
    code, text = cli("run", str(job_file))
    assert code == 1 and errors_of(output) == list(MISSING), text
    first = rows(output)
    code, text = cli("run", str(job_file))  # the job file retries: they fail again
    assert code == 1 and "retrying 3 error rows" in text, text
    assert "3 error records\n" in text and "--retry-errors runs" not in text, text  # no hint
    code, text = cli("run", str(job_file), "--max-tokens", "4")  # another job
    assert code == 2 and "--retry-errors runs error rows again within one job" in text, text
    assert rows(output) == first and summary(output)["rows_run"] == 3
    code, text = cli("run", str(job_file), "--no-retry-errors")
    assert code == 0 and "nothing to do" in text, text


def test_each_shard_retries_its_own_error_rows(job, tmp_path):
    output, args = job
    for shard in ("0/2", "1/2"):
        code, text = cli(*args, "--shard", shard)
        assert code == 1, text
    assert errors_of(output) == list(MISSING)
    restore_images(output)
    code, text = cli(*args, "--retry-errors")  # the job ran in two shards
    assert code == 2 and "error rows are in --shard 0/2 (1), --shard 1/2 (2)" in text, text
    code, text = cli(*args, "--shard", "0/2", "--retry-errors")  # rows 6 (shard 0)
    assert code == 0 and "retrying 1 error rows" in text, text  # this shard's rows are fine
    assert errors_of(output) == [1, 7]  # merged again: shard 1's errors are still there
    code, text = cli(*args, "--shard", "0/2", "--retry-errors")
    assert code == 0 and "this shard holds no error rows, --shard 1/2 (2) do" in text, text
    code, text = cli(*args, "--shard", "1/2", "--retry-errors")
    assert code == 0 and "retrying 2 error rows" in text, text
    assert rows(output) == fresh_run(output, args, tmp_path)


def with_kept_columns(output: Path, args: list[str], parquet: bool) -> list[str]:
    """The job's rows with kept columns of every kind (as JSONL, or as Parquet with Arrow types
    JSON has not), and the `run` arguments that keep them."""
    source = output.parent / "data.jsonl"
    lines = [json.loads(line) for line in source.read_text().splitlines()]
    for i, line in enumerate(lines):
        line |= {"n": i, "x": i / 2 if i % 2 else i, "tags": [i, "t"] if i % 3 else None}
        line |= {"mixed": f"s{i}" if i % 2 else i, "text": None if i == 4 else f"\u00e9{i}"}
    keep = ["n", "x", "tags", "mixed", "text"]
    if parquet:
        table = pa.table(
            {
                **{k: [line[k] for line in lines] for k in ("id", "image", "prompt", "n")},
                "when": pa.array([i * 10**9 + 7 for i in range(ROWS)], pa.timestamp("ns")),
                "price": pa.array([Decimal(f"{i}.25") for i in range(ROWS)], pa.decimal128(9, 2)),
                "tags": pa.array([[i, i + 1] if i % 3 else None for i in range(ROWS)]),
            }
        )
        source = source.with_suffix(".parquet")
        pq.write_table(table, source)
        keep = ["n", "when", "price", "tags"]
    else:
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = [str(source) if a.endswith("data.jsonl") else a for a in args]
    return [*args, "--keep-columns", ",".join(keep)]


@pytest.mark.parametrize("parquet", [False, True], ids=["jsonl", "parquet"])
def test_a_retry_without_the_checkpoint_makes_it_again_from_the_output(job, tmp_path, parquet):
    """A finished job whose checkpoint folder was removed retries from its output: the output's
    rows become the checkpoint's parts, only the error rows run, and the output ends as a fresh
    run's, kept columns' values and types included."""
    output, args = job
    args = with_kept_columns(output, args, parquet)
    code, text = cli(*args)
    assert code == 1 and errors_of(output) == list(MISSING), text
    shutil.rmtree(parts_dir(output))
    code, text = cli(*args)  # without the flag, the hint says a retry helps
    assert code == 0 and "nothing to do" in text and "--retry-errors" in text, text
    restore_images(output)
    made = output.stat().st_mtime
    code, text = cli(*args, "--retry-errors")
    assert code == 0, text
    assert f"checkpoint: made again from {output} ({ROWS} rows)" in text, text
    # the output's rows are recorded as made when it was, not by this run (status's rate)
    progress = parts_dir(output) / "shard-00000-of-00001" / "progress.jsonl"
    records = [json.loads(line) for line in progress.read_text().splitlines()]
    assert sum(r["rows"] for r in records if r["session_start"] == made) == ROWS - 3
    assert f"retrying 3 error rows; {ROWS - 3} of {ROWS} rows stay done" in text, text
    assert summary(output)["rows_run"] == 3 and summary(output)["rows_error"] == 0
    fresh = tmp_path / "fresh.parquet"
    assert rows(output) == fresh_run(output, args, tmp_path)
    assert pq.read_schema(output).remove_metadata() == pq.read_schema(fresh).remove_metadata()
    code, text = cli(*args, "--retry-errors")  # the checkpoint is there again
    assert code == 0 and "nothing to do" in text, text


def test_a_retry_in_shards_without_the_checkpoint_runs_unsharded(job, tmp_path):
    output, args = job
    for shard in ("0/2", "1/2"):
        assert cli(*args, "--shard", shard)[0] == 1
    shutil.rmtree(parts_dir(output))
    restore_images(output)
    code, text = cli(*args, "--shard", "0/2", "--retry-errors")
    assert code == 2 and "run again without --shard" in text, text
    code, text = cli(*args, "--retry-errors")
    assert code == 0 and "retrying 3 error rows" in text, text
    assert rows(output) == fresh_run(output, args, tmp_path)


def test_a_retry_without_the_checkpoint_of_an_older_output_says_to_overwrite(job):
    """An output merged before outputs recorded their kept columns' kinds cannot be read back
    as parts: the retry says so, and --overwrite runs every row."""
    output, args = job
    args = with_kept_columns(output, args, parquet=False)
    code, text = cli(*args)
    assert code == 1, text
    shutil.rmtree(parts_dir(output))
    table = pq.read_table(output)
    meta = json.loads(table.schema.metadata[b"jobrunner"])
    del meta["kept_kinds"]
    pq.write_table(table.replace_schema_metadata({b"jobrunner": json.dumps(meta)}), output)
    code, text = cli(*args, "--retry-errors")
    assert code == 2 and "cannot run again alone" in text and "(2026-11-24)" in text, text
    code, text = cli(*args)  # the hint says so too, not to --retry-errors
    assert code == 0 and "3 error rows of" in text and "cannot run again alone" in text, text
    code, text = cli(*args, "--retry-errors", "--overwrite")  # every row again
    assert code == 1 and summary(output)["rows_run"] == ROWS, text


def test_a_rebuild_that_fails_leaves_the_finished_output_and_one_stopped_runs_again(
    job, tmp_path, monkeypatch
):
    """A rebuild that fails partway takes its checkpoint back (the job is finished, as before);
    one stopped before it recorded its parts (a kill: nothing taken back) leaves a checkpoint
    without rows, which the next retry makes again."""
    from jobrunner import checkpoint, runner

    output, args = job
    assert cli(*args)[0] == 1
    first = rows(output)
    shutil.rmtree(parts_dir(output))
    restore_images(output)
    real = runner.output_parts

    def failing(*a, **k):
        parts = real(*a, **k)
        yield next(parts)
        raise OSError(errno.EIO, "Input/output error", str(output))

    monkeypatch.setattr(runner, "output_parts", failing)
    code, text = cli(*args, "--retry-errors")
    assert code == 4 and "Input/output error" in text, text
    assert not parts_dir(output).exists() or not any(parts_dir(output).rglob("*.json*"))
    code, text = cli(*args)
    assert code == 0 and "nothing to do" in text and rows(output) == first, text
    # stopped as a kill would stop it: neither the parts nor the new checkpoint taken back
    monkeypatch.setattr(checkpoint, "_clean_shard_dir", lambda *a, **k: [])
    monkeypatch.setattr(checkpoint.CheckpointStore, "abandon_new", lambda self: False)
    code, text = cli(*args, "--retry-errors")
    assert code == 4, text
    assert (parts_dir(output) / "manifest.json").exists()
    monkeypatch.undo()
    code, text = cli(*args, "--retry-errors")
    assert code == 0 and "made again from" in text and "retrying 3 error rows" in text, text
    assert rows(output) == fresh_run(output, args, tmp_path)


def test_a_rebuild_killed_midway_leaves_the_job_finished_until_a_retry(job, tmp_path):
    """A rebuild killed (kill -9) before it recorded its parts leaves a checkpoint without rows
    beside the finished output: it stands for the removed checkpoint it was to replace, so a run
    has nothing to do and status and merge say so, as before the retry; a retry makes it
    again."""
    output, args = job
    assert cli(*args)[0] == 1
    first = rows(output)
    shutil.rmtree(parts_dir(output))
    restore_images(output)
    killed = Job(tmp_path, [*args[1:], "--retry-errors"], stage="tmp", nth=1)  # its first part
    assert killed.wait_until(killed.paused), killed.output()
    killed.signal(signal.SIGKILL)
    killed.wait()
    assert (parts_dir(output) / "manifest.json").exists()
    code, text = cli(*args)  # not every row again
    assert code == 0 and "nothing to do" in text and "--retry-errors" in text, text
    assert rows(output) == first and summary(output)["rows_run"] == ROWS
    code, text = cli(*args, "--shard", "0/2")
    assert code == 0 and "nothing to do" in text and "run again without --shard" in text, text
    code, text = cli(*args, "--shard", "0/2", "--retry-errors")
    assert code == 2 and "run again without --shard" in text, text
    assert cli("status", str(output)) == (0, f"{output}: complete\n")
    code, text = cli("merge", str(output))
    assert code == 2 and "holds no rows" in text and "--retry-errors" in text, text
    assert rows(output) == first
    code, text = cli(*args, "--retry-errors")
    assert code == 0 and "made again from" in text and "retrying 3 error rows" in text, text
    assert rows(output) == fresh_run(output, args, tmp_path)


def test_a_retry_resumes_an_overwrite_run_killed_before_its_first_part(job, tmp_path):
    """An --overwrite run killed before it recorded a row leaves a checkpoint without rows that
    replaces the old output: a retry resumes it (every row, as the run was asked), never takes
    the old output for its checkpoint."""
    output, args = job
    assert cli(*args)[0] == 1
    restore_images(output)
    pixels = np.zeros((40, 40, 3), np.uint8)  # an image changed: why every row runs again
    Image.fromarray(pixels).save(output.parent / image_name(0))
    killed = Job(tmp_path, [*args[1:], "--overwrite"], stage="tmp", nth=1)  # its first part
    assert killed.wait_until(killed.paused), killed.output()
    killed.signal(signal.SIGKILL)
    killed.wait()
    code, text = cli(*args, "--retry-errors")  # its resume command (--overwrite dropped)
    assert code == 0 and "made again" not in text, text
    assert summary(output)["rows_run"] == ROWS
    assert rows(output) == fresh_run(output, args, tmp_path)


def test_a_retry_without_the_checkpoint_refuses_an_output_whose_rows_were_changed(job):
    """An output whose rows were edited out or reordered cannot take the checkpoint's
    place: the retry says so and what runs instead, the hint of a run does not point to it, and
    nothing is left of the checkpoint it did not make."""
    output, args = job
    assert cli(*args)[0] == 1
    shutil.rmtree(parts_dir(output))
    table = pq.read_table(output)
    for changed in (table.slice(1), table.take([1, 0, *range(2, ROWS)])):
        pq.write_table(changed, output)
        code, text = cli(*args, "--retry-errors")
        assert code == 2 and "--overwrite runs every row again" in text, text
        assert "its rows are not the input's" in text, text
        code, text = cli(*args)
        assert code == 0 and "cannot run again alone" in text, text
        assert not (parts_dir(output) / "manifest.json").exists()


def test_a_retry_without_the_checkpoint_of_a_damaged_output_says_so(job):
    """An output whose text is not UTF-8 (a damaged file, which pyarrow reads without a word)
    cannot take the checkpoint's place: a clear refusal, no traceback and no part of bad text,
    the finished output kept as it was."""
    output, args = job
    assert cli(*args)[0] == 1
    shutil.rmtree(parts_dir(output))
    restore_images(output)
    table = pq.read_table(output)
    texts = [b"\xff\xfe", *(t.encode() if t else None for t in table["output"].to_pylist()[1:])]
    damaged = pa.array(texts, pa.binary()).view(pa.string())  # unchecked, as read from disk
    pq.write_table(table.set_column(1, "output", damaged), output)
    before = output.read_bytes()
    code, text = cli(*args, "--retry-errors")
    assert code == 2 and "Traceback" not in text and "it is damaged" in text, text
    assert "UTF8" in text and "--overwrite runs every row again" in text, text
    assert not (parts_dir(output) / "manifest.json").exists() and output.read_bytes() == before


def test_a_retry_that_fails_before_any_row_keeps_the_job(job, monkeypatch):
    output, args = job
    code, text = cli(*args)
    assert code == 1, text
    import model.loading

    def no_model(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model.loading, "load", no_model)
    code, text = cli(*args, "--retry-errors")
    assert code == 2 and "cannot load model" in text, text
    monkeypatch.undo()
    restore_images(output)
    code, text = cli(*args)  # the dropped rows are owed: the same job resumes
    assert code == 0 and f"resuming: {ROWS - 3} of {ROWS} rows" in text, text
    assert errors_of(output) == []


def as_merged_before_digests(output: Path) -> None:
    """Rewrite ``output`` as a jobrunner before 2026-11-24 merged it: no digest of the parts."""
    table = pq.read_table(output)
    meta = json.loads(table.schema.metadata[b"jobrunner"])
    del meta["parts"]
    pq.write_table(table.replace_schema_metadata({b"jobrunner": json.dumps(meta)}), output)


def failing_merge(monkeypatch, output: Path) -> None:
    """Merges fail with a full disk until ``monkeypatch.undo()``."""
    import errno

    from jobrunner import merge

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output))

    monkeypatch.setattr(merge, "_atomic_parquet", full)


@pytest.mark.parametrize("merged_by", ["this version", "an older version"])
def test_a_retry_stopped_in_its_merge_is_merged_by_the_next_run(
    job, tmp_path, monkeypatch, merged_by
):
    """A retry whose final merge fails (a full disk, a kill) leaves an output older than the
    checkpoint: the next run, with or without the flag, merges it again, whichever version
    merged the output before."""
    output, args = job
    code, text = cli(*args)
    assert code == 1, text
    if merged_by == "an older version":
        as_merged_before_digests(output)
    restore_images(output)
    failing_merge(monkeypatch, output)
    code, text = cli(*args, "--retry-errors")
    assert code == 4 and "No space left" in text, text
    monkeypatch.undo()
    assert errors_of(output) == list(MISSING)  # the old output, older than its checkpoint
    code, text = cli("status", str(output))
    assert "older than the checkpoint" in text, text
    code, text = cli(*args)
    assert code == 0 and "older than its checkpoint: merging it again" in text, text
    assert rows(output) == fresh_run(output, args, tmp_path)
    code, text = cli(*args)
    assert code == 0 and "nothing to do" in text, text


def test_retried_rows_the_storage_still_fails_to_read_are_errors_again(job, monkeypatch):
    """A retry of rows whose images the storage cannot read (bad sectors) records them as
    errors again, as they were, instead of stopping on a storage fault for good."""
    import errno

    from jobrunner import readers

    output, args = job
    lines = [{"id": f"s{i}", "image": f"{i}.png", "prompt": "Describe."} for i in range(12)]
    source = output.parent / "data.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    bad = {output.parent / f"{i}.png" for i in (0, 2, 3, 4, 5)}

    def failing_open(path, *rest, **kwargs):
        if Path(path) in bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return open(path, *rest, **kwargs)

    monkeypatch.setattr(readers, "open", failing_open, raising=False)
    code, text = cli(*args)  # 1, 6, 7 missing; 0, 2-5 unreadable
    assert code == 1 and errors_of(output) == [0, 1, 2, 3, 4, 5, 6, 7], text
    code, text = cli(*args, "--retry-errors")  # only unreadable or missing images now
    assert code == 1 and "retrying 8 error rows" in text, text
    assert errors_of(output) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert "Input/output error" in rows(output)[0]["error"]


def test_a_merge_waits_for_a_retry_changing_the_parts_and_the_other_way(job):
    """A merge holds the merge lock from reading the parts to renaming its file, and
    drop_errors holds it while it changes them: a merge of the parts before a retry cannot
    replace the retry's output afterwards."""
    import threading

    from jobrunner.checkpoint import MERGE_LOCK, CheckpointStore, _manifest_lock
    from jobrunner.merge import output_is_current

    output, args = job
    code, text = cli(*args)
    assert code == 1, text
    parts = parts_dir(output)
    assert output_is_current(parts, output)
    store = CheckpointStore(parts)
    with store.lock():
        info = store.open_or_create(*_job_identity(parts), total_rows=ROWS)
        assert info.complete
        dropped = []
        with _manifest_lock(parts, MERGE_LOCK):  # as a merge in another process would
            worker = threading.Thread(target=lambda: dropped.append(store.drop_errors()))
            worker.start()
            worker.join(0.5)
            assert worker.is_alive() and store.is_complete()  # waits for the merge
        worker.join(10)
        assert dropped == [3] and not store.is_complete()
    assert not output_is_current(parts, output)


def _job_identity(parts: Path) -> tuple:
    """The spec, fingerprint and fields of the job in checkpoint ``parts``, to open it."""
    from jobrunner.checkpoint import read_manifest

    manifest = read_manifest(parts)
    return manifest["spec"], manifest["fingerprint"], manifest["fingerprint_fields"]


def test_retried_rows_that_generation_fails_for_again_are_errors_again(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Many retried rows failing in generation (a machine that still runs out of memory on
    them) are error records again, as they were: not a fault that leaves the job unfinished."""
    from tests.test_resume import _failing_generation

    lines = [{"id": f"g{i}", "image": f"{i % 5}.png", "prompt": f"Say {i}."} for i in range(20)]
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.parquet"
    args = ["run", str(source), "--model", str(tiny_model_dir), "--output", str(output), *ARGS]
    code, text = cli(*args)  # no image is there yet
    assert code == 1 and len(errors_of(output)) == 20, text
    for i in range(5):
        Image.new("RGB", (30, 20), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    _failing_generation(monkeypatch, lambda text: True)
    code, text = cli(*args, "--retry-errors")
    assert code == 1 and "retrying 20 error rows" in text, text
    assert {r["error"] for r in rows(output)} == {"generation failed: RuntimeError: device lost"}


def test_a_shard_retry_stopped_in_its_merge_is_merged_by_a_run_in_any_split(
    job, tmp_path, monkeypatch
):
    output, args = job
    for shard in ("0/2", "1/2"):
        assert cli(*args, "--shard", shard)[0] == 1
    restore_images(output)
    failing_merge(monkeypatch, output)
    code, text = cli(*args, "--shard", "0/2", "--retry-errors")
    assert code == 4, text
    monkeypatch.undo()
    code, text = cli(*args, "--shard", "1/2")  # complete, its own errors still there
    assert code == 1 and "merging it again" in text, text
    assert errors_of(output) == [1, 7]  # row 6, shard 0's, is merged now
    failing_merge(monkeypatch, output)
    code, text = cli(*args, "--shard", "1/2", "--retry-errors")
    assert code == 4, text
    monkeypatch.undo()
    code, text = cli(*args)  # no --shard: every shard is done, the output is not current
    assert code == 0 and "every shard of this job is done; wrote" in text, text
    assert rows(output) == fresh_run(output, args, tmp_path)


def test_a_finished_shard_run_while_another_retries_has_nothing_to_do(job, monkeypatch):
    output, args = job
    for shard in ("0/2", "1/2"):
        assert cli(*args, "--shard", shard)[0] == 1
    from jobrunner import runner

    def stopped(self, *rest, **kwargs):
        raise runner.Interrupted(signal.SIGINT)

    monkeypatch.setattr(runner._Session, "run", stopped)  # shard 0 dropped its errors, then ^C
    code, text = cli(*args, "--shard", "0/2", "--retry-errors")
    monkeypatch.undo()
    assert code == 130 and "retrying 1 error rows" in text, text
    code, text = cli("status", str(output))
    assert "a retry of 1 rows that were errors is under way" in text, text
    assert cli("status", str(output), "--json")[1].count('"retrying": 1') == 2  # job, shard 0
    code, text = cli(*args, "--shard", "1/2")
    assert code == 0 and "this shard is complete; " in text, text
    assert "the output holds 3 error records" in text, text


def test_merges_that_waited_for_one_another_write_the_output_once(job):
    import threading

    from jobrunner.checkpoint import MERGE_LOCK, _manifest_lock
    from jobrunner.merge import merge

    output, args = job
    assert cli(*args)[0] == 1
    parts = parts_dir(output)
    written = output.stat().st_mtime_ns
    results = []
    with _manifest_lock(parts, MERGE_LOCK):  # a merge in another process writes the output
        worker = threading.Thread(target=lambda: results.append(merge(parts, output)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()
    worker.join(10)
    assert results[0].errors == 3 and output.stat().st_mtime_ns == written  # not written again
    merge(parts, output)  # uncontended: written
    assert output.stat().st_mtime_ns != written


def test_a_retry_waiting_for_a_merge_gives_up_on_a_signal_and_changes_nothing(job):
    from jobrunner.checkpoint import MERGE_LOCK, CheckpointStore, _manifest_lock

    output, args = job
    assert cli(*args)[0] == 1
    parts = parts_dir(output)
    store = CheckpointStore(parts)
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with store.lock(), _manifest_lock(parts, MERGE_LOCK):
        store.open_or_create(*_job_identity(parts), total_rows=ROWS)
        with pytest.raises(KeyboardInterrupt):
            store.drop_errors(interrupted)
        assert store.errors == 3 and store.is_complete()


def test_merge_from_a_checkpoint_that_cannot_be_written(job, monkeypatch):
    """An older checkpoint on a read-only mount has no merge.lock and cannot get one: the merge
    goes on (nothing can change its parts)."""
    from jobrunner import locks
    from jobrunner.merge import merge

    output, args = job
    assert cli(*args)[0] == 1
    parts = parts_dir(output)
    (parts / "merge.lock").unlink()
    real = os.open

    def read_only(path, flags, *rest):
        if Path(path).name == "merge.lock" and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return real(path, flags, *rest)

    monkeypatch.setattr(locks.os, "open", read_only)
    output.unlink()
    assert merge(parts, output).errors == 3 and output.exists()


def test_retried_rows_the_storage_fails_to_read_are_checkpointed_on_schedule(job, monkeypatch):
    """Retried rows whose images the storage still cannot read are error records at once:
    they are written a part every --checkpoint-every rows (2), not all at the end of the run,
    so a kill loses at most one interval of them."""
    from jobrunner import readers

    output, args = job
    lines = [{"id": f"s{i}", "image": f"{i}.png", "prompt": "Describe."} for i in range(12)]
    (output.parent / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    bad = {output.parent / f"{i}.png" for i in range(10)}
    code_of = {"now": errno.ENOENT}

    def failing_open(path, *rest, **kwargs):
        if Path(path) in bad:
            raise OSError(code_of["now"], os.strerror(code_of["now"]), str(path))
        return open(path, *rest, **kwargs)

    monkeypatch.setattr(readers, "open", failing_open, raising=False)
    code, text = cli(*args)  # missing: error records at once
    assert code == 1, text
    progress = parts_dir(output) / "shard-00000-of-00001/progress.jsonl"

    code_of["now"] = errno.EIO  # the retry: the storage fails to read them
    code, text = cli(*args, "--retry-errors")
    assert code == 1 and "retrying 10 error rows" in text, text
    records = [json.loads(x) for x in progress.read_text().splitlines()]
    new = [r for r in records if r["errors"]]
    assert sum(r["errors"] for r in new) == 10
    assert max(r["rows"] for r in new) <= 2, [r["rows"] for r in new]


def test_a_signal_while_the_final_merge_waits_for_the_merge_lock_stops_the_run(
    job, tmp_path, monkeypatch
):
    """A run whose merge waits for another merge says so, and Ctrl-C stops it (130, the
    resume command) instead of being ignored until the other merge ends."""
    from jobrunner.checkpoint import MERGE_LOCK, _manifest_lock

    output, args = job
    assert cli(*args)[0] == 1
    restore_images(output)
    failing_merge(monkeypatch, output)
    assert cli(*args, "--retry-errors")[0] == 4  # the retry's merge failed: output is stale
    monkeypatch.undo()
    parts = parts_dir(output)
    with _manifest_lock(parts, MERGE_LOCK):  # a merge in another process
        run = Job(tmp_path, args[1:], stage="none")
        # in merge(), waiting for the lock
        assert run.wait_until(lambda: "waiting for a merge" in run.output()), run.output()
        run.signal(signal.SIGINT)
        time.sleep(1.0)
    code, text = run.wait()
    assert code == 130 and "waiting for a merge of this job" in text, text
    assert "resume with:" in text and "Traceback" not in text, text


def test_a_merge_that_waited_refuses_a_file_that_appeared_meanwhile(job):
    from jobrunner.checkpoint import MERGE_LOCK, CheckpointError, _manifest_lock
    from jobrunner.merge import merge

    output, args = job
    assert cli(*args)[0] == 1
    parts = parts_dir(output)
    results = []

    def merging():
        try:
            results.append(merge(parts, output))
        except CheckpointError as err:
            results.append(err)

    with _manifest_lock(parts, MERGE_LOCK):
        worker = threading.Thread(target=merging)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()
        pq.write_table(pa.table({"x": [1, 2, 3]}), output)  # another job's file, say
    worker.join(10)
    assert isinstance(results[0], CheckpointError), results
    assert pq.read_table(output).column_names == ["x"]


def test_a_merge_that_waited_writes_the_metadata_the_other_merge_left_out(job):
    """A run's merge that waited for `jobrunner merge` (no model id) writes the output again
    with the model it names, instead of leaving the other merge's metadata."""
    from jobrunner.checkpoint import MERGE_LOCK, _manifest_lock
    from jobrunner.merge import merge
    from jobrunner.writers import merged_metadata

    output, args = job
    assert cli(*args)[0] == 1
    parts = parts_dir(output)
    merge(parts, output)  # as `jobrunner merge` writes it: no model id
    assert merged_metadata(output).get("model_id") is None
    results = []
    with _manifest_lock(parts, MERGE_LOCK):
        meta = {"model_id": "m", "model_revision": "r"}
        worker = threading.Thread(
            target=lambda: results.append(merge(parts, output, metadata=meta))
        )
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()
    worker.join(10)
    assert merged_metadata(output).get("model_id") == "m"


def damage_finish_reasons(output: Path) -> None:
    """Garble the page header of the output's ``finish_reason`` column (a bad disk block)."""
    column = pq.ParquetFile(output).metadata.row_group(0).column(2)
    assert column.path_in_schema == "finish_reason"
    data = bytearray(output.read_bytes())
    for i in range(column.data_page_offset + 4, column.data_page_offset + 16):
        data[i] ^= 0xFF
    output.write_bytes(bytes(data))


@pytest.mark.parametrize("checkpoint", ["kept", "removed"])
def test_a_damaged_output_is_said_to_be_damaged(job, checkpoint):
    """An output whose error count cannot be read (a damaged page) is refused as damaged with
    what mends it, never a storage fault that the same command would meet again (exit 4)."""
    output, args = job
    assert cli(*args)[0] == 1
    if checkpoint == "removed":
        shutil.rmtree(parts_dir(output))
    damage_finish_reasons(output)
    code, text = cli(*args)
    assert code == 2 and "it is damaged" in text and "--overwrite" in text, text
    code, text = cli(*args, "--retry-errors")
    if checkpoint == "removed":  # the output cannot make the checkpoint again
        assert code == 2 and "it is damaged" in text and "--overwrite" in text, text
    else:  # the checkpoint holds the rows: the retry's merge writes the output again
        assert code == 1 and "retrying 3 error rows" in text and errors_of(output) == [1, 6, 7]
        damage_finish_reasons(output)
        output.rename(output.with_suffix(".damaged"))  # moved away: the checkpoint merges it
        code, text = cli(*args)
        assert code == 1 and errors_of(output) == list(MISSING), text


def test_a_run_on_other_versions_than_the_job_started_with_says_so(job):
    """The manifest records the versions that make the rows (MLX, jobrunner's own code, ...):
    a later run of the job on others says its rows may differ from the saved ones; on the
    same, or on a checkpoint that recorded none, it says nothing."""
    output, args = job
    assert cli(*args)[0] == 1
    manifest_path = parts_dir(output) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    made_with = manifest["made_with"]
    assert made_with["mlx"] and len(made_with["jobrunner-code"]) == 12
    restore_images(output)
    shutil.copy(output.parent / "spare" / "1.png", output.parent / "spare-1.png")
    (output.parent / "1.png").unlink()  # row 1 fails again: a second retry has work to do
    code, text = cli(*args, "--retry-errors")
    assert code == 1 and "were made with" not in text, text
    manifest["made_with"] = made_with | {"mlx": "0.0.1", "jobrunner-code": "000000000000"}
    manifest_path.write_text(json.dumps(manifest))
    shutil.copy(output.parent / "spare-1.png", output.parent / "1.png")
    code, text = cli(*args, "--retry-errors", "--quiet")
    assert code == 0, text
    now = f"jobrunner-code {made_with['jobrunner-code']}, mlx {made_with['mlx']}"
    assert (
        f"saved rows were made with jobrunner-code 000000000000, mlx 0.0.1; this run has {now}"
        in text
    ), text
    del manifest["made_with"]  # a checkpoint of a jobrunner before it recorded them
    manifest_path.write_text(json.dumps(manifest))
    code, text = cli(*args, "--retry-errors")
    assert code == 0 and "were made with" not in text, text
