"""Resumable jobs end to end: kill -9, SIGTERM and SIGINT at random moments, damaged checkpoints,
fingerprint refusal, locks, shards and status, all through the ``jobrunner`` command.

The property under test: whatever happens to a run, re-running the same command finishes with the
output an uninterrupted run gives (same rows, outputs, finish reasons, order; each row once).

Real runs that get killed are subprocesses. Kills during a part write use ``DRIVER``, which runs
the real CLI after wrapping two functions so that the process pauses (and tells the test) at an
exact point of the write protocol; the test then SIGKILLs it there. The product has no hooks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from jobrunner.checkpoint import (
    JobLock,
    file_identity,
    is_locked,
    read_lock_info,
    read_progress,
    shard_name,
)
from jobrunner.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROWS = 160  # enough that a run outlasts a slow, busy test process's reaction
# Parts are written every few milliseconds (every batch or two). Sorting windows of 6 rows cut
# into batches of 4 and 2, so a resumed run, which plans only the rows still owed, puts rows in
# other batches, at other positions, than the uninterrupted run did.
ARGS = ("--max-tokens", "6", "--batch-size", "4", "--sort-window", "6", "--checkpoint-every", "3")
SAMPLING = ("--temperature", "0.8", "--seed", "3")
SHARD = shard_name(0, 1)
SCRIPT = Path(sys.executable).with_name("jobrunner")  # the installed console script

DRIVER = r"""
import os, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import jobrunner.checkpoint as checkpoint
import jobrunner.merge as merge
import jobrunner.runner as runner
import jobrunner.writers as writers
from jobrunner.cli import main

stage, nth, marker = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
calls = 0


def due(at_stage):
    global calls
    if stage != at_stage:
        return False
    calls += 1
    return calls == nth


def pause():
    marker.write_text(stage)
    time.sleep(600)  # until the test kills us


class PausingOs:
    # os, except that renaming the nth part file into place pauses first (temp file is durable)
    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if Path(dst).name.startswith("part-") and due("tmp"):
            pause()
        if Path(dst).name.endswith(".summary.json") and due("summary"):
            pause()  # the output merged and renamed into place, its summary's temp written
        if Path(dst).name == "out.parquet" and due("merged"):
            pause()  # the merge's temp file written in full, not renamed over the output
        os.replace(src, dst)


append_record = checkpoint._append_record


def pausing_append_record(path, record):
    if due("unrecorded"):  # the part is renamed into place but not yet recorded
        pause()
    if due("torn"):  # half of the progress line reached the disk
        line = record.to_line()
        with open(path, "ab") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            os.fsync(f.fileno())
        pause()
    append_record(path, record)


admit = runner._Session._admit


def holding_admit(self, decoder, items):
    if due("hold"):  # hold before the nth rows join the batch until the test has signalled
        marker.write_text(stage)
        while not marker.with_name(marker.name + ".go").exists():
            time.sleep(0.01)
    admit(self, decoder, items)


writers.os = PausingOs()
merge.os = PausingOs()
checkpoint._append_record = pausing_append_record
runner._Session._admit = holding_admit
sys.argv = ["jobrunner", *sys.argv[5:]]
main(sys.argv[1:], prog_name="jobrunner")
"""


# --- helpers -----------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str]:
    """Run ``jobrunner ARGS`` in this process (fast: the model code is already imported)."""
    result = CliRunner().invoke(main, list(args))
    assert isinstance(result.exception, SystemExit | None), result.exception
    return result.exit_code, result.output


class Job:
    """``jobrunner run ARGS`` in a subprocess, stdout and stderr in one log file."""

    def __init__(self, cwd: Path, args: list[str], stage: str | None = None, nth: int = 0):
        self.marker = cwd / f"paused-{time.monotonic_ns()}"
        self.log = cwd / f"log-{time.monotonic_ns()}.txt"
        if stage is None and SCRIPT.exists():
            command = [str(SCRIPT), "run", *args]
        else:  # the driver with stage "none" is the plain CLI
            stage = stage or "none"
            driver = [sys.executable, "-c", DRIVER, str(ROOT), stage, str(nth), str(self.marker)]
            command = [*driver, "run", *args]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, timeout: float = 120.0) -> bool:
        """True once ``condition()`` holds; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                return condition()
            assert time.monotonic() < deadline, f"timed out; log:\n{self.output()}"
            time.sleep(0.003)
        return True

    def paused(self) -> bool:
        return self.marker.exists()

    def release(self) -> None:
        """Let a run held before a batch go on."""
        self.marker.with_name(self.marker.name + ".go").touch()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 120.0) -> tuple[int, str]:
        return self.proc.wait(timeout), self.output()


def job_args(dataset: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return [str(dataset), "--model", str(model), "--output", str(output), *ARGS, *extra]


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def lines_recorded(output: Path, shard: str = SHARD) -> int:
    """Complete lines of the shard's progress file (each one is a durable part)."""
    try:
        return (parts_dir(output) / shard / "progress.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def assert_same_output(output: Path, expected: list[dict]) -> None:
    got = rows(output)
    assert [r["row_index"] for r in got] == list(range(ROWS))  # each row once, in input order
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    assert got == expected


def status_json(output: Path) -> dict:
    code, text = cli("status", str(output), "--json")
    assert code == 0, text
    return json.loads(text)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """ROWS rows: prompts of several lengths, an image (of several sizes) on every 5th row."""
    root = tmp_path_factory.mktemp("resume-data")
    lines = []
    for i in range(ROWS):
        row = {"id": f"row-{i:03d}", "prompt": f"Describe item {i}." + " Be brief." * (i % 4)}
        if i % 5 == 0:
            pixels = np.random.default_rng(i).integers(0, 256, (20 + i, 90 - i // 2, 3), np.uint8)
            Image.fromarray(pixels).save(root / f"{i}.png")
            row["image"] = f"{i}.png"
        lines.append(json.dumps(row) + "\n")
    (root / "data.jsonl").write_text("".join(lines))
    return root / "data.jsonl"


def reference_run(root: Path, dataset: Path, model: Path, *extra: str) -> tuple[Path, list[dict]]:
    output = root / "out.parquet"
    code, text = cli("run", *job_args(dataset, model, output, *extra))
    assert code == 0, text
    return output, rows(output)


@pytest.fixture(scope="module")
def greedy(tmp_path_factory, dataset, tiny_model_dir) -> tuple[Path, list[dict]]:
    """The uninterrupted run: its output path (and checkpoint) and its rows."""
    return reference_run(tmp_path_factory.mktemp("greedy"), dataset, tiny_model_dir)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, dataset, tiny_model_dir) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("sampled")
    return reference_run(root, dataset, tiny_model_dir, *SAMPLING)


def copy_checkpoint(reference: Path, output: Path, keep_parts: int | None = None) -> Path:
    """The reference's checkpoint under ``output``; with ``keep_parts`` as if killed after them."""
    shutil.copytree(parts_dir(reference), parts_dir(output))
    shard_dir = parts_dir(output) / SHARD
    if keep_parts is not None:
        lines = (shard_dir / "progress.jsonl").read_bytes().splitlines(keepends=True)
        (shard_dir / "progress.jsonl").write_bytes(b"".join(lines[:keep_parts]))
        (shard_dir / "complete.json").unlink()
        for part in sorted(shard_dir.glob("part-*.parquet"))[keep_parts:]:
            part.unlink()
    return shard_dir


# --- kill -9 at random moments -----------------------------------------------------------------


def kill_moments(rng: random.Random) -> list[tuple]:
    """Where to SIGKILL: while starting up, after some parts, and inside a part write."""
    moments = [("startup", rng.uniform(0.2, 1.0))]
    moments += [("parts", rng.randint(1, 2), rng.uniform(0.0, 0.02)) for _ in range(3)]
    moments += [(stage, rng.randint(1, 2)) for stage in ("tmp", "unrecorded", "torn")]
    rng.shuffle(moments)
    return moments


def start_and_kill(
    moment: tuple, args: list[str], cwd: Path, output: Path, while_paused=None
) -> Job:
    """Start a run and SIGKILL it at ``moment``; asserts that the kill landed mid-run.

    ``while_paused(job)`` runs while a run stopped before recording a part is still alive.
    """
    kind = moment[0]
    if kind in ("tmp", "unrecorded", "torn"):
        job = Job(cwd, args, stage=kind, nth=moment[1])
        assert job.wait_until(job.paused), f"never reached {moment}:\n{job.output()}"
        if while_paused is not None and kind == "unrecorded":
            try:
                while_paused(job)
            except BaseException:
                job.signal(signal.SIGKILL)
                raise
    else:
        job = Job(cwd, args)
        if kind == "startup":
            time.sleep(moment[1])
        else:
            target = lines_recorded(output) + moment[1]
            assert job.wait_until(lambda: lines_recorded(output) >= target), job.output()
            time.sleep(moment[2])
    job.signal(signal.SIGKILL)
    code, text = job.wait()
    assert code == -signal.SIGKILL, f"{moment}: the run ended before the kill:\n{text}"
    return job


def check_leftovers(kind: str, output: Path) -> None:
    """What a kill inside a part write leaves behind (the next run must ignore it)."""
    shard_dir = parts_dir(output) / SHARD
    names = {p.name for p in shard_dir.iterdir()}
    records, torn = read_progress(shard_dir)
    unrecorded = {n for n in names if n.startswith("part-")} - {r.part for r in records}
    if kind == "tmp":
        assert any(n.startswith(".part-") and n.endswith(".tmp") for n in names), names
    if kind == "unrecorded":
        assert unrecorded, names
    if kind == "torn":
        assert torn and unrecorded, names


def check_running_job(job: Job, args: list[str], output: Path) -> None:
    """While a run is alive (paused in a part write): status shows it, a second run exits 3."""
    code, text = cli("run", *args)
    assert code == 3, text
    assert "another run holds the lock" in text and f"pid {job.proc.pid}" in text
    report = status_json(output)
    assert report["running"] and not report["complete"] and not report["output_exists"]
    shard = report["shards"][0]
    assert shard["running"] and shard["lock"]["pid"] == job.proc.pid
    done = sum(r.rows for r in read_progress(parts_dir(output) / SHARD)[0])
    assert (shard["rows_done"], shard["rows_total"]) == (done, ROWS)
    code, text = cli("status", str(output))
    assert code == 0 and f"{output}: running" in text, text
    assert f"{SHARD}: {done}/{ROWS} rows, 0 errors" in text and ", running" in text, text


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(
    tmp_path, dataset, tiny_model_dir, greedy
):
    output = tmp_path / "out.parquet"
    args = job_args(dataset, tiny_model_dir, output)
    lock = parts_dir(output) / f"{SHARD}.lock"
    resumed_from = []
    check = partial(check_running_job, args=args, output=output)
    for moment in kill_moments(random.Random(4)):
        job = start_and_kill(moment, args, tmp_path, output, check)
        if moment[0] in ("tmp", "unrecorded", "torn"):
            check_leftovers(moment[0], output)
        text = job.output()
        assert "Traceback" not in text, text
        resumed_from += [int(n) for n in re.findall(rf"resuming: (\d+) of {ROWS} rows", text)]
        if lock.exists():  # the killed run's lock file stays behind, but holds nothing
            assert not is_locked(lock)
    assert not output.exists() and not status_json(output)["running"]
    assert resumed_from == sorted(resumed_from) and resumed_from[-1] > 0  # work was kept
    code, text = cli("run", *args)
    assert code == 0, text  # the stale lock of the last killed run did not block (exit 3)
    assert re.search(rf"resuming: [1-9]\d* of {ROWS} rows already done", text), text
    assert_same_output(output, greedy[1])
    shard_dir = parts_dir(output) / SHARD
    assert not [p.name for p in shard_dir.iterdir() if p.name.startswith(".")]


# --- SIGTERM / SIGINT --------------------------------------------------------------------------


def interrupt(job: Job, signum: int, ready) -> tuple[list[str], str]:
    """Signal a run once ``ready()`` holds; returns the resume command's arguments."""
    assert job.wait_until(ready), job.output()
    job.signal(signum)
    job.release()
    code, text = job.wait()
    assert code == 128 + signum, text
    assert f"interrupted by {signal.Signals(signum).name}" in text and "Traceback" not in text
    command = shlex.split(re.search(r"resume with: (.+)", text).group(1))
    assert command[:2] == ["jobrunner", "run"]
    return command[2:], text


def test_sigterm_and_sigint_flush_and_print_the_resume_command(
    tmp_path, dataset, tiny_model_dir, greedy
):
    rng = random.Random(7)
    output = tmp_path / "out.parquet"
    lock = parts_dir(output) / f"{SHARD}.lock"
    # No checkpoint is due by rows or time: only the flush on the signal writes a part.
    args = job_args(dataset, tiny_model_dir, output, "--checkpoint-every", "1000", "--overwrite")
    job = Job(tmp_path, args)  # signalled while it loads the model (it holds the lock by then)
    resume, text = interrupt(job, signal.SIGTERM, lambda: (read_lock_info(lock) or {}).get("pid"))
    # nothing was recorded: the new job left no manifest (a changed command is no other job),
    # and the command to run is the same one, --overwrite and all
    assert not (parts_dir(output) / "manifest.json").exists()
    assert resume == args and "no row had finished" in text, text

    # Signalled while generating: held before a random batch, so that the signal cannot come
    # after the last batch however slow this machine is.
    job = Job(tmp_path, resume, stage="hold", nth=rng.randint(1, 4))
    resume, _ = interrupt(job, signal.SIGTERM, job.paused)
    assert resume == args[:-1]
    first = status_json(output)
    assert first["shards"][0]["parts"] == 1 and 0 < first["rows_done"] < ROWS

    job = Job(tmp_path, resume, stage="hold", nth=rng.randint(1, 4))
    resume, text = interrupt(job, signal.SIGINT, job.paused)
    assert f"resuming: {first['rows_done']} of {ROWS} rows already done" in text
    assert resume == args[:-1]
    second = status_json(output)
    assert second["shards"][0]["parts"] == 2 and first["rows_done"] < second["rows_done"] < ROWS

    code, text = cli("run", *resume)
    assert code == 0, text
    assert f"resuming: {second['rows_done']} of {ROWS} rows already done" in text
    assert_same_output(output, greedy[1])


def test_a_second_signal_stops_at_once_with_the_resume_command(
    tmp_path, dataset, tiny_model_dir, greedy
):
    output = tmp_path / "out.parquet"
    args = job_args(dataset, tiny_model_dir, output)
    job = Job(tmp_path, args, stage="hold", nth=2)
    assert job.wait_until(job.paused), job.output()
    job.signal(signal.SIGINT)
    time.sleep(0.2)
    job.signal(signal.SIGINT)  # held before a batch: the first one has not been acted on
    code, text = job.wait()
    assert code == 130, text
    assert "stopped at once by a second signal" in text and "Traceback" not in text
    assert "Aborted" not in text
    resume = shlex.split(re.search(r"resume with: (.+)", text).group(1))[2:]
    assert resume == args
    code, text = cli("run", *resume)
    assert code == 0, text
    assert_same_output(output, greedy[1])


# --- determinism with sampling -----------------------------------------------------------------


def test_sampled_run_killed_and_resumed_equals_uninterrupted(
    tmp_path, dataset, tiny_model_dir, greedy, sampled
):
    assert [r["output"] for r in sampled[1]] != [r["output"] for r in greedy[1]]  # it samples
    output = tmp_path / "out.parquet"
    args = job_args(dataset, tiny_model_dir, output, *SAMPLING)
    for moment in [("tmp", 2), ("parts", 2, 0.01)]:
        start_and_kill(moment, args, tmp_path, output)
    assert 0 < status_json(output)["rows_done"] < ROWS
    code, text = cli("run", *args)
    assert code == 0, text
    assert_same_output(output, sampled[1])


# --- damaged checkpoints, fingerprints, no-ops, locks ------------------------------------------


def test_damaged_parts_and_stray_files_are_ignored_and_cleaned(
    tmp_path, dataset, tiny_model_dir, greedy
):
    output = tmp_path / "out.parquet"
    shard_dir = copy_checkpoint(greedy[0], output)
    records, _ = read_progress(shard_dir)
    truncated, flipped = records[2], records[5]
    data = (shard_dir / truncated.part).read_bytes()
    (shard_dir / truncated.part).write_bytes(data[: len(data) // 2])
    data = bytearray((shard_dir / flipped.part).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (shard_dir / flipped.part).write_bytes(bytes(data))
    (shard_dir / ".part-000007.parquet.999.0123456789ab.tmp").write_bytes(b"PAR1 half a part")
    (shard_dir / ".progress.jsonl.999.0123456789ab.tmp").write_bytes(b'{"part": ')
    shutil.copy(shard_dir / records[0].part, shard_dir / "part-000050.parquet")  # not recorded
    with (shard_dir / "progress.jsonl").open("ab") as f:
        f.write(b'{"part": "part-000051.parquet", "rows": 4')  # torn last line
    code, text = cli("run", *job_args(dataset, tiny_model_dir, output))
    assert code == 0, text
    for name in (truncated.part, flipped.part, ".part-000007", ".progress.jsonl", "part-000050"):
        assert re.search(rf"checkpoint: .*{re.escape(name)}", text), (name, text)
    assert "torn" in text
    redone = truncated.rows + flipped.rows
    assert f"resuming: {ROWS - redone} of {ROWS} rows already done" in text
    assert_same_output(output, greedy[1])
    assert not [p.name for p in shard_dir.iterdir() if p.name.startswith(".")]
    assert "part-000050.parquet" not in {r.part for r in read_progress(shard_dir)[0]}


def test_fingerprint_mismatch_refuses_and_overwrite_starts_over(
    tmp_path, dataset, tiny_model_dir, greedy
):
    output = tmp_path / "out.parquet"
    shard_dir = copy_checkpoint(greedy[0], output, keep_parts=5)
    progress = (shard_dir / "progress.jsonl").read_bytes()
    base = job_args(dataset, tiny_model_dir, output)
    for extra, change in [
        (("--max-tokens", "3"), "max_tokens: 6 → 3"),
        (("--prompt", "Caption {id}."), 'prompt: null → "Caption {id}."'),
        (("--temperature", "0.5"), "temperature: 0.0 → 0.5"),
        (("--shard", "0/2"), "number of shards: 1 → 2"),
    ]:
        code, text = cli("run", *base, *extra)
        assert code == 2, text
        assert change in text and "--overwrite" in text and "Traceback" not in text, text
    assert (shard_dir / "progress.jsonl").read_bytes() == progress  # nothing was touched

    code, text = cli("run", *base, "--max-tokens", "3", "--overwrite")
    assert code == 0, text
    assert "resuming" not in text
    assert all(r["output_tokens"] <= 3 for r in rows(output)) and len(rows(output)) == ROWS
    before = (output.stat().st_mtime_ns, output.read_bytes())
    code, text = cli("run", *base, "--max-tokens", "3")
    assert code == 0 and "nothing to do" in text, text
    code, text = cli("run", *base)  # a finished job refuses another fingerprint too
    assert code == 2 and "max_tokens: 3 → 6" in text, text
    assert (output.stat().st_mtime_ns, output.read_bytes()) == before

    code, text = cli("run", *base, "--shard", "0/2", "--overwrite", "--quiet")
    assert code == 0, text
    # the old output stays, untouched, until the new job's merge replaces it
    assert (output.stat().st_mtime_ns, output.read_bytes()) == before
    report = status_json(output)
    assert [s["complete"] for s in report["shards"]] == [True, False]
    assert report["output_replaced_by_merge"] and not report["output_is_this_jobs"]
    code, text = cli("status", str(output))
    assert "stays until the job's merge replaces it" in text, text
    code, text = cli("run", *base, "--shard", "1/2", "--overwrite", "--quiet")
    assert code == 0, text
    assert_same_output(output, greedy[1])
    assert status_json(output)["output_is_this_jobs"]


def test_overwrite_keeps_the_old_output_until_its_merge_replaces_it(
    tmp_path, dataset, tiny_model_dir, greedy
):
    """Readers find the old output while an --overwrite run works, and still after it stops;
    the job's merge replaces that very file, and no other."""
    output = tmp_path / "out.parquet"
    summary = output.with_name(output.name + ".summary.json")
    base = job_args(dataset, tiny_model_dir, output)
    code, text = cli("run", *base, "--max-tokens", "3", "--quiet")  # the old job
    assert code == 0, text
    old = (output.read_bytes(), summary.read_bytes())

    job = Job(tmp_path, [*base, "--overwrite"], stage="hold", nth=3)
    assert job.wait_until(job.paused), job.output()
    assert (output.read_bytes(), summary.read_bytes()) == old
    report = status_json(output)
    assert report["output_replaced_by_merge"] and 0 < report["rows_done"] < ROWS
    # another file put at the output meanwhile is not the one the job replaces: refused
    other = old[0] + b"\n"
    output.write_bytes(other)
    job.release()
    code, text = job.wait()
    assert code == 2 and "not this job's output" in text, text
    assert output.read_bytes() == other
    assert "not this job's output" in cli("status", str(output))[1]

    output.unlink()  # moved away: the job's merge writes the output (its rows all done)
    code, text = cli("run", *base)
    assert code == 0 and "wrote" in text, text
    assert_same_output(output, greedy[1])
    fingerprint = json.loads(pq.read_schema(output).metadata[b"jobrunner"])["fingerprint"]
    written = json.loads(summary.read_text())
    assert written["fingerprint"] == fingerprint and written["rows_run"] == 0


def test_overwrite_run_that_stops_leaves_the_old_output_to_its_resume(
    tmp_path, dataset, tiny_model_dir, greedy
):
    output = tmp_path / "out.parquet"
    summary = output.with_name(output.name + ".summary.json")
    base = job_args(dataset, tiny_model_dir, output)
    assert cli("run", *base, "--max-tokens", "3", "--quiet")[0] == 0
    old_summary = json.loads(summary.read_text())
    job = Job(tmp_path, [*base, "--overwrite"], stage="hold", nth=2)
    resume, _ = interrupt(job, signal.SIGTERM, job.paused)
    code, text = cli("run", *resume)  # without --overwrite: the old output is the one it replaces
    assert code == 0 and "resuming" in text, text
    assert_same_output(output, greedy[1])
    written = json.loads(summary.read_text())
    assert written["rows_run"] > 0 and written["rows_total"] == ROWS
    assert written["fingerprint"] != old_summary["fingerprint"]


def test_finished_job_merges_over_the_foreign_file_its_overwrite_run_found(
    tmp_path, dataset, tiny_model_dir, greedy
):
    """A job begun with --overwrite over a file jobrunner did not write, its rows all done but
    not merged (stopped just before): the next run merges, not "nothing to do"."""
    output = tmp_path / "out.parquet"
    copy_checkpoint(greedy[0], output)
    output.write_text("id,caption\n")  # a CSV someone kept at the output path
    manifest_path = parts_dir(output) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "replaces": file_identity(output)}))
    assert status_json(output)["output_replaced_by_merge"]
    assert (
        "the file at the output is still the one the job replaces" in cli("status", str(output))[1]
    )
    code, text = cli("run", *job_args(dataset, tiny_model_dir, output))
    assert code == 0 and "wrote" in text, text
    assert_same_output(output, greedy[1])

    # --overwrite of the same job (its checkpoint kept) over a file put there since
    output.write_text("id,caption\n")
    code, text = cli("run", *job_args(dataset, tiny_model_dir, output, "--overwrite"))
    assert code == 0 and "wrote" in text, text
    assert_same_output(output, greedy[1])


def test_complete_shard_over_the_old_output_it_replaces_is_not_merged_yet(
    tmp_path, dataset, tiny_model_dir, greedy
):
    """A shard of an --overwrite job that is complete, run again while the old output (a CSV
    here) still sits there: no "merged again" and no error count read from that file (it
    crashed on a file that is not Parquet); the last shard's merge replaces it."""
    output = tmp_path / "out.parquet"
    output.write_text("id,caption\n")
    base = job_args(dataset, tiny_model_dir, output)
    code, text = cli("run", *base, "--shard", "0/2", "--overwrite", "--quiet")
    assert code == 0, text
    for extra in ((), ("--retry-errors",)):
        code, text = cli("run", *base, "--shard", "0/2", *extra)
        assert code == 0 and "Traceback" not in text, text
        assert "merged again" not in text and "not merged yet" in text, text
    assert output.read_text() == "id,caption\n"
    code, text = cli("run", *base, "--shard", "1/2", "--quiet")
    assert code == 0, text
    assert_same_output(output, greedy[1])


def test_a_merge_forgets_the_file_it_replaced(tmp_path, dataset, tiny_model_dir, greedy):
    """Once the job's merge replaced the old output, that file put back (moved, or a link kept
    as a backup) is another job's file like any other: refused, not replaced."""
    output = tmp_path / "out.parquet"
    base = job_args(dataset, tiny_model_dir, output)
    assert cli("run", *base, "--max-tokens", "3", "--quiet")[0] == 0  # the old job
    backup = tmp_path / "backup.parquet"
    os.link(output, backup)
    old = output.read_bytes()
    code, text = cli("run", *base, "--overwrite", "--quiet")
    assert code == 0, text
    assert_same_output(output, greedy[1])
    os.replace(backup, output)  # last night's output put back
    assert not status_json(output)["output_replaced_by_merge"]
    code, text = cli("merge", str(output))
    assert code == 2 and "not this job's output" in text, text
    code, text = cli("run", *base)
    assert code == 2 and "written by another job" in text, text
    assert output.read_bytes() == old


def test_overwrite_of_one_shard_records_that_it_found_no_file(
    tmp_path, dataset, tiny_model_dir, greedy
):
    """A later --overwrite shard that finds no file at the output (the old one moved away)
    records so: the old file moved back is then refused like any other."""
    output = tmp_path / "out.parquet"
    base = job_args(dataset, tiny_model_dir, output)
    pq.write_table(pa.table({"x": [1, 2]}), output)
    aside = tmp_path / "aside.parquet"
    assert cli("run", *base, "--shard", "0/3", "--overwrite", "--quiet")[0] == 0
    os.replace(output, aside)
    assert cli("run", *base, "--shard", "1/3", "--overwrite", "--quiet")[0] == 0
    os.replace(aside, output)  # moved back after that run began
    kept = output.read_bytes()
    code, text = cli("run", *base, "--shard", "2/3", "--quiet")
    assert code == 2 and "move it away" in text, text
    assert output.read_bytes() == kept


def overwrite_job_over_old_output(output: Path, base: list[str], checkpoint: Path) -> None:
    """An old job's finished output, and beside it an --overwrite run's checkpoint (copied from
    ``checkpoint``) with every row done but not merged, recording the old output as the file it
    replaces."""
    assert cli("run", *base, "--max-tokens", "3", "--quiet")[0] == 0  # the old job
    shutil.rmtree(parts_dir(output))
    copy_checkpoint(checkpoint, output)
    manifest_path = parts_dir(output) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["spec"]["overwrite"] = True
    manifest_path.write_text(json.dumps({**manifest, "replaces": file_identity(output)}))


def test_merge_of_an_overwrite_job_leaves_no_summary_of_the_old_one(
    tmp_path, dataset, tiny_model_dir, greedy
):
    """`jobrunner merge`, as status advises for a finished --overwrite job over the old output,
    leaves OUTPUT.summary.json describing the merged output, not the replaced one's job."""
    output = tmp_path / "out.parquet"
    summary = output.with_name(output.name + ".summary.json")
    base = job_args(dataset, tiny_model_dir, output)
    overwrite_job_over_old_output(output, base, greedy[0])
    code, text = cli("status", str(output))
    assert "`jobrunner merge` writes the job's" in text and "same command" not in text, text
    code, text = cli("merge", str(output))
    assert code == 0, text
    assert_same_output(output, greedy[1])
    fingerprint = json.loads(pq.read_schema(output).metadata[b"jobrunner"])["fingerprint"]
    written = json.loads(summary.read_text())
    assert written["fingerprint"] == fingerprint and written["rows_total"] == ROWS


def test_a_summary_of_an_older_version_beside_the_replaced_output_is_not_kept(
    tmp_path, dataset, tiny_model_dir, greedy
):
    """The replaced output's summary, written before summaries recorded the fingerprint, is
    not taken for the job's by a session that only merges (also once the merge has replaced
    the file the manifest recorded)."""
    output = tmp_path / "out.parquet"
    summary = output.with_name(output.name + ".summary.json")
    base = job_args(dataset, tiny_model_dir, output)
    assert cli("run", *base, "--max-tokens", "3", "--quiet")[0] == 0  # the old job
    legacy = json.loads(summary.read_text())
    del legacy["fingerprint"]
    summary.write_text(json.dumps({**legacy, "rows_run": 12345}))
    shutil.rmtree(parts_dir(output))
    copy_checkpoint(greedy[0], output)  # the --overwrite run's rows, all done, not merged
    manifest_path = parts_dir(output) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "replaces": file_identity(output)}))
    code, text = cli("run", *base)
    assert code == 0 and "wrote" in text, text
    written = json.loads(summary.read_text())
    assert written["rows_run"] == 0 and "fingerprint" in written


@pytest.mark.parametrize("before", ["none", "the replaced output's"])
def test_a_run_killed_before_its_summary_is_written_leaves_it_to_the_next_run(
    tmp_path, dataset, tiny_model_dir, greedy, before
):
    """SIGKILL after the final merge renamed the output into place, its summary's temp file
    written but not renamed: the next run finds the output current and nothing to do, and
    still leaves OUTPUT.summary.json the output's (not missing, not the replaced output's job's)
    and no temp file of it."""
    output = tmp_path / "out.parquet"
    summary = output.with_name(output.name + ".summary.json")
    base = job_args(dataset, tiny_model_dir, output)
    if before == "none":
        copy_checkpoint(greedy[0], output)  # every row done, not merged
    else:
        overwrite_job_over_old_output(output, base, greedy[0])
    job = Job(tmp_path, base, stage="summary", nth=1)
    assert job.wait_until(job.paused), job.output()
    job.signal(signal.SIGKILL)
    assert job.wait()[0] == -signal.SIGKILL
    assert_same_output(output, greedy[1])  # merged before the kill
    code, text = cli("run", *base)
    assert code == 0 and "nothing to do" in text, text
    assert_same_output(output, greedy[1])
    fingerprint = json.loads(pq.read_schema(output).metadata[b"jobrunner"])["fingerprint"]
    written = json.loads(summary.read_text())
    assert written["fingerprint"] == fingerprint, written
    assert (written["rows_total"], written["rows_error"]) == (ROWS, 0), written
    assert not list(tmp_path.glob(".*.tmp"))
    assert status_json(output)["output_current"] is True


def test_a_merge_by_hand_killed_before_its_rename_leaves_no_temp_to_the_next_run(
    tmp_path, dataset, tiny_model_dir, greedy
):
    """`jobrunner merge` over the job's current output, SIGKILLed with its temp file written
    and not renamed: the output stays as it was, and the next run, which has nothing to do,
    removes the temp file."""
    output = tmp_path / "out.parquet"
    base = job_args(dataset, tiny_model_dir, output)
    copy_checkpoint(greedy[0], output)
    assert cli("run", *base)[0] == 0
    kept = output.read_bytes()
    marker = tmp_path / "paused"
    driver = [sys.executable, "-c", DRIVER, str(ROOT), "merged", "1", str(marker)]
    proc = subprocess.Popen([*driver, "merge", str(output)], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert output.read_bytes() == kept and list(tmp_path.glob(".out.parquet.*.tmp"))
    code, text = cli("run", *base)
    assert code == 0 and "nothing to do" in text, text
    assert output.read_bytes() == kept
    assert not list(tmp_path.glob(".*.tmp"))


def test_overwrite_run_whose_final_merge_fails_advises_resuming_not_overwriting(
    tmp_path, dataset, tiny_model_dir, greedy, monkeypatch
):
    """The old output stays until the final merge, so that merge is where replacing it can
    fail (a full disk, a file that cannot be replaced): every row is saved, and the advice is
    the command without --overwrite, which merges, not the same one, which runs them all."""
    import jobrunner.merge as merge_module

    output = tmp_path / "out.parquet"
    base = job_args(dataset, tiny_model_dir, output)
    assert cli("run", *base, "--max-tokens", "3", "--quiet")[0] == 0  # the old output
    old = output.read_bytes()

    def full_disk(path, *args):
        raise OSError(28, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(merge_module, "_atomic_parquet", full_disk)
        patch.setattr(sys, "argv", ["jobrunner", "run", *base, "--overwrite"])
        code, text = cli("run", *base, "--overwrite")
    assert code != 0 and "No space left on device" in text, text
    assert output.read_bytes() == old
    command = shlex.split(re.search(r"resume with (.+)", text).group(1))
    assert command[:2] == ["jobrunner", "run"] and "--overwrite" not in command, text
    code, text = cli(*command[1:])
    assert code == 0 and "wrote" in text and "running" not in text, text
    assert_same_output(output, greedy[1])


def test_changed_input_file_refuses(tmp_path, tiny_model_dir):
    source = tmp_path / "small.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n" for i in range(3)))
    args = [str(source), "--model", str(tiny_model_dir), "--max-tokens", "2", "--quiet"]
    assert cli("run", *args)[0] == 0
    source.write_text(source.read_text() + json.dumps({"id": 3, "prompt": "p3"}) + "\n")
    code, text = cli("run", *args)
    assert code == 2 and "input.size: " in text and "input content: other bytes" in text, text


def test_second_run_while_locked_exits_3(tmp_path, dataset, tiny_model_dir, greedy):
    output = tmp_path / "out.parquet"
    shard_dir = copy_checkpoint(greedy[0], output, keep_parts=3)
    with JobLock(parts_dir(output) / f"{SHARD}.lock"):
        code, text = cli("run", *job_args(dataset, tiny_model_dir, output))
        assert code == 3, text
        assert "another run holds the lock" in text and f"pid {os.getpid()}" in text
        assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", text), text
        assert status_json(output)["running"]
    assert len(read_progress(shard_dir)[0]) == 3 and not output.exists()


def test_status_of_partial_and_finished_jobs(tmp_path, dataset, tiny_model_dir, greedy):
    output = tmp_path / "out.parquet"
    shard_dir = copy_checkpoint(greedy[0], output, keep_parts=5)
    done = sum(r.rows for r in read_progress(shard_dir)[0])
    report = status_json(output)
    assert (report["rows_done"], report["total_rows"], report["errors"]) == (done, ROWS, 0)
    assert not report["running"] and not report["complete"] and not report["output_exists"]
    code, text = cli("status", str(output))
    assert code == 0, text
    assert "unfinished, not running" in text and f"{SHARD}: {done}/{ROWS} rows, 0 errors" in text

    report = status_json(greedy[0])
    assert report["complete"] and report["output_exists"] and report["rows_done"] == ROWS
    code, text = cli("status", str(greedy[0]))
    assert f"{greedy[0]}: complete" in text, text
    assert f"{SHARD}: {ROWS}/{ROWS} rows, 0 errors, complete" in text, text


def test_a_checkpoint_whose_fields_an_older_fingerprint_recorded_resumes(
    tmp_path, dataset, tiny_model_dir, greedy
):
    """Fields recorded by an older fingerprint (the input's mtime, since changed by a touch;
    a crop count spelt out that is the model's default) are the same job: it merges, and its
    output stays finished."""
    output = tmp_path / "out.parquet"
    copy_checkpoint(greedy[0], output)
    manifest_path = parts_dir(output) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    fields = manifest["fingerprint_fields"]
    default = fields["model_identity"]["default_num_crops"]
    fields = {**fields, "num_crops": default, "input": {**fields["input"], "mtime_ns": 1}}
    manifest |= {"fingerprint": "0" * 64, "fingerprint_fields": fields}
    manifest_path.write_text(json.dumps(manifest))
    code, text = cli("run", *job_args(dataset, tiny_model_dir, output))
    assert code == 0 and "different job" not in text, text
    assert_same_output(output, greedy[1])
    code, text = cli("run", *job_args(dataset, tiny_model_dir, output))
    assert code == 0 and "nothing to do" in text, text


def test_merge_never_replaces_a_file_the_job_did_not_merge(tmp_path, dataset, greedy):
    output = tmp_path / "out.parquet"
    copy_checkpoint(greedy[0], output)
    pq.write_table(pa.table({"x": [1, 2]}), output)
    kept = output.read_bytes()
    code, text = cli("merge", str(output))
    assert code == 2 and "is not this job's output" in text, text
    assert output.read_bytes() == kept
    code, text = cli("status", str(output))
    assert (
        code == 0 and "is not this job's output" in text and "complete" not in text.split("\n")[0]
    )
    output.unlink()
    code, text = cli("merge", str(output))
    assert code == 0, text
    code, text = cli("merge", str(output))  # its own output: merged again
    assert code == 0, text
    assert_same_output(output, greedy[1])


def test_merge_while_a_shard_runs_says_it_is_running(tmp_path, greedy):
    output = tmp_path / "out.parquet"
    shard_dir = copy_checkpoint(greedy[0], output, keep_parts=5)
    done = sum(r.rows for r in read_progress(shard_dir)[0])
    with JobLock(parts_dir(output) / f"{SHARD}.lock"):
        code, text = cli("merge", str(output))
    assert code == 2, text
    assert f"shard 0/1 is running ({done}/{ROWS} rows)" in text
    assert "Wait for the running shards" in text and "has not started" not in text


def test_status_never_calls_a_stranger_complete_nor_advises_losing_rows(
    tmp_path, dataset, tiny_model_dir, greedy
):
    # an unfinished job whose job file sets overwrite = true: resuming needs --no-overwrite
    output = tmp_path / "out.parquet"
    copy_checkpoint(greedy[0], output, keep_parts=5)
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "{dataset}"\nmodel = "{tiny_model_dir}"\noutput = "{output}"\noverwrite = true\n'
    )
    code, text = cli("status", str(job))
    assert code == 0 and "unfinished" in text, text
    assert f"jobrunner run {job} --no-overwrite" in text
    # a finished output whose checkpoint folder is gone is still complete
    finished = tmp_path / "finished.parquet"
    shutil.copy(greedy[0], finished)
    code, text = cli("status", str(finished))
    assert code == 0 and f"{finished}: complete" in text, text
    assert status_json(finished)["complete"] is True
    # files jobrunner did not write are no job at all, not "complete"
    stranger = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), stranger)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    for path in (stranger, garbage, dataset):
        code, text = cli("status", str(path))
        assert code == 2 and "not an output that jobrunner wrote" in text, text
        assert "complete" not in text


# --- shards ------------------------------------------------------------------------------------


def test_status_of_an_unfinished_sharded_job_names_the_shards_to_run(
    tmp_path, dataset, tiny_model_dir
):
    """Each shard runs as a command of its own, so 'run the same command' does not finish a
    sharded job: status names the shards still to run, with --no-overwrite where needed."""
    output = tmp_path / "out.parquet"
    args = job_args(dataset, tiny_model_dir, output)
    code, text = cli("run", *args, "--shard", "1/3", "--overwrite")
    assert code == 0, text
    code, text = cli("status", str(output))
    assert code == 0, text
    hint = "run the job's command with --no-overwrite once for each of --shard 0/3 (not started)"
    assert f"{hint}, --shard 2/3 (not started)" in text, text
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "{dataset}"\nmodel = "{tiny_model_dir}"\noutput = "{output}"\noverwrite = true\n'
    )
    code, text = cli("status", str(job))
    assert f"run `jobrunner run {job} --no-overwrite` once for each of --shard 0/3" in text, text


def test_three_concurrent_shard_processes_merge_to_the_single_output(
    tmp_path, dataset, tiny_model_dir, greedy
):
    output = tmp_path / "out.parquet"
    jobs = [
        Job(tmp_path, job_args(dataset, tiny_model_dir, output, "--shard", f"{k}/3"))
        for k in range(3)
    ]
    results = [job.wait(timeout=240) for job in jobs]
    assert [code for code, _ in results] == [0, 0, 0], results
    assert any("wrote" in text for _, text in results)  # the last shard to finish merged
    assert_same_output(output, greedy[1])
    output.unlink()
    code, text = cli("merge", str(output))
    assert code == 0, text
    assert_same_output(output, greedy[1])


def test_summary_counts_the_whole_output_and_keeps_the_run_that_made_it(
    tmp_path, dataset, tiny_model_dir
):
    output = tmp_path / "out.parquet"
    summary = output.with_name(output.name + ".summary.json")
    for k in (0, 1):
        code, text = cli("run", *job_args(dataset, tiny_model_dir, output, "--shard", f"{k}/2"))
        assert code == 0, text
    first = json.loads(summary.read_text())
    assert first["rows_total"] == first["rows_ok"] + first["rows_error"] == ROWS
    assert first["shard"] == "1/2" and first["rows_run"] == len(range(1, ROWS, 2))
    assert first["generated_tokens"] > 0
    output.unlink()  # merged again by a session that runs nothing
    code, text = cli("run", *job_args(dataset, tiny_model_dir, output, "--shard", "0/2"))
    assert code == 0 and output.exists(), text
    assert json.loads(summary.read_text()) == first


def test_merge_refuses_while_a_shard_is_missing(tmp_path, dataset, tiny_model_dir, greedy):
    output = tmp_path / "out.parquet"
    for k in (0, 2):
        code, text = cli("run", *job_args(dataset, tiny_model_dir, output, "--shard", f"{k}/3"))
        assert code == 0 and "not merged yet" in text, text
    assert not output.exists()
    code, text = cli("merge", str(output))
    assert code == 2 and "shard 1/3 has not started" in text, text
    sizes = [len(range(k, ROWS, 3)) for k in range(3)]  # 54, 53, 53
    report = status_json(output)
    assert [s["rows_done"] for s in report["shards"]] == [sizes[0], 0, sizes[2]]
    assert [s["rows_total"] for s in report["shards"]] == sizes
    assert [s["complete"] for s in report["shards"]] == [True, False, True]
    code, text = cli("status", str(output))
    assert f"{shard_name(1, 3)}: 0/{sizes[1]} rows, 0 errors, not started" in text, text
    code, text = cli("run", *job_args(dataset, tiny_model_dir, output, "--shard", "1/3"))
    assert code == 0 and f"wrote {output}" in text, text  # the last shard merges
    assert_same_output(output, greedy[1])
    assert status_json(output)["complete"]


# --- bad rows, earlier sessions' errors, model files -------------------------------------------


def test_a_long_run_of_bad_rows_is_checkpointed_on_schedule(tmp_path, tiny_model_dir):
    # Bad rows give the planner nothing to batch, so they must be flushed as they come, not
    # only after the next batch of good rows.
    source = tmp_path / "bad.jsonl"
    lines = [json.dumps({"id": f"b{i}", "image": "missing.png", "prompt": "x"}) for i in range(60)]
    source.write_text("\n".join([*lines, json.dumps({"id": "good", "prompt": "Hi."})]) + "\n")
    output = tmp_path / "out.parquet"
    code, text = cli(
        "run", str(source), "--model", str(tiny_model_dir), "--output", str(output),
        "--max-tokens", "2", "--batch-size", "4", "--checkpoint-every", "10", "--quiet",
    )  # fmt: skip
    assert code == 1, text
    records, _ = read_progress(parts_dir(output) / SHARD)
    assert [r.rows for r in records[:6]] == [10] * 6 and [r.errors for r in records[:6]] == [10] * 6
    assert sum(r.rows for r in records) == 61
    assert [r["finish_reason"] for r in rows(output)] == ["error"] * 60 + ["length"]


def test_sigterm_during_a_long_run_of_bad_rows_stops_and_saves(tmp_path, tiny_model_dir):
    source = tmp_path / "bad.jsonl"
    source.write_text("not json\n" * 200_000)
    output = tmp_path / "out.parquet"
    args = [str(source), "--model", str(tiny_model_dir), "--output", str(output)]
    job = Job(tmp_path, [*args, "--checkpoint-every", "100", "--quiet"])
    resume, _ = interrupt(job, signal.SIGTERM, lambda: lines_recorded(output) >= 2)
    report = status_json(output)
    assert 200 <= report["rows_done"] < 200_000 and report["rows_done"] == report["errors"]
    assert not report["complete"]


def test_resumed_shard_exits_1_for_error_rows_of_an_earlier_session(tmp_path, tiny_model_dir):
    source = tmp_path / "data.jsonl"
    lines = [{"id": "bad", "image": "missing.png", "prompt": "x"}]
    lines += [{"id": f"r{i}", "prompt": f"Describe {i}."} for i in range(1, 16)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.parquet"
    args = [
        str(source), "--model", str(tiny_model_dir), "--output", str(output),
        "--max-tokens", "2", "--batch-size", "2", "--checkpoint-every", "2", "--shard", "0/2",
    ]  # fmt: skip
    code, text = cli("run", *args)
    assert code == 1 and "not merged yet" in text, text
    # As if killed after the first part, which holds the error record.
    shard_dir = parts_dir(output) / shard_name(0, 2)
    records, _ = read_progress(shard_dir)
    assert records[0].errors == 1 and len(records) > 1 and sum(r.errors for r in records) == 1
    (shard_dir / "progress.jsonl").write_bytes(records[0].to_line())
    (shard_dir / "complete.json").unlink()
    code, text = cli("run", *args)
    assert re.search(r"resuming: [1-9] of 8 rows already done", text), text
    assert code == 1, text  # the shard holds an error record, though this session wrote none


@pytest.mark.parametrize(
    "name",
    [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ],
)
def test_model_files_replaced_in_place_refuse_resume(tmp_path, tiny_model_dir, name):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    source = tmp_path / "small.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n" for i in range(3)))
    args = [str(source), "--model", str(model), "--max-tokens", "2", "--quiet"]
    assert cli("run", *args)[0] == 0
    settings = json.loads((model / name).read_text())
    settings["changed_in_place"] = True  # e.g. other stop ids, vocabulary, normalisation
    (model / name).write_text(json.dumps(settings))
    code, text = cli("run", *args)
    assert code == 2, text
    assert f"model_identity.files.{name}: " in text and "--overwrite" in text, text


def test_a_fault_in_preparing_rows_stops_the_run_and_marks_nothing_done(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A bug or out-of-memory while preparing rows is no bad row: recording it as each row's
    error would mark every row done, and the re-run after the fix would skip them all."""
    from model.processing import Processor

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(3)))
    output = tmp_path / "out.parquet"
    args = ["run", str(source), "--model", str(tiny_model_dir), "--output", str(output)]
    fault = AttributeError("'NoneType' object has no attribute 'encode'")
    with monkeypatch.context() as patch:
        patch.setattr(Processor, "estimate_tokens", lambda *a, **k: (_ for _ in ()).throw(fault))
        result = CliRunner().invoke(main, [*args, "--max-tokens", "2", "--quiet"])
    # the run stops (exit 4, with the traceback), no row recorded
    assert result.exit_code == 4 and "stopped by an unexpected error (AttributeError" in (
        result.output
    )
    assert not output.exists()
    code, text = cli(*args, "--max-tokens", "2", "--quiet")  # fixed: every row runs
    assert code == 0, text
    assert [r["finish_reason"] for r in rows(output)] == ["length"] * 3


def _rows_job(tmp_path: Path, model: Path, lines: list[dict]) -> tuple[Path, list[str]]:
    """``lines`` as rows.jsonl; the output path and the `run` arguments for it."""
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.parquet"
    return output, ["run", str(source), "--model", str(model), "--output", str(output)]


def _failing_generation(monkeypatch, fails):
    """Prefill raising for rows, one of which has a prompt that ``fails``."""
    from model.generate import Decoder

    real = Decoder.prefill

    def prefill(self, items):
        texts = [self.processor.decode([i for i in row.input_ids if i >= 0]) for _, row, _ in items]
        if any(fails(text) for text in texts):
            raise RuntimeError("device lost")
        return real(self, items)

    monkeypatch.setattr(Decoder, "prefill", prefill)


def test_a_row_that_fails_in_generation_is_an_error_record(tmp_path, tiny_model_dir, monkeypatch):
    source = tmp_path / "rows.jsonl"
    prompts = ["Say one.", "Say BOOM.", "Say three.", "Say four."]
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    output = tmp_path / "out.parquet"
    _failing_generation(monkeypatch, lambda text: "BOOM" in text)
    code, text = cli("run", str(source), "--model", str(tiny_model_dir), "--output", str(output),
                     "--max-tokens", "2", "--quiet")  # fmt: skip
    assert code == 1, text
    results = rows(output)
    assert [r["finish_reason"] for r in results] == ["length", "error", "length", "length"]
    assert results[1]["error"] == "generation failed: RuntimeError: device lost"


def _failing_preparation(monkeypatch, fails):
    """Preparing a row (image and prompt to token ids) raising an error no check foresaw for
    rows whose prompt ``fails``."""
    from model.processing import Processor

    real = Processor.prepare

    def prepare(self, prompt, *args, **kwargs):
        if fails(prompt):
            raise IndexError("unforeseen")
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Processor, "prepare", prepare)


def test_a_row_that_fails_in_preparation_unforeseen_is_an_error_record(
    tmp_path, tiny_model_dir, monkeypatch
):
    """An error no check foresaw while preparing one row (a bug met by one odd image, say) is
    that row's error record: it stopped the run with exit 4 at that row on every resume. Many
    rows in a row failing so stop the run (exit 4), recording none, as generation faults do."""
    lines = [{"prompt": p} for p in ["Say one.", "Say BOOM.", "Say three.", "Say four."]]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    with monkeypatch.context() as patch:
        _failing_preparation(patch, lambda prompt: "BOOM" in prompt)
        code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 1, text
    results = rows(output)
    assert [r["finish_reason"] for r in results] == ["length", "error", "length", "length"]
    error = results[1]["error"]
    assert error.startswith("preparing the row failed: IndexError: unforeseen at "), error
    assert error.endswith(" in prepare"), error

    before = output.read_bytes()
    lines = [{"prompt": f"Say {i}."} for i in range(20)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    with monkeypatch.context() as patch:
        _failing_preparation(patch, lambda prompt: True)
        code, text = cli(*args, "--max-tokens", "2", "--batch-size", "8", "--overwrite", "--quiet")
    assert code == 4, text
    assert "preparing rows failed for 16 rows in a row" in text and "unforeseen" in text, text
    assert output.read_bytes() == before  # the old job's output: nothing was merged
    assert not (parts_dir(output) / "manifest.json").exists()  # nothing recorded, nothing left


def test_generation_failing_for_every_row_stops_and_records_none(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Many rows in a row failing in generation is a fault of the model or machine: recording
    them as errors would mark them done, and the re-run after the fix would skip them."""
    lines = [{"prompt": f"Say {i}."} for i in range(20)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    args += ["--batch-size", "8"]  # the fault limit: 16 rows, twice a batch, at least 16
    with monkeypatch.context() as patch:
        _failing_generation(patch, lambda text: True)
        code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 4, text
    assert "generation failed for 16 rows in a row" in text and "device lost" in text
    # it recorded nothing, so it left nothing: a fix that changes the job is no other job
    assert not (tmp_path / "out.parquet.parts" / "manifest.json").exists()
    assert not output.exists()
    code, text = cli(*args, "--max-tokens", "3", "--quiet")  # fixed: every row runs
    assert code == 0, text
    assert [r["finish_reason"] for r in rows(output)] == ["length"] * 20


def test_many_prompts_over_one_image_failing_are_that_images_errors(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The planner runs one image's prompts together, so 20 of them failing in a row are one
    image failing: error records (exit 1), not a fault that would stop every re-run too."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "bad.png")
    lines = [{"id": f"q{i}", "image": "bad.png", "prompt": f"BOOM {i}?"} for i in range(20)]
    lines += [{"id": f"t{i}", "prompt": f"Say {i}."} for i in range(4)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    _failing_generation(monkeypatch, lambda text: "BOOM" in text)
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 1, text
    reasons = {r["id"]: r["finish_reason"] for r in rows(output)}
    assert reasons == {line["id"]: "error" if "image" in line else "length" for line in lines}


def test_a_fault_over_a_few_images_with_many_prompts_each_stops_the_run(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Every row failing over five images of four prompts each: a fault, not five bad images.
    With FAILING_HELD lowered, one image's failing rows are recorded as they pile up."""
    from jobrunner import runner

    lines = []
    for image in range(5):
        Image.new("RGB", (40, 30), (50 * image, 0, 0)).save(tmp_path / f"{image}.png")
        lines += [{"image": f"{image}.png", "prompt": f"Q{q}?"} for q in range(4)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    args += ["--batch-size", "8"]  # the fault limit: 16 rows, twice a batch, at least 16
    with monkeypatch.context() as patch:
        _failing_generation(patch, lambda text: True)
        code, text = cli(*args, "--max-tokens", "2", "--quiet")
        assert code == 4, text
        assert "generation failed for 16 rows in a row, over 4 images" in text, text
        assert not (tmp_path / "out.parquet.parts" / "manifest.json").exists()
        patch.setattr(runner, "FAILING_HELD", 3)  # then the rows are recorded, 3 at a time
        code, text = cli(*args, "--max-tokens", "2", "--quiet")
        assert code == 1, text
        assert [r["finish_reason"] for r in rows(output)] == ["error"] * 20


def test_resumed_run_over_rows_left_without_images_does_not_warn_about_the_column(
    tmp_path, tiny_model_dir
):
    """The image-column warning looks at the shard's rows, not only those this session runs:
    here the one row with an image was done before the kill."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    source = tmp_path / "data.jsonl"
    lines = [{"id": "pic", "picture": "a.png", "prompt": "Describe."}]
    lines += [{"id": f"t{i}", "prompt": "Hi."} for i in range(3)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.parquet"
    args = [
        str(source), "--model", str(tiny_model_dir), "--output", str(output), "--max-tokens", "2",
        "--batch-size", "1", "--checkpoint-every", "1", "--image-column", "picture",
    ]  # fmt: skip
    code, text = cli("run", *args)
    assert code == 0 and "no row had an image" not in text, text
    assert "had a null image" not in text, text  # rows that leave the column out: text only
    # As if killed after the first part: the image row (the longest) ran first.
    shard_dir = parts_dir(output) / SHARD
    records, _ = read_progress(shard_dir)
    (shard_dir / "progress.jsonl").write_bytes(records[0].to_line())
    (shard_dir / "complete.json").unlink()
    code, text = cli("run", *args)
    assert "resuming: 1 of 4 rows already done" in text, text
    assert code == 0 and "no row had an image" not in text, text
    assert [r["id"] for r in rows(output)] == ["pic", "t0", "t1", "t2"]


def test_an_unexpected_error_stops_the_run_with_exit_4_and_keeps_saved_rows(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A failure that is no row's (a bug, memory) is not 'some rows are error records' (1):
    the run stops with exit 4, saved rows kept, and the same command resumes; a new job that
    saved nothing leaves no checkpoint."""
    from model.processing import Processor

    lines = [{"id": f"r{i}", "prompt": f"Say {i}."} for i in range(6)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    args += ["--max-tokens", "2", "--batch-size", "2", "--checkpoint-every", "1", "--quiet"]
    real = Processor.prepare

    def prepare(self, prompt, image, chat=True):
        if prompt == failing:
            raise MemoryError("simulated")
        return real(self, prompt, image, chat)

    monkeypatch.setattr(Processor, "prepare", prepare)
    failing = "Say 0."  # before any row: nothing is left behind
    code, text = cli(*args)
    assert code == 4, text
    assert "stopped by an unexpected error (MemoryError: simulated)" in text
    assert "run the same command again" in text
    assert not (tmp_path / "out.parquet.parts" / "manifest.json").exists()
    failing = "Say 4."  # later: the rows saved before it are kept
    code, text = cli(*args)
    assert code == 4, text
    saved = status_json(output)["rows_done"]
    assert 2 <= saved < 6
    failing = None
    code, text = cli(*args)
    assert code == 0, text
    assert [r["id"] for r in rows(output)] == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize("change", ["append", "truncate"])
def test_an_input_changed_while_the_job_runs_stops_it_with_a_clear_message(
    tmp_path, tiny_model_dir, monkeypatch, change
):
    """Rows appended to (or cut from) the input while a job runs are not the rows it counted
    and fingerprinted: the run stops with exit 2 and says so, the rows done are saved, and it
    never marks rows past the count (which had wedged the job: 'shard 0/1 has 10 of 8 rows').
    The rows saved may not be the file's, so even the original file put back does not resume
    them: status and merge say why, and --overwrite starts over."""
    from model.generate import Decoder

    lines = [{"id": f"r{i}", "prompt": f"Say {i}."} for i in range(8)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    source = tmp_path / "rows.jsonl"
    original = source.read_bytes()
    real_step = Decoder.step
    changed = []

    def step(self, drop=True):
        if not changed:
            changed.append(True)
            if change == "append":
                with source.open("a") as fh:
                    fh.writelines(json.dumps({"prompt": f"More {i}."}) + "\n" for i in range(4))
            else:
                source.write_text(source.read_text().split("\n", 2)[2])
        return real_step(self, drop)

    monkeypatch.setattr(Decoder, "step", step)
    code, text = cli(*args, "--max-tokens", "2", "--batch-size", "2", "--sort-window", "1",
                     "--checkpoint-every", "1", "--quiet")  # fmt: skip
    assert code == 2, text
    assert f"{source} changed while the job ran" in text, text
    assert "with --overwrite" in text
    info = status_json(output)
    assert 0 < info["rows_done"] <= 8 and not output.exists()
    assert info["input_changed"]
    monkeypatch.undo()
    changed_file = source.read_bytes()
    source.write_bytes(original)  # put back: the saved rows may still be the changed file's
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 2 and "the input changed while this job last ran" in text, text
    code, text = cli("status", str(output))
    assert "--overwrite runs every row again" in text and "to resume" not in text, text
    code, text = cli("merge", str(output))
    assert code == 2 and "the input changed while this job last ran" in text, text
    source.write_bytes(changed_file)
    code, text = cli(*args, "--max-tokens", "2", "--overwrite", "--quiet")  # the new file's job
    assert code == 0, text
    assert len(rows(output)) == (12 if change == "append" else 6)


def test_a_finished_sharded_job_run_again_unsharded_is_nothing_to_do(tmp_path, tiny_model_dir):
    lines = [{"id": f"r{i}", "prompt": f"Say {i}."} for i in range(5)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    args += ["--max-tokens", "2"]
    for shard in ("0/2", "1/2"):
        code, text = cli(*args, "--shard", shard, "--quiet")
        assert code == 0, text
    before = output.read_bytes()
    for again in ([], ["--shard", "1/3"]):  # the same job in another split: it is finished
        code, text = cli(*args, *again)
        assert code == 0 and "nothing to do" in text, text
        assert output.read_bytes() == before
    merged = rows(output)
    output.unlink()  # removed (or never merged): the done shards merge, nothing runs
    code, text = cli(*args)
    assert code == 0 and "nothing to run: every shard of this job is done" in text, text
    assert rows(output) == merged
    code, text = cli(*args, "--max-tokens", "3")  # another job: refused as before
    assert code == 2 and "max_tokens: 2 → 3" in text, text


def test_status_says_when_the_input_changed_since_the_job_started(tmp_path, tiny_model_dir):
    """A finished job whose input grew is refused by `run` as another job: `status` says so
    instead of only 'complete', with or without the checkpoint folder."""
    lines = [{"id": f"r{i}", "prompt": f"Say {i}."} for i in range(3)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 0, text
    assert status_json(output)["input_changed"] is None
    source = tmp_path / "rows.jsonl"
    before = source.stat().st_size
    with source.open("a") as fh:
        fh.write(json.dumps({"prompt": "One more."}) + "\n")
    after = source.stat().st_size
    for checkpoint in (True, False):
        if not checkpoint:
            shutil.rmtree(tmp_path / "out.parquet.parts")
        info = status_json(output)
        assert info["complete"] and info["input_changed"] == f"size {before} → {after} bytes"
        code, text = cli("status", str(output))
        assert code == 0 and "the input changed since the job started" in text, text
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 2 and "input.size" in text, text


def test_images_the_storage_fails_to_read_stop_the_run_instead_of_becoming_errors(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A share that went away (reads fail with a stale handle) makes many rows in a row
    unreadable: a fault of the storage, exit 4, nothing recorded, so the same command runs them
    once it is back. Rows with faults of their own among them (a bad limit, a missing file)
    read no image, so they do not make the held rows their own errors; a missing file stays
    its row's error."""
    import errno

    from jobrunner import readers

    share = tmp_path / "share"
    share.mkdir()
    lines = []
    for i in range(24):
        Image.new("RGB", (30, 20), (10 * i, 0, 0)).save(share / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"share/{i}.png", "prompt": "Describe."})
    for i in (3, 9, 15):
        lines[i]["max_tokens"] = -1  # the row's own error, found before its image is read
    lines[5]["image"] = "share/missing.png"
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    args += ["--max-tokens", "2", "--batch-size", "8", "--max-tokens-column", "max_tokens"]
    mounted = False

    def stale_open(path, *rest, **kwargs):
        if not mounted and str(path).startswith(str(share)):
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(path))
        return open(path, *rest, **kwargs)

    monkeypatch.setattr(readers, "open", stale_open, raising=False)
    code, text = cli(*args, "--quiet")
    assert code == 4, text
    assert "reading images failed for 16 rows in a row" in text and "Stale file handle" in text
    # only the rows' own errors are recorded (3, 5, 9, 15), none of the unreadable rows
    assert not output.exists() and status_json(output)["rows_done"] == 4
    mounted = True  # the share is back
    code, text = cli(*args, "--quiet")
    assert code == 1, text
    reasons = [r["finish_reason"] for r in rows(output)]
    assert [i for i, reason in enumerate(reasons) if reason == "error"] == [3, 5, 9, 15]
    assert "image file not found" in rows(output)[5]["error"]


def test_a_read_error_of_the_storage_is_told_apart_from_a_bad_file(tmp_path, monkeypatch):
    import errno

    from jobrunner import readers

    image = tmp_path / "a.png"
    Image.new("RGB", (4, 3)).save(image)
    ref = readers.ImageRef(path=image)
    real_open = open

    def failing_open(path, *args, code=errno.ESTALE, **kwargs):
        if str(path) == str(image):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(readers.StorageError, match="Stale file handle"):
        readers.image_size(ref, 10**6)
    monkeypatch.setattr("builtins.open", partial(failing_open, code=errno.EACCES))
    with pytest.raises(readers.ImageError, match="Permission denied") as refused:
        readers.image_size(ref, 10**6)
    assert not isinstance(refused.value, readers.StorageError)
    for missing in (tmp_path / "b.png", tmp_path / "gone" / "b.png"):  # the row's, always
        with pytest.raises(readers.ImageError, match="image file not found: ") as refused:
            readers.image_size(readers.ImageRef(path=missing), 10**6)
        assert not isinstance(refused.value, readers.StorageError)


def test_images_that_fail_to_load_in_the_storage_after_their_header_stop_the_run(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The share can go away between reading an image's header (planning) and its pixels
    (preparing): the same fault, found later."""
    from jobrunner import readers, runner

    lines = []
    for i in range(20):
        Image.new("RGB", (30, 20), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"{i}.png", "prompt": "Describe."})
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)

    def gone(ref, max_pixels):
        raise readers.StorageError(f"cannot read image file {ref.path}: Input/output error")

    monkeypatch.setattr(runner, "load_image", gone)
    code, text = cli(*args, "--max-tokens", "2", "--batch-size", "8", "--quiet")
    assert code == 4 and "reading images failed for 16 rows in a row, over 16 images" in text
    assert not output.exists()


def test_an_input_cut_while_the_job_starts_is_found_too(tmp_path, tiny_model_dir, monkeypatch):
    """The input is identified before its rows are counted, so a change while the model is
    identified (seconds, for a real model) is found at the end as well."""
    from jobrunner import runner

    lines = [{"id": f"r{i}", "prompt": f"Say {i}."} for i in range(5)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    source = tmp_path / "rows.jsonl"
    real = runner.model_identity

    def cutting(model):
        source.write_text("".join(json.dumps(line) + "\n" for line in lines[:3]))
        return real(model)

    monkeypatch.setattr(runner, "model_identity", cutting)
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 2 and f"{source} changed while the job ran" in text, text
    assert "cannot mark it complete" not in text


def test_a_large_input_touched_while_the_job_runs_is_a_changed_input(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Past 2 MiB the input is known by its size, samples and modification time, as in the
    fingerprint: a new modification time during the run is a change (a rewrite of its middle
    would show no other way), and the job resumes no more."""
    from model.generate import Decoder

    pad = "x" * 400_000
    lines = [{"id": f"r{i}", "prompt": f"Say {i}.", "pad": pad} for i in range(6)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    source = tmp_path / "rows.jsonl"
    assert source.stat().st_size > 2 * 2**20
    real_step = Decoder.step

    def step(self, drop=True):
        os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
        return real_step(self, drop)

    monkeypatch.setattr(Decoder, "step", step)
    flags = ("--max-tokens", "2", "--batch-size", "2", "--checkpoint-every", "1", "--quiet")
    code, text = cli(*args, *flags)
    assert code == 2 and "same size, other content or modification time" in text, text
    monkeypatch.undo()
    code, text = cli(*args, *flags)
    assert code == 2 and "the input changed while this job last ran" in text, text


def test_an_input_that_cannot_be_read_at_the_end_is_no_change(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Moved away (or unreadable for a moment) when the run ends: nothing can be told, so
    the job is not marked changed, and the same command finishes it once it is back."""
    from model.generate import Decoder

    lines = [{"id": f"r{i}", "prompt": f"Say {i}."} for i in range(4)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    source = tmp_path / "rows.jsonl"
    real_step = Decoder.step

    def step(self, drop=True):
        if source.exists():
            source.rename(tmp_path / "away.jsonl")
        return real_step(self, drop)

    monkeypatch.setattr(Decoder, "step", step)
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 2 and "cannot be read to check" in text, text
    monkeypatch.undo()
    (tmp_path / "away.jsonl").rename(source)
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 0, text
    assert [r["id"] for r in rows(output)] == [f"r{i}" for i in range(4)]


def test_rows_saved_before_an_interrupt_over_a_rewritten_input_are_not_resumed(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A run that stops another way (a signal, a fault) after its input was rewritten also
    marks the job: its saved rows may be the rewritten file's."""
    from jobrunner import runner
    from model.generate import Decoder

    lines = [{"id": f"r{i}", "prompt": f"Say {i}."} for i in range(6)]
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    source = tmp_path / "rows.jsonl"
    original = source.read_bytes()
    real_step = Decoder.step
    steps = []

    def step(self, drop=True):
        steps.append(1)
        if len(steps) == 3:  # rows saved by now; then the file is rewritten and a signal comes
            source.write_text(original.decode().replace("Say", "Sing"))
            raise runner.StoppedNow(signal.SIGINT)
        return real_step(self, drop)

    monkeypatch.setattr(Decoder, "step", step)
    flags = ("--max-tokens", "2", "--batch-size", "2", "--checkpoint-every", "1", "--quiet")
    code, text = cli(*args, *flags)
    assert code == 2 and status_json(output)["rows_done"] > 0, text
    assert "stopped (StoppedNow: SIGINT)" in text and "run the job again with --overwrite" in text
    assert "resume with" not in text
    monkeypatch.undo()
    source.write_bytes(original)
    code, text = cli(*args, *flags)
    assert code == 2 and "the input changed while this job last ran" in text, text


def test_a_small_job_whose_storage_reads_no_image_stops_too(tmp_path, tiny_model_dir, monkeypatch):
    """Fewer rows than the fault limit: if the storage read no image in the whole run, four
    or more unreadable images are its fault too (exit 4, none recorded); the text rows are
    done."""
    import errno

    from jobrunner import readers

    lines = [{"id": "t", "prompt": "Say hi."}]
    for i in range(5):
        Image.new("RGB", (30, 20), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"{i}.png", "prompt": "Describe."})
    output, args = _rows_job(tmp_path, tiny_model_dir, lines)
    mounted = False

    def stale_open(path, *rest, **kwargs):
        if not mounted and str(path).endswith(".png"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return open(path, *rest, **kwargs)

    monkeypatch.setattr(readers, "open", stale_open, raising=False)
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 4 and "reading images failed for every one of the 5 images" in text, text
    assert status_json(output)["rows_done"] == 1  # the text row
    mounted = True
    code, text = cli(*args, "--max-tokens", "2", "--quiet")
    assert code == 0, text
    assert [r["finish_reason"] for r in rows(output)] == ["length"] * 6


def test_embedded_images_do_not_tell_that_the_storage_works(tmp_path, tiny_model_dir, monkeypatch):
    """Rows whose image bytes are in the dataset read no file: between rows whose files fail
    to read, they do not make those rows' failures their own."""
    import errno
    import io

    from jobrunner import readers

    images, prompts = [], []
    for i in range(36):
        picture = Image.new("RGB", (30, 20), (7 * i, 0, 0))
        if i % 2:  # embedded
            data = io.BytesIO()
            picture.save(data, format="PNG")
            images.append({"bytes": data.getvalue(), "path": None})
        else:  # on the share
            picture.save(tmp_path / f"{i}.png")
            images.append({"bytes": None, "path": f"{i}.png"})
        prompts.append("Describe.")
    source = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"image": images, "prompt": prompts}), source)
    output = tmp_path / "out.parquet"

    def eio_open(path, *rest, **kwargs):
        if str(path).endswith(".png"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return open(path, *rest, **kwargs)

    monkeypatch.setattr(readers, "open", eio_open, raising=False)
    code, text = cli("run", str(source), "--model", str(tiny_model_dir), "--output", str(output),
                     "--max-tokens", "2", "--batch-size", "8", "--quiet")  # fmt: skip
    assert code == 4 and "reading images failed for 16 rows in a row" in text, text


def test_a_library_upgrade_that_changes_prompt_encoding_is_another_job(
    tmp_path, dataset, tiny_model_dir, greedy, monkeypatch
):
    """The model's files alone do not say how prompts encode: transformers 5 encoded Phi-3's
    tokenizer otherwise than 4. The fingerprint holds a digest of the encoding, so a job
    started under one library and resumed under another is refused; a checkpoint from before
    the digest was recorded is still the same job."""
    from model import loading

    output = tmp_path / "out.parquet"
    copy_checkpoint(greedy[0], output, keep_parts=5)
    manifest_path = parts_dir(output) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["fingerprint_fields"]["model_identity"]["prompt_encoding"]
    with monkeypatch.context() as patch:
        patch.setattr(loading, "encoding_probe", lambda model_dir: "0123456789abcdef")
        code, text = cli("run", *job_args(dataset, tiny_model_dir, output))
    assert code == 2 and "prompt encoding: the installed libraries" in text, text
    # as recorded before the digest: no prompt_encoding, another fingerprint
    del manifest["fingerprint_fields"]["model_identity"]["prompt_encoding"]
    manifest["fingerprint"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    code, text = cli("run", *job_args(dataset, tiny_model_dir, output))
    assert code == 0 and "different job" not in text, text
    assert_same_output(output, greedy[1])
