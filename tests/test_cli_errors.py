"""`jobrunner` on bad input and after interruptions: clear messages (never a traceback), exit 2
before any work, resume commands that resume, and status/merge that find the job's checkpoint."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobrunner import runner
from jobrunner.cli import main


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Four text-only rows (nothing to decode: the model alone sets the pace)."""
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"Say {i}."}) + "\n" for i in range(4))
    )
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the job starts (configuration errors must stop before the model)."""

    def run_job(spec, reporter=None):
        raise AssertionError("run_job was called")

    monkeypatch.setattr(runner, "run_job", run_job)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["DATA", "--output", "DATA/x.parquet"], "data.jsonl is a file, not a folder"),
        (["DATA", "--checkpoint-dir", "DATA/ck"], "checkpoint_dir: cannot create the folder"),
        (["DATA", "--keep-columns", "row_index"], "other than the output columns"),
        (["DATA", "--prompt", "Q: {prompt!z}"], "unknown conversion"),
        (["DATA", "--prompt", "Q: {prompt:zz}"], "invalid format spec"),
        (["BAD_TOML"], "is not UTF-8"),
    ],
)
def test_bad_input_exits_2_before_any_work(data, tmp_path, no_run, args, fragment):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_bytes(b'model = "tiny"\nprompt = "\xff"\n')
    names = {"DATA": str(data), "BAD_TOML": str(bad_toml)}
    args = [names.get(a, a.replace("DATA", str(data))) for a in args]
    result = invoke("run", *args, "--model", "org/model")
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["500,600", "30s,1m"])
def test_checkpoint_every_refuses_a_bound_given_twice(data, no_run, value):
    """``500,600`` ran with 600 rows and dropped the 500 without a word."""
    result = invoke("run", data, "--model", "org/model", "--checkpoint-every", value)
    assert result.exit_code == 2, result.output
    assert "each at most once" in result.output and "Traceback" not in result.output


def test_damaged_manifest_is_explained_and_overwrite_starts_over(data, tiny_model_dir):
    output = data.with_name("out.parquet")
    parts = output.with_name("out.parquet.parts")
    parts.mkdir()
    (parts / "manifest.json").write_text("")
    args = ["run", data, "--model", tiny_model_dir, "--output", output, "--max-tokens", 2]
    for result in (invoke("status", output), invoke("merge", output), invoke(*args, "--quiet")):
        assert result.exit_code == 2, result.output
        assert "manifest.json is damaged" in result.output and "--overwrite" in result.output
    result = invoke(*args, "--quiet", "--overwrite")
    assert result.exit_code == 0, result.output
    assert pq.read_table(output).num_rows == 4
    assert invoke("status", output).exit_code == 0


def interrupted_run(monkeypatch, argv: list[str]) -> str:
    """Run ``jobrunner ARGV`` with a job that is interrupted; return the printed resume command."""

    def run_job(spec, reporter=None):
        raise runner.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(runner, "run_job", run_job)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/jobrunner", *argv])
    result = invoke(*argv)
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("jobrunner: resume with: ")]
    return line.removeprefix("jobrunner: resume with: ")


def spec_of_command(monkeypatch, command: str):
    """The job spec that ``command`` (as printed) would run."""
    seen = []

    def run_job(spec, reporter=None):
        seen.append(spec)
        raise runner.ConfigError("stop here")

    monkeypatch.setattr(runner, "run_job", run_job)
    program, *args = shlex.split(command)
    assert program == "jobrunner"
    assert invoke(*args).exit_code == 2
    return seen[0]


@pytest.mark.parametrize(("in_file", "flag"), [(True, []), (False, ["--overwrite"])])
def test_resume_command_keeps_the_saved_rows(data, monkeypatch, in_file, flag):
    job = data.with_name("job.toml")
    job.write_text(
        f'input = "data.jsonl"\nmodel = "org/model"\noverwrite = {str(in_file).lower()}\n'
    )
    command = interrupted_run(monkeypatch, ["run", str(job), *flag, "--quiet"])
    assert spec_of_command(monkeypatch, command).overwrite is False
    # and a plain re-run of that job still starts over, as its file says
    assert spec_of_command(monkeypatch, f"jobrunner run {job}").overwrite is in_file


def test_status_and_merge_find_a_job_file_checkpoint_dir(data, tiny_model_dir):
    job = data.with_name("job.toml")
    job.write_text(
        f'input = "data.jsonl"\nmodel = "{tiny_model_dir}"\noutput = "out.parquet"\n'
        'checkpoint_dir = "ck"\nmax_tokens = 2\nquiet = true\n'
    )
    output, ck = data.with_name("out.parquet"), data.with_name("ck")
    assert invoke("run", job, "--shard", "0/2").exit_code == 0
    assert (ck / "manifest.json").is_file()

    lost = invoke("status", output)  # OUTPUT.parts/ does not exist: say how to find the job
    assert lost.exit_code == 2 and "checkpoint_dir" in lost.output and "JOB.toml" in lost.output
    for args in (["status", job], ["status", output, "--checkpoint-dir", ck]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert "2/4 rows" in result.output and "shard-00001-of-00002: 0/2 rows" in result.output
    result = invoke("merge", job)
    assert result.exit_code == 2 and "shard 1/2 has not started" in result.output

    assert invoke("run", job, "--shard", "1/2").exit_code == 0
    output.unlink()  # merge again by hand
    result = invoke("merge", job)
    assert result.exit_code == 0, result.output
    assert pq.read_table(output).column("row_index").to_pylist() == [0, 1, 2, 3]
    assert "complete" in invoke("status", job).output


def test_checkpoint_dir_flag(data, tmp_path, monkeypatch):
    command = f"jobrunner run {data} --model org/model --checkpoint-dir {tmp_path / 'ck'}"
    assert spec_of_command(monkeypatch, command).parts_dir == tmp_path / "ck"


def test_failed_merge_of_a_finished_job_is_not_success(data, tiny_model_dir, monkeypatch):
    from jobrunner import merge
    from jobrunner.checkpoint import CheckpointError

    def damaged(*args, **kwargs):
        raise CheckpointError("damaged part in shard 0/1 (part-000000.parquet)")

    monkeypatch.setattr(merge, "_collect_parts", damaged)
    output = data.with_name("out.parquet")
    result = invoke("run", data, "--model", tiny_model_dir, "--output", output, "--max-tokens", 2)
    assert not output.exists()
    assert result.exit_code != 0 and "damaged part" in result.output


def test_merge_names_the_file_an_os_error_is_about(data, tiny_model_dir):
    """A part that cannot be read is not a write error: the message names the part."""
    output = data.with_name("out.parquet")
    args = ["--model", tiny_model_dir, "--output", output, "--max-tokens", "2", "--quiet"]
    result = invoke("run", data, *args)
    assert result.exit_code == 0, result.output
    output.unlink()
    part = next(data.with_name("out.parquet.parts").glob("shard-*/part-*.parquet"))
    part.unlink()
    part.mkdir()  # unreadable as a file
    result = invoke("merge", output)
    assert result.exit_code == 4  # a storage fault: fixed, the same command merges, result.output
    assert "cannot merge into" in result.output and part.name in result.output, result.output
    assert "Traceback" not in result.output and not output.exists()


def test_a_model_that_does_not_load_leaves_no_job_behind(data, tiny_model_dir, tmp_path):
    """Exit 2 means nothing was run: the corrected command starts the job, rather than being
    refused as a different job by a manifest the failed run left."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    output = tmp_path / "out.parquet"
    result = invoke("run", data, "--model", broken, "--output", output, "--max-tokens", "2")
    assert result.exit_code == 2 and "cannot load model" in result.output, result.output
    parts = tmp_path / "out.parquet.parts"
    assert not (parts / "manifest.json").exists()
    assert not [p for p in parts.iterdir() if p.is_dir()]
    result = invoke("run", data, "--model", tiny_model_dir, "--output", output, "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    assert pq.read_table(output).num_rows == 4


def test_a_blas_library_that_cannot_be_loaded_is_a_configuration_error(monkeypatch, tmp_path):
    from jobrunner import _blas

    monkeypatch.setattr(_blas, "_loaded", [])  # as in a fresh process
    monkeypatch.setenv("JOBRUNNER_BLAS", "/no/such/libopenblas.so.0")
    result = invoke("status", tmp_path / "out.parquet")
    assert result.exit_code == 2, result.output
    assert "JOBRUNNER_BLAS=/no/such/libopenblas.so.0 cannot be loaded" in result.output
    assert "Traceback" not in result.output
    import ctypes.util

    other = ctypes.util.find_library("z") or ctypes.util.find_library("m")  # a library, no BLAS
    if other:
        monkeypatch.setenv("JOBRUNNER_BLAS", other)
        result = invoke("status", tmp_path / "out.parquet")
        assert result.exit_code == 2 and "it is not a BLAS library" in result.output


def test_a_shard_out_of_range_is_named_as_given(data, no_run):
    result = invoke("run", data, "--model", "org/model", "--shard", "2/2")
    assert result.exit_code == 2
    assert "got '2/2'" in result.output and "(2, 2)" not in result.output


@pytest.mark.parametrize(
    ("flags", "chat", "quiet"),
    [([], False, True), (["--chat"], True, True), (["--no-quiet"], False, False)],
)
def test_flags_turn_back_the_job_files_booleans(data, monkeypatch, flags, chat, quiet):
    job = data.with_name("booleans.toml")
    job.write_text('input = "data.jsonl"\nmodel = "org/model"\nchat = false\nquiet = true\n')
    spec = spec_of_command(monkeypatch, shlex.join(["jobrunner", "run", str(job), *flags]))
    assert (spec.chat, spec.quiet) == (chat, quiet)
