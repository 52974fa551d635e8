"""Checkpoint store: durable parts, crash recovery, fingerprints, locks, shards, merge, status."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobrunner import checkpoint
from jobrunner.checkpoint import (
    CheckpointError,
    CheckpointStore,
    FingerprintMismatch,
    JobLock,
    LockHeld,
    is_locked,
    shard_of,
    shard_rows,
)
from jobrunner.merge import IncompleteJob, all_shards_complete, check_coverage, merge, status
from jobrunner.writers import (
    ParquetOutputMetadata,
    PartWriter,
    read_output_metadata,
    records_to_table,
)

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"model": "tiny", "revision": "r1", "max_tokens": 32, "prompt": "Describe."}
SPEC = {"input": "data.jsonl", "output": "out.parquet", "batch_size": 4}


def record(i: int) -> dict:
    """A deterministic result for input row i (every 5th row is an error record)."""
    if i % 5 == 4:
        base = {"output": None, "finish_reason": "error", "error": f"row {i}: bad image"}
    else:
        base = {"output": f"caption {i}", "finish_reason": "stop" if i % 3 else "length"}
        base["error"] = None
    extra = {"source": f"src{i}", "width": 100 + i, "score": 0.5 if i % 2 else 1}
    return {
        "index": i,
        "id": f"id-{i}",
        "prompt_tokens": 20 + i,
        "output_tokens": i % 7,
        **base,
        **extra,
    }


def table_of(indices) -> pa.Table:
    return records_to_table([record(i) for i in indices], ["source", "width", "score"])


def open_store(directory: Path, shard=None, fields=FIELDS, overwrite=False, total=None):
    store = CheckpointStore(directory, shard)
    lock = store.lock().acquire()
    info = store.open_or_create(SPEC, fingerprint_of(fields), fields, overwrite, total)
    return store, lock, info


def fingerprint_of(fields: dict) -> str:
    return str(hash(json.dumps(fields, sort_keys=True)))


def run_shard(directory: Path, shard, total: int, every_rows: int, seed: int = 0) -> None:
    """Write every row of one shard in a shuffled order (as length-sorted batches would)."""
    k, n = shard
    store, lock, _ = open_store(directory, shard)
    indices = [i for i in range(total) if shard_of(i, n) == k and not store.is_done(i)]
    random.Random(seed).shuffle(indices)
    writer = PartWriter(store, ["source", "width", "score"], every_rows, None)
    for i in indices:
        writer.add(record(i))
        writer.maybe_flush()
    writer.flush()
    store.mark_complete(total)
    lock.release()


def shard_dir(directory: Path, k: int = 0, n: int = 1) -> Path:
    return directory / checkpoint.shard_name(k, n)


def progress_lines(directory: Path, k: int = 0, n: int = 1) -> list[dict]:
    text = (shard_dir(directory, k, n) / "progress.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


# --- shards ------------------------------------------------------------------------------------


def test_shard_partition_is_stable_and_complete():
    n, total = 3, 100
    assert [shard_of(i, n) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert sum(shard_rows(total, k, n) for k in range(n)) == total
    for k in range(n):
        assert shard_rows(total, k, n) == sum(shard_of(i, n) == k for i in range(total))
    assert shard_rows(2, 2, 3) == 0


@pytest.mark.parametrize("shard", [(3, 3), (-1, 2), (0, 0)])
def test_bad_shard_is_refused(tmp_path, shard):
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, shard)


# --- parts and recovery ------------------------------------------------------------------------


def test_store_refuses_work_without_lock(tmp_path):
    store = CheckpointStore(tmp_path / "parts")
    with pytest.raises(RuntimeError):
        store.open_or_create(SPEC, "fp", FIELDS)


def test_write_part_records_after_file_is_durable(tmp_path):
    store, lock, info = open_store(tmp_path / "parts")
    assert not info.resumed and info.rows_done == 0
    rec = store.write_part(table_of([5, 1, 3]))
    part = shard_dir(tmp_path / "parts") / rec.part
    assert pq.read_table(part).column("row_index").to_pylist() == [1, 3, 5]  # sorted
    assert progress_lines(tmp_path / "parts") == [json.loads(rec.to_line())]
    assert rec.bytes == part.stat().st_size and rec.rows == 3 and rec.errors == 0
    assert (rec.min_index, rec.max_index) == (1, 5)
    with pytest.raises(ValueError):
        store.write_part(table_of([3, 7]))  # row 3 is already written
    lock.release()


def test_write_part_refuses_rows_of_another_shard(tmp_path):
    store, lock, _ = open_store(tmp_path / "parts", shard=(1, 3))
    with pytest.raises(ValueError):
        store.write_part(table_of([1, 2]))
    store.write_part(table_of([1, 4]))
    lock.release()


def test_crash_after_rename_before_record_leaves_nothing_trusted(tmp_path, monkeypatch):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of(range(0, 4)))

    def killed(path, record):
        raise KeyboardInterrupt  # the process dies between the rename and the record

    monkeypatch.setattr(checkpoint, "_append_record", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_part(table_of(range(4, 8)))
    lock.release()
    monkeypatch.undo()
    assert (shard_dir(directory) / "part-000001.parquet").exists()

    store, lock, info = open_store(directory)
    assert store.done_indices() == {0, 1, 2, 3}
    assert not (shard_dir(directory) / "part-000001.parquet").exists()
    assert any("part-000001.parquet" in line for line in info.cleaned)
    store.write_part(table_of(range(4, 8)))  # the redone rows are accepted
    assert store.done_indices() == set(range(8))
    lock.release()


def _damage(kind: str, sdir: Path) -> None:
    """Leave the shard folder as a crash (or a bad disk) would."""
    if kind == "temp_file":
        (sdir / ".part-000002.parquet.123.abcdef.tmp").write_bytes(b"PAR1 half a part")
    elif kind == "unrecorded_part":
        pq.write_table(table_of([100, 101]), sdir / "part-000007.parquet")
    elif kind == "truncated_part":
        data = (sdir / "part-000001.parquet").read_bytes()
        (sdir / "part-000001.parquet").write_bytes(data[: len(data) // 2])
    elif kind == "corrupt_same_size":
        path = sdir / "part-000001.parquet"
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "deleted_part":
        (sdir / "part-000001.parquet").unlink()
    elif kind == "torn_progress_line":
        with open(sdir / "progress.jsonl", "ab") as f:
            f.write(b'{"part": "part-000002.parquet", "rows": 4, "err')
    elif kind == "record_lies_about_rows":
        lines = (sdir / "progress.jsonl").read_text().splitlines()
        second = json.loads(lines[1])
        lines[1] = json.dumps({**second, "rows": second["rows"] + 1})
        (sdir / "progress.jsonl").write_text("\n".join(lines) + "\n")
    elif kind == "garbage_progress_line":
        with open(sdir / "progress.jsonl", "ab") as f:
            f.write(b"not json\n")


# rows 0..3 in part 0, rows 4..7 in part 1; which rows each damage must leave trusted
DAMAGES = {
    "temp_file": set(range(8)),
    "unrecorded_part": set(range(8)),
    "truncated_part": set(range(4)),
    "corrupt_same_size": set(range(4)),
    "deleted_part": set(range(4)),
    "torn_progress_line": set(range(8)),
    "garbage_progress_line": set(range(8)),
    "record_lies_about_rows": set(range(4)),
}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damage_is_ignored_and_cleaned_on_reopen(tmp_path, kind):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of(range(0, 4)))
    store.write_part(table_of(range(4, 8)))
    lock.release()
    sdir = shard_dir(directory)
    _damage(kind, sdir)

    store, lock, info = open_store(directory)
    assert store.done_indices() == DAMAGES[kind]
    assert info.rows_done == len(DAMAGES[kind]) and info.resumed
    assert info.cleaned  # the recovery says what it dropped
    parts = sorted(p.name for p in sdir.iterdir() if p.suffix in (".parquet", ".tmp"))
    assert parts == sorted(r["part"] for r in progress_lines(directory))
    assert (sdir / "progress.jsonl").read_bytes().endswith(b"\n")
    # the store keeps working: missing rows can be written, and a third open agrees
    missing = sorted(set(range(10)) - DAMAGES[kind])
    store.write_part(table_of(missing))
    lock.release()
    store, lock, info = open_store(directory)
    assert store.done_indices() == set(range(10)) and info.cleaned == []
    lock.release()


def test_resume_reports_done_rows_and_errors(tmp_path):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of([0, 2, 4]))
    store.write_part(table_of([9, 3]))
    lock.release()
    store, lock, info = open_store(directory)
    assert info.resumed and not info.complete
    assert (info.rows_done, info.errors, info.parts) == (5, 2, 2)  # rows 4 and 9 are errors
    assert store.done_indices() == {0, 2, 3, 4, 9}
    assert store.is_done(3) and not store.is_done(1)
    rec = store.write_part(table_of([1]))
    assert rec.part == "part-000002.parquet"
    lock.release()


# --- fingerprints and overwrite ----------------------------------------------------------------


def test_fingerprint_mismatch_names_what_changed(tmp_path):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of([0]))
    lock.release()
    changed = {**FIELDS, "max_tokens": 64, "revision": "r2"}
    store = CheckpointStore(directory)
    with store.lock(), pytest.raises(FingerprintMismatch) as exc:
        store.open_or_create(SPEC, fingerprint_of(changed), changed)
    message = str(exc.value)
    assert "max_tokens: 32 → 64" in message
    assert 'revision: "r1" → "r2"' in message
    assert "model" not in message and "prompt" not in message
    assert "--overwrite" in message
    assert (shard_dir(directory) / "part-000000.parquet").exists()  # nothing was touched


def test_other_shard_count_is_a_mismatch(tmp_path):
    directory = tmp_path / "parts"
    _, lock, _ = open_store(directory, shard=(0, 2))
    lock.release()
    with pytest.raises(FingerprintMismatch, match="shards: 2 → 3"):
        open_store(directory, shard=(0, 3))


def test_overwrite_starts_over_and_keeps_foreign_files(tmp_path):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of([0, 1]))
    store.mark_complete(2)
    lock.release()
    (directory / "notes.txt").write_text("mine")
    changed = {**FIELDS, "prompt": "Caption."}
    store, lock, info = open_store(directory, fields=changed, overwrite=True)
    assert not info.resumed and info.rows_done == 0 and not info.complete
    assert store.done_indices() == set()
    assert list(shard_dir(directory).iterdir()) == []
    manifest = checkpoint.read_manifest(directory)
    assert manifest["fingerprint"] == fingerprint_of(changed) and manifest["total_rows"] is None
    assert (directory / "notes.txt").read_text() == "mine"
    lock.release()


def test_overwrite_of_same_job_redoes_only_this_shard(tmp_path):
    directory = tmp_path / "parts"
    for k in range(2):
        store, lock, _ = open_store(directory, shard=(k, 2))
        store.write_part(table_of([k, k + 2]))
        lock.release()
    _, lock, info = open_store(directory, shard=(0, 2), overwrite=True)
    assert info.rows_done == 0
    lock.release()
    store, lock, info = open_store(directory, shard=(1, 2))
    assert store.done_indices() == {1, 3}
    lock.release()


def test_overwrite_refuses_while_old_shards_run(tmp_path):
    directory = tmp_path / "parts"
    _, running, _ = open_store(directory, shard=(1, 2))
    changed = {**FIELDS, "model": "other"}
    with pytest.raises(CheckpointError, match="shard-00001-of-00002"):
        open_store(directory, shard=(0, 2), fields=changed, overwrite=True)
    running.release()


def test_shard_folders_without_manifest_are_not_trusted(tmp_path):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of([0]))
    lock.release()
    (directory / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="--overwrite"):
        open_store(directory)


@pytest.mark.parametrize("text", ["", '{"num_shards": 1, "fing', "[]", "null", '{"x": 1}'])
def test_damaged_manifest_is_refused_and_overwrite_replaces_it(tmp_path, text):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of([0, 1]))
    lock.release()
    (directory / "manifest.json").write_text(text)
    store = CheckpointStore(directory)
    with store.lock():
        for read in (
            lambda: store.open_or_create(SPEC, fingerprint_of(FIELDS), FIELDS),
            lambda: status(directory),
            lambda: merge(directory, tmp_path / "out.parquet"),
        ):
            with pytest.raises(CheckpointError, match="manifest.json is damaged.*--overwrite"):
                read()
    store, lock, info = open_store(directory, overwrite=True)
    assert info.rows_done == 0 and not info.resumed
    assert checkpoint.read_manifest(directory)["fingerprint"] == fingerprint_of(FIELDS)
    lock.release()


def test_total_rows_change_is_refused(tmp_path):
    directory = tmp_path / "parts"
    _, lock, info = open_store(directory, total=10)
    assert info.total_rows == 10
    lock.release()
    with pytest.raises(CheckpointError, match="11 rows"):
        open_store(directory, total=11)


# --- locks -------------------------------------------------------------------------------------

HOLD_LOCK = (
    "import sys, time; sys.path.insert(0, sys.argv[2]);"
    "from jobrunner.checkpoint import JobLock;"
    "lock = JobLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)"
)


def hold_lock_in_subprocess(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_contention_raises_lock_held(tmp_path):
    store = CheckpointStore(tmp_path / "parts")
    proc = hold_lock_in_subprocess(store.lock_path)
    try:
        assert is_locked(store.lock_path)
        with pytest.raises(LockHeld) as exc:
            store.lock().acquire()
        assert exc.value.info["pid"] == proc.pid
        assert f"pid {proc.pid}" in str(exc.value)
        assert not store.lock().held
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_killed_process_does_not_block(tmp_path):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of([0, 1]))
    lock.release()
    proc = hold_lock_in_subprocess(store.lock_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.lock_path.exists()  # the lock file is left behind ...
    assert not is_locked(store.lock_path)  # ... but holds no lock
    store, lock, info = open_store(directory)
    assert info.rows_done == 2
    lock.release()


def test_lock_is_exclusive_within_a_process_and_released(tmp_path):
    path = tmp_path / "x.lock"
    assert not is_locked(path)
    with JobLock(path) as first:
        assert first.held and is_locked(path)
        with pytest.raises(LockHeld):
            JobLock(path).acquire()
    assert not is_locked(path)
    JobLock(path).acquire().release()


def test_lock_in_unwritable_place_is_a_checkpoint_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="cannot create the lock file") as exc:
        JobLock(blocker / "parts" / "x.lock").acquire()
    assert not isinstance(exc.value, LockHeld)


def test_shards_lock_independently(tmp_path):
    directory = tmp_path / "parts"
    _, lock0, _ = open_store(directory, shard=(0, 2))
    _, lock1, _ = open_store(directory, shard=(1, 2))  # no LockHeld: another shard
    lock0.release()
    lock1.release()


# --- completion and merge ----------------------------------------------------------------------


def test_mark_complete_requires_every_row(tmp_path):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory, shard=(1, 3))
    store.write_part(table_of([1, 4]))
    with pytest.raises(CheckpointError, match="2 of 3 rows"):
        store.mark_complete(8)  # shard 1 of 8 rows is {1, 4, 7}
    store.write_part(table_of([7]))
    done = store.mark_complete(8)
    assert done["rows"] == 3 and store.is_complete()
    lock.release()
    _, lock, info = open_store(directory, shard=(1, 3))
    assert info.complete and info.total_rows == 8
    lock.release()


@pytest.mark.parametrize("content", ["[]", "7", '"done"', "null", '{"rows": '])
def test_a_completion_marker_that_is_no_json_object_is_no_marker(tmp_path, content):
    directory = tmp_path / "parts"
    run_shard(directory, (0, 1), total=4, every_rows=2)
    (shard_dir(directory) / "complete.json").write_text(content)
    assert not all_shards_complete(directory)
    assert status(directory)["shards"][0]["complete"] is False
    with pytest.raises(IncompleteJob):
        merge(directory, tmp_path / "out.parquet")
    store, lock, info = open_store(directory, total=4)
    assert not info.complete and info.rows_done == 4
    store.mark_complete(4)
    assert store.is_complete()
    lock.release()


def test_damaged_part_of_complete_shard_reopens_incomplete(tmp_path):
    directory = tmp_path / "parts"
    run_shard(directory, (0, 1), total=6, every_rows=3)
    _damage("truncated_part", shard_dir(directory))
    with pytest.raises(CheckpointError, match="run shard 0/1 again"):
        merge(directory, tmp_path / "out.parquet")
    _, lock, info = open_store(directory)
    assert not info.complete and info.rows_done == 3
    assert not (shard_dir(directory) / "complete.json").exists()
    lock.release()


def test_merge_refuses_while_a_shard_is_missing_or_incomplete(tmp_path):
    directory = tmp_path / "parts"
    run_shard(directory, (0, 3), total=9, every_rows=2)
    store, lock, _ = open_store(directory, shard=(1, 3))
    store.write_part(table_of([1]))
    lock.release()
    with pytest.raises(IncompleteJob) as exc:
        merge(directory, tmp_path / "out.parquet")
    assert exc.value.missing == [2]
    assert exc.value.incomplete == {1: (1, 3)}
    assert "shard 2/3 has not started" in str(exc.value)
    assert "shard 1/3 is incomplete (1/3 rows)" in str(exc.value)
    assert not (tmp_path / "out.parquet").exists()
    assert not all_shards_complete(directory)


def test_merge_writes_input_order_each_row_once(tmp_path):
    directory, out = tmp_path / "parts", tmp_path / "out.parquet"
    total = 53
    run_shard(directory, (0, 1), total=total, every_rows=6, seed=1)
    assert all_shards_complete(directory)
    info = merge(directory, out, rows_per_group=7)  # parts straddle many merge windows
    table = pq.read_table(out)
    assert table.column("row_index").to_pylist() == list(range(total))
    assert table.column("id").to_pylist() == [f"id-{i}" for i in range(total)]
    assert table.column("output").to_pylist() == [record(i)["output"] for i in range(total)]
    assert table.column("error").to_pylist() == [record(i)["error"] for i in range(total)]
    assert info.rows == total and info.errors == sum(i % 5 == 4 for i in range(total))
    assert table.column_names[:6] == [
        "id",
        "output",
        "finish_reason",
        "error",
        "prompt_tokens",
        "output_tokens",
    ]
    assert table.column_names[6:] == ["source", "width", "score", "row_index"]
    assert table.schema.field("width").type == pa.int64()
    assert table.schema.field("score").type == pa.float64()  # ints and floats → float64
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_merge_window_shrinks_for_wide_rows(tmp_path, monkeypatch):
    """The merge holds a window of rows at a time: of wide rows (long kept strings), fewer,
    so that its memory is bounded in bytes, not only in rows (65536 rows of 20 kB each held
    several times over took 1.4 GB)."""
    from jobrunner import merge as merge_module

    monkeypatch.setattr(merge_module, "MERGE_WINDOW_BYTES", 40_000)
    monkeypatch.setattr(merge_module, "MIN_WINDOW_ROWS", 1)
    directory, out = tmp_path / "parts", tmp_path / "out.parquet"
    total = 120
    store, lock, _ = open_store(directory)
    writer = PartWriter(store, ["blob"], 25, None)
    for i in range(total):
        writer.add({**record(i), "blob": f"{i}:" + "x" * 4000})
        writer.maybe_flush()
    writer.flush()
    store.mark_complete(total)
    lock.release()
    merge(directory, out)  # rows_per_group 65536: every row in one window, before
    metadata = pq.ParquetFile(out).metadata
    groups = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    assert sum(groups) == total and max(groups) <= 10  # about 40 kB of 4 kB rows each
    table = pq.read_table(out)
    assert table.column("row_index").to_pylist() == list(range(total))
    assert table.column("blob").to_pylist() == [f"{i}:" + "x" * 4000 for i in range(total)]


def test_write_part_does_not_list_the_shard_folder(tmp_path, monkeypatch):
    """Each part write listed the shard folder for orphan temps (a glob): quadratic in the
    parts of a shard (9.6 ms a part at 12,000 parts, from 2 ms). Stray temps are removed
    when the shard is opened."""
    store, lock, _ = open_store(tmp_path / "parts")
    stray = shard_dir(tmp_path / "parts") / f".part-000003.parquet.{socket.gethostname()}.1.x.tmp"
    listed = []
    scandir = os.scandir

    def counting(path="."):
        listed.append(path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counting)
    for i in range(30):
        store.write_part(table_of([i]))
    assert listed == []
    lock.release()
    monkeypatch.undo()
    stray.write_bytes(b"half a part")  # a run killed while writing part 3
    store, lock, info = open_store(tmp_path / "parts")
    assert not stray.exists() and info.rows_done == 30
    lock.release()


def test_next_part_number_does_not_rescan_every_record(tmp_path, monkeypatch):
    """Writing a part looked at every earlier record for the next part number (a regex
    match each): quadratic in the parts of a shard (1.6 ms a part at 3,900 parts, and 40 ms
    at 100,000 parts of a small --checkpoint-every)."""
    store, lock, _ = open_store(tmp_path / "parts")
    matched = []
    pattern = checkpoint._PART_RE

    class Counting:
        def match(self, name):
            matched.append(name)
            return pattern.match(name)

    monkeypatch.setattr(checkpoint, "_PART_RE", Counting())
    for i in range(60):
        store.write_part(table_of([i]))
    assert len(matched) <= 2 * 60  # not 60 * 59 / 2
    lock.release()
    store, lock, _ = open_store(tmp_path / "parts")  # numbering goes on after a resume
    store.write_part(table_of([60]))
    assert store._records[-1].part == "part-000060.parquet"
    lock.release()


def test_merge_removes_temps_of_killed_merges_only(tmp_path):
    """A merge killed midway leaves a temp next to the output; the next merge on this host
    deletes it, but not a temp another host or a live process may still be writing."""
    directory, out = tmp_path / "parts", tmp_path / "out.parquet"
    run_shard(directory, (0, 1), total=9, every_rows=4, seed=2)
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".out.parquet.{host}.{dead.pid}.0123456789ab.tmp"
    live = tmp_path / f".out.parquet.{host}.{os.getpid()}.0123456789ab.tmp"
    elsewhere = tmp_path / f".out.parquet.other-host.{dead.pid}.0123456789ab.tmp"
    unrelated = tmp_path / f".other.parquet.{host}.{dead.pid}.0123456789ab.tmp"
    for path in (orphan, live, elsewhere, unrelated):
        path.write_bytes(b"PAR1 half a file")
    merge(directory, out)
    assert pq.read_table(out).num_rows == 9
    assert not orphan.exists()
    assert live.exists() and elsewhere.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == sorted(
        p.name for p in (live, elsewhere, unrelated)
    )


def test_merge_detects_rows_missing_or_duplicated(tmp_path):
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. \[2\]\)"):
        check_coverage(pa.array([0, 1, 3]).to_numpy(), 4)
    with pytest.raises(CheckpointError, match=r"1 duplicated \(e.g. \[1\]\)"):
        check_coverage(pa.array([0, 1, 1, 2, 3]).to_numpy(), 4)
    check_coverage(pa.array([3, 1, 0, 2]).to_numpy(), 4)


def test_three_shards_merge_equals_single_shard_run(tmp_path):
    total = 40
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run_shard(single, (0, 1), total=total, every_rows=7)
    for k in (2, 0, 1):  # finishing order does not matter
        run_shard(sharded, (k, 3), total=total, every_rows=3, seed=k)
    merge(single, tmp_path / "single.parquet")
    merge(sharded, tmp_path / "sharded.parquet")
    a = pq.read_table(tmp_path / "single.parquet")
    b = pq.read_table(tmp_path / "sharded.parquet")
    assert a.schema.remove_metadata() == b.schema.remove_metadata()
    assert a.to_pylist() == b.to_pylist()


WRITE_SHARD = """
import sys
sys.path.insert(0, sys.argv[1])
from jobrunner.checkpoint import CheckpointStore
from jobrunner.writers import PartWriter
directory, k, n, total = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
store = CheckpointStore(directory, (k, n))
with store.lock():
    store.open_or_create({"job": 1}, "fp", {"model": "m"})
    writer = PartWriter(store, [], every_rows=2, every_seconds=None)
    for i in range(k, total, n):
        writer.add({"index": i, "id": str(i), "output": f"o{i}", "finish_reason": "stop",
                    "error": None, "prompt_tokens": 1, "output_tokens": 2})
        writer.maybe_flush()
    writer.flush()
    store.mark_complete(total)
"""


def test_concurrent_shard_processes_merge_to_every_row(tmp_path):
    directory, total = tmp_path / "parts", 31
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITE_SHARD, str(ROOT), str(directory), str(k), "3", str(total)]
        )
        for k in range(3)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert all_shards_complete(directory)
    merge(directory, tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("id").to_pylist() == [str(i) for i in range(total)]
    assert table.column("output").to_pylist() == [f"o{i}" for i in range(total)]


def test_kept_column_types_do_not_depend_on_part_boundaries(tmp_path):
    values = {0: 1, 1: 2.5, 2: "x", 3: None}  # mixed kinds → JSON text in every layout
    rows = [{**record(i), "v": values[i]} for i in range(4)]
    outputs = []
    for every_rows in (1, 4):
        directory = tmp_path / f"parts{every_rows}"
        store, lock, _ = open_store(directory)
        writer = PartWriter(store, ["v"], every_rows, None)
        for row in rows:
            writer.add(row)
            writer.maybe_flush()
        writer.flush()
        store.mark_complete(4)
        lock.release()
        merge(directory, tmp_path / f"out{every_rows}.parquet")
        outputs.append(pq.read_table(tmp_path / f"out{every_rows}.parquet"))
    assert outputs[0].to_pylist() == outputs[1].to_pylist()
    assert outputs[0].column("v").to_pylist() == ["1", "2.5", '"x"', None]


def test_merged_file_carries_metadata(tmp_path):
    directory, out = tmp_path / "parts", tmp_path / "out.parquet"
    run_shard(directory, (0, 1), total=3, every_rows=2)
    meta = ParquetOutputMetadata(
        spec=SPEC, fingerprint=fingerprint_of(FIELDS), model_id="tiny", model_revision="abc"
    )
    merge(directory, out, metadata=meta.to_dict())
    data = read_output_metadata(out)
    assert data["fingerprint"] == fingerprint_of(FIELDS)
    assert data["spec"] == SPEC
    assert data["model_id"] == "tiny" and data["model_revision"] == "abc"
    assert data["versions"]["pyarrow"] == pa.__version__
    assert data["fingerprint_fields"] == {}  # the caller's value wins over the manifest's
    merge(directory, out)  # without caller metadata: the manifest's spec and fingerprint
    data = read_output_metadata(out)
    assert data["fingerprint_fields"] == FIELDS and data["spec"] == SPEC


def test_merge_of_empty_input(tmp_path):
    directory, out = tmp_path / "parts", tmp_path / "out.parquet"
    _, lock, _ = open_store(directory)
    lock.release()
    store, lock, _ = open_store(directory)
    store.mark_complete(0)
    lock.release()
    info = merge(directory, out)
    assert info.rows == 0 and pq.read_table(out).num_rows == 0


# --- status ------------------------------------------------------------------------------------


def test_status_of_running_then_finished_job(tmp_path):
    directory, out = tmp_path / "parts", tmp_path / "out.parquet"
    assert status(directory)["exists"] is False
    store, lock, _ = open_store(directory, shard=(0, 2), total=10)
    store.session_start = time.time() - 10  # the run started 10 s ago
    store.write_part(table_of([0, 2, 4]))
    report = status(directory, out)
    assert report["exists"] and report["running"] and not report["complete"]
    assert (report["total_rows"], report["rows_done"], report["errors"]) == (10, 3, 1)
    shard0, shard1 = report["shards"]
    assert shard0["running"] and shard0["lock"]["pid"] == os.getpid()
    assert (shard0["rows_done"], shard0["rows_total"]) == (3, 5)
    assert 0.2 < shard0["rows_per_second"] < 0.4  # 3 rows in ~10 s
    assert 5 < shard0["eta_seconds"] < 10  # 2 rows left
    assert not shard1["running"] and not shard1["started"] and shard1["rows_total"] == 5

    store.write_part(table_of([6, 8]))
    store.mark_complete(10)
    lock.release()
    run_shard(directory, (1, 2), total=10, every_rows=2)
    report = status(directory, out)
    assert report["complete"] and not report["running"] and not report["output_exists"]
    assert report["rows_done"] == 10 and report["eta_seconds"] is None
    merge(directory, out)
    assert status(directory, out)["output_exists"]


def test_abandon_new_removes_only_a_new_job_that_recorded_nothing(tmp_path):
    directory = tmp_path / "parts"
    store, lock, info = open_store(directory)
    assert info.created
    assert store.abandon_new()
    assert not (directory / "manifest.json").exists() and not shard_dir(directory).exists()
    lock.release()
    # a part recorded on disk (a signal came before the store noted it in memory): kept
    store, lock, _ = open_store(directory)
    store.write_part(table_of([0, 1]))
    store._records.clear()
    assert not store.abandon_new()
    assert (directory / "manifest.json").exists() and progress_lines(directory)
    lock.release()
    # a resumed job is never abandoned
    store, lock, info = open_store(directory)
    assert not info.created and not store.abandon_new()
    lock.release()


def test_the_shards_of_a_new_job_that_all_fail_leave_nothing(tmp_path):
    directory = tmp_path / "parts"
    first, first_lock, info = open_store(directory, (0, 2))
    second, second_lock, joined = open_store(directory, (1, 2))
    assert info.created and not joined.created
    # the creator fails first, while the other still runs: its own folder goes, the job stays
    assert not first.abandon_new()
    assert not shard_dir(directory, 0, 2).exists()
    assert (directory / "manifest.json").exists()
    # the last to fail, though it did not create the job, removes it, even while the first
    # still holds its lock (unwinding after its own abandon)
    assert second.abandon_new()
    assert not (directory / "manifest.json").exists()
    assert not any(p.is_dir() for p in directory.iterdir())
    first_lock.release()
    second_lock.release()


def test_a_failing_shard_keeps_the_work_of_the_others(tmp_path):
    directory = tmp_path / "parts"
    done, done_lock, _ = open_store(directory, (0, 2), total=4)
    done.write_part(table_of([0, 2]))
    done.mark_complete(4)
    done_lock.release()
    failing, failing_lock, _ = open_store(directory, (1, 2), total=4)
    assert not failing.abandon_new()
    assert (directory / "manifest.json").exists()
    assert not shard_dir(directory, 1, 2).exists() and progress_lines(directory, 0, 2)
    failing_lock.release()
    # a shard that owed no rows is complete without any: it is kept too
    directory = tmp_path / "small"
    empty, empty_lock, _ = open_store(directory, (1, 2), total=1)
    empty.mark_complete(1)
    empty_lock.release()
    empty, empty_lock, info = open_store(directory, (1, 2), total=1)
    assert info.complete and not empty.abandon_new()
    assert (directory / "manifest.json").exists() and shard_dir(directory, 1, 2).exists()
    empty_lock.release()


# --- retrying error rows -------------------------------------------------------------------------


def saved_rows(directory: Path) -> list[dict]:
    """The rows of every part file in shard 0/1, by row index."""
    rows = [
        r for p in shard_dir(directory).glob("part-*.parquet") for r in pq.read_table(p).to_pylist()
    ]
    return sorted(rows, key=lambda r: r["row_index"])


def test_drop_errors_forgets_only_error_records_and_the_completion(tmp_path):
    directory, total = tmp_path / "parts", 20
    run_shard(directory, (0, 1), total, every_rows=6)
    store, lock, info = open_store(directory, total=total)
    assert info.complete and info.errors == 4  # rows 4, 9, 14, 19
    before = saved_rows(directory)
    times = {r.min_index: (r.time, r.session_start) for r in store._records}
    assert store.drop_errors() == 4
    # status's rate: the rewritten parts keep the time their rows were done
    assert all(times[r.min_index] == (r.time, r.session_start) for r in store._records)
    assert store.retried == {4, 9, 14, 19}
    assert store.done_indices() == {i for i in range(total) if i % 5 != 4}
    assert (store.rows_done, store.errors) == (16, 0) and not store.is_complete()
    assert store.drop_errors() == 0
    lock.release()
    # on disk: only the records of the good rows, unchanged, and no completion marker
    store, lock, info = open_store(directory, total=total)
    assert (info.rows_done, info.errors, info.complete, info.cleaned) == (16, 0, False, [])
    assert saved_rows(directory) == [r for r in before if r["finish_reason"] != "error"]
    store.write_part(table_of([4, 9, 14, 19]))  # the rows run again
    store.mark_complete(total)
    assert not (shard_dir(directory) / "retrying.json").exists()
    lock.release()
    merged = merge(directory, tmp_path / "out.parquet").path
    assert pq.read_table(merged).column("row_index").to_pylist() == list(range(total))


@pytest.mark.parametrize("killed_in", ["atomic_write_bytes", "_clean_shard_dir"])
def test_drop_errors_killed_midway_leaves_the_old_records_or_the_new(
    tmp_path, monkeypatch, killed_in
):
    directory, total = tmp_path / "parts", 20
    run_shard(directory, (0, 1), total, every_rows=6)
    store, lock, _ = open_store(directory, total=total)
    real = getattr(checkpoint, killed_in)

    def killed(path, *args, **kwargs):
        if Path(path).name == "progress.jsonl" or killed_in == "_clean_shard_dir":
            raise KeyboardInterrupt  # the process dies here
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, killed_in, killed)
    with pytest.raises(KeyboardInterrupt):
        store.drop_errors()
    lock.release()
    monkeypatch.undo()
    store, lock, info = open_store(directory, total=total)
    if killed_in == "atomic_write_bytes":  # before progress was replaced: the errors are kept
        assert (info.rows_done, info.errors) == (20, 4)
    else:  # after: they are gone, and the old part files are removed as untrusted
        assert (info.rows_done, info.errors) == (16, 0)
    assert not info.complete  # the marker goes first; a finished shard is marked again
    names = {p.name for p in shard_dir(directory).glob("part-*.parquet")}
    assert names == {line["part"] for line in progress_lines(directory)}
    lock.release()


def test_a_shard_that_dropped_its_errors_is_never_abandoned(tmp_path):
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    store.write_part(table_of([4, 9]))  # error records only
    lock.release()
    store, lock, _ = open_store(directory)
    assert store.drop_errors() == 2 and store.parts == 0
    assert not store.abandon_new()  # the job is not new: its manifest stays
    lock.release()
    store, lock, info = open_store(directory)  # nor in a later run that fails first
    assert info.rows_done == 0 and store.retried == {4, 9}
    assert not store.abandon_new() and (directory / "manifest.json").exists()
    lock.release()


def test_a_new_job_with_an_empty_progress_log_is_still_abandoned(tmp_path):
    """A kill inside the first record's append leaves an empty log: still a new job."""
    directory = tmp_path / "parts"
    store, lock, _ = open_store(directory)
    (shard_dir(directory) / "progress.jsonl").write_bytes(b"")
    assert store.abandon_new() and not (directory / "manifest.json").exists()
    lock.release()


def test_the_file_an_overwrite_run_replaces_is_told_by_inode_size_and_time(tmp_path):
    """The recorded old output is that very file: not one written over it or put in its place,
    but still it after a network share's remount changes the device number (an older record
    that holds one), a chmod or a backup's hard link."""
    old = tmp_path / "out.parquet"
    old.write_bytes(b"old output")
    manifest = {"replaces": {**checkpoint.file_identity(old), "device": -1}}
    os.chmod(old, 0o444)
    os.link(old, tmp_path / "backup.parquet")
    assert checkpoint.replaces_output(manifest, old)
    stat = old.stat()
    old.chmod(0o644)
    old.write_bytes(b"a new output")  # written over, its time put back: the size tells
    os.utime(old, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not checkpoint.replaces_output(manifest, old)
    other = tmp_path / "other"
    other.write_bytes(b"old output")
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, old)  # another file put there: another inode
    assert not checkpoint.replaces_output(manifest, old)
    assert not checkpoint.replaces_output({"replaces": None}, old)
    assert not checkpoint.replaces_output(manifest, tmp_path / "missing")
