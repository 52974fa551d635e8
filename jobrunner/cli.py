"""The ``jobrunner`` command: parse, build a job spec, call the library, report.

Exit codes: 0 every row succeeded; 1 the job ran but some rows are error records; 2 usage or
configuration error (nothing was run); 3 another run holds the job's lock; 4 a fault that is no
row's (storage of the output or checkpoint, a bug, the model or machine: the same command goes on
once it is fixed); 130/143 interrupted by SIGINT/SIGTERM (resumable: the message gives the
command).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

import click

EXIT_OK, EXIT_ROW_ERRORS, EXIT_CONFIG, EXIT_LOCKED, EXIT_FAULT = 0, 1, 2, 3, 4


class _ConfigError(click.ClickException):
    exit_code = EXIT_CONFIG


class _StorageFault(click.ClickException):
    """Writing the checkpoint or the output failed (a full disk, a folder turned read-only):
    no row's fault and no setting's, so the same command goes on once it is fixed."""

    exit_code = EXIT_FAULT


def _run_options(func):
    options = [
        click.option("--model", help="Model directory or Hugging Face hub id."),
        click.option("--output", type=click.Path(path_type=Path), help="Result .parquet file."),
        click.option("--prompt", help="Prompt template for every row; {column} fields."),
        click.option("--id-column"),
        click.option("--image-column"),
        click.option("--prompt-column"),
        click.option("--keep-columns", help="Comma-separated input columns to copy."),
        click.option("--max-tokens", type=int),
        click.option(
            "--max-tokens-column",
            help="Input column of per-row limits on generated tokens (1 to --max-tokens).",
        ),
        click.option("--temperature", type=float),
        click.option("--top-p", type=float),
        click.option("--top-k", type=int),
        click.option("--seed", type=int),
        click.option("--batch-size", type=int),
        click.option("--max-batch-tokens", type=int),
        click.option("--num-crops", type=int),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"])),
        click.option("--quantize", type=click.Choice(["4", "8"])),
        click.option("--shard", help="Run shard K of N: K/N (0-based)."),
        click.option("--image-root", type=click.Path(path_type=Path)),
        click.option(
            "--checkpoint-every",
            help="Checkpoint interval: rows (500), time (30s, 5m) or both (500,30s).",
        ),
        click.option(
            "--checkpoint-dir",
            type=click.Path(path_type=Path),
            help="Parts, manifest and locks (default: OUTPUT.parts/).",
        ),
        click.option("--workers", type=int, help="Preprocessing threads."),
        click.option("--sort-window", type=int, help="Rows sorted by length together."),
        click.option(
            "--group-images/--no-group-images",
            default=None,
            help="Keep the rows of one image side by side when sorting (default) / plain sort.",
        ),
        click.option("--max-image-pixels", type=int),
        click.option(
            "--chat/--no-chat",
            default=None,
            help="Wrap prompts in the chat template (default) / send them as they are.",
        ),
        click.option(
            "--overwrite/--no-overwrite",
            default=None,
            help="Start over / resume (overrides `overwrite` in a job file).",
        ),
        click.option(
            "--retry-errors/--no-retry-errors",
            default=None,
            help="Run the rows saved as errors again, finished job or not; the other rows "
            "stay done (overrides `retry_errors` in a job file).",
        ),
        click.option(
            "--quiet/--no-quiet",
            default=None,
            help="No progress output / progress output (overrides `quiet` in a job file).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group()
@click.version_option(package_name="mlx-jobrunner")
def main() -> None:
    """Caption and question image datasets with Phi-3-Vision on MLX."""
    from ._blas import prepare_process

    override = os.environ.get("JOBRUNNER_BLAS", "").strip()
    try:
        loaded = prepare_process()
    except OSError as err:  # only a path named in JOBRUNNER_BLAS raises
        raise _ConfigError(
            f"JOBRUNNER_BLAS={override} cannot be loaded ({err}); point it to an OpenBLAS "
            "library (libopenblas.so.0), or unset it to search the usual places"
        ) from None
    if loaded is None and sys.platform.startswith("linux") and override.lower() != "none":
        import mlx.core as mx

        if mx.default_device() == mx.cpu:
            click.echo(
                "jobrunner: warning: OpenBLAS not found, so MLX uses its slow reference BLAS on "
                "the CPU (install it: apt-get install libopenblas0-pthread; JOBRUNNER_BLAS=none "
                "runs without it and without this warning)",
                err=True,
            )


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@_run_options
def run(input_path: Path, **flags) -> None:
    """Run (or resume) a job: INPUT is a .jsonl or .parquet dataset, or a .toml job file."""
    from .checkpoint import CheckpointError, FingerprintMismatch, LockHeld
    from .progress import Reporter
    from .runner import ConfigError, GenerationFault, Interrupted, StoppedNow, run_job

    spec = _build_spec(input_path, flags)
    reporter = Reporter(quiet=spec.quiet)
    try:
        try:
            result = run_job(spec, reporter)
        except BaseException as err:  # a stop that found its input changed: no resume to advise
            change = getattr(err, "input_changed", None)
            if change is None or isinstance(err, ConfigError):  # InputChanged says so itself
                raise
            reporter.close()
            raise _ConfigError(
                f"stopped ({type(err).__name__}: {err}), and {spec.input} changed while the job "
                f"ran ({change}), so the rows it saved may not be this file's: once it no longer "
                "changes, run the job again with --overwrite"
            ) from None
    except LockHeld as err:
        click.echo(f"jobrunner: {err}", err=True)
        sys.exit(EXIT_LOCKED)
    except GenerationFault as err:
        click.echo(f"jobrunner: {err}", err=True)
        sys.exit(EXIT_FAULT)
    except (ConfigError, FingerprintMismatch, CheckpointError) as err:
        note = ""
        if isinstance(err, FingerprintMismatch) and spec.retry_errors and not spec.overwrite:
            note = (
                " (--retry-errors runs error rows again within one job: after a change to the "
                "input or a setting, every row runs again)"
            )
        raise _ConfigError(f"{err}{note}") from None
    except OSError as err:  # a full disk, a read-only folder: durable parts stay as they are
        where = f" ({err.filename})" if err.filename else ""
        again = "run the same command again"
        if spec.overwrite and getattr(err, "nothing_saved", None) is False:
            # rows saved: the same command, --overwrite and all, would run them all again
            from_file = input_path.suffix.lower() == ".toml"
            again = f"resume with {shlex.join(_resume_args(sys.argv[1:], from_file))}"
        raise _StorageFault(
            f"{err.strerror or err}{where}; finished rows are saved: fix it and {again}"
        ) from None
    except (Interrupted, StoppedNow) as err:
        reporter.close()
        from_file = spec.overwrite and input_path.suffix.lower() == ".toml"  # overwrite = true?
        command = shlex.join(_resume_args(sys.argv[1:], from_file))
        if getattr(err, "nothing_saved", False):  # a new job that recorded nothing: as given
            command = shlex.join(["jobrunner", *sys.argv[1:]])
        if isinstance(err, StoppedNow):
            saved = (
                "stopped at once by a second signal; rows in saved parts are kept, the "
                "rows since the last part run again."
            )
        elif getattr(err, "nothing_saved", False):
            saved = "no row had finished."
        else:
            saved = "finished rows are saved."
        click.echo(f"jobrunner: interrupted by {err}; {saved}", err=True)
        click.echo(f"jobrunner: resume with: {command}", err=True)
        sys.exit(128 + err.signum)
    except click.ClickException:
        raise
    except Exception as err:  # a bug, or the machine's (out of memory): no row's fault
        reporter.close()
        traceback.print_exc()
        click.echo(
            f"jobrunner: stopped by an unexpected error ({type(err).__name__}: {err}); rows "
            "in saved parts are kept, the rows since the last part run again: fix it and run "
            "the same command again",
            err=True,
        )
        sys.exit(EXIT_FAULT)
    if not spec.quiet and result.summary and not result.nothing_to_do:
        s = result.summary
        click.echo(
            f"jobrunner: {s['rows_run']} rows in {s['seconds']:.1f}s "
            f"({s['rows_per_second']} rows/s, {s['generated_tokens_per_second']} tok/s), "
            f"padding {s['padding_fraction']:.1%}, errors {result.errors}",
            err=True,
        )
    # a hint, unless this run retried them or every error came from the rows themselves
    retry = "" if spec.retry_errors or not result.retry_may_help else f"; {RETRY_HINT}"
    if result.nothing_to_do:  # a finished job re-run is a no-op, whatever its rows hold
        if result.errors and not spec.quiet:
            note = f"; {result.retry_note}" if result.retry_note else retry
            holds = _count(result.errors, "error record")
            click.echo(f"jobrunner: the output holds {holds}{note}", err=True)
        sys.exit(EXIT_OK)
    if spec.quiet and result.errors:  # quiet shows a few row errors: say how many there are
        sharded = spec.shard is not None and spec.shard[1] > 1
        where = "this shard's saved rows" if sharded else "the output"
        click.echo(f"jobrunner: error records in {where}: {result.errors}{retry}", err=True)
    elif result.errors:
        click.echo(f"jobrunner: {_count(result.errors, 'error record')}{retry}", err=True)
    sys.exit(EXIT_ROW_ERRORS if result.errors else EXIT_OK)


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


RETRY_HINT = (
    "where the cause is outside the input (an image file missing or unreadable, a fault), fix "
    "it and --retry-errors runs only those rows again (a changed input or setting is another "
    "job); `jobrunner show OUTPUT --errors` lists them"
)


def _resume_args(args: list[str], overwrite_in_file: bool) -> list[str]:
    """The command that resumes a run started with ``args``: the same one without
    ``--overwrite``, plus ``--no-overwrite`` when the job file may set ``overwrite = true``;
    either would throw the saved rows away."""
    args = [a for a in args if a != "--overwrite"]
    return ["jobrunner", *args, *(["--no-overwrite"] if overwrite_in_file else [])]


def _build_spec(input_path: Path, flags: dict):
    from .spec import SpecError, build_spec, load_job_file

    cli = {
        "model": flags["model"],
        "output": flags["output"],
        "prompt": flags["prompt"],
        "id_column": flags["id_column"],
        "image_column": flags["image_column"],
        "prompt_column": flags["prompt_column"],
        "keep_columns": _split(flags["keep_columns"]),
        "max_tokens": flags["max_tokens"],
        "max_tokens_column": flags["max_tokens_column"],
        "temperature": flags["temperature"],
        "top_p": flags["top_p"],
        "top_k": flags["top_k"],
        "seed": flags["seed"],
        "batch_size": flags["batch_size"],
        "max_batch_tokens": flags["max_batch_tokens"],
        "num_crops": flags["num_crops"],
        "dtype": flags["dtype"],
        "quantize": None if flags["quantize"] is None else int(flags["quantize"]),
        "shard": flags["shard"],
        "image_root": flags["image_root"],
        "checkpoint_dir": flags["checkpoint_dir"],
        **_checkpoint_every(flags["checkpoint_every"]),
        "workers": flags["workers"],
        "sort_window": flags["sort_window"],
        "group_images": flags["group_images"],
        "max_image_pixels": flags["max_image_pixels"],
        "chat": flags["chat"],
        "overwrite": flags["overwrite"],
        "retry_errors": flags["retry_errors"],
        "quiet": flags["quiet"],
    }
    try:
        if input_path.suffix.lower() == ".toml":
            file_values = load_job_file(input_path)
        else:
            file_values = {"input": input_path.absolute()}
        for key in ("output", "checkpoint_dir"):
            if cli[key] is not None:
                cli[key] = cli[key].absolute()
        return build_spec(file_values, cli)
    except SpecError as err:
        raise _ConfigError(str(err)) from None


def _checkpoint_every(value: str | None) -> dict:
    """``500`` rows, ``30s``/``5m``/``1h`` time, or both comma-separated; the other bound keeps
    its default unless given."""
    if value is None:
        return {}
    out: dict = {}
    units = {"s": 1, "m": 60, "h": 3600}
    for part in (p.strip().lower() for p in value.split(",")):
        key = "checkpoint_every_seconds" if part and part[-1] in units else "checkpoint_every_rows"
        try:
            if key in out:  # "500,600": the later one would silently replace the first
                raise ValueError(part)
            if key == "checkpoint_every_seconds":
                out[key] = float(part[:-1]) * units[part[-1]]
            else:
                out[key] = int(part)
        except ValueError:
            raise click.BadParameter(
                f"expected rows (500), a time (30s, 5m) or both (500,30s), each at most once, "
                f"got {value!r}",
                param_hint="--checkpoint-every",
            ) from None
    return out


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


_JOB_ARGUMENT = click.argument("target", metavar="OUTPUT|JOB.toml", type=click.Path(path_type=Path))
_CHECKPOINT_DIR = click.option(
    "--checkpoint-dir",
    type=click.Path(path_type=Path),
    help="The job's checkpoint folder, if not OUTPUT.parts/ (a job file says it itself).",
)


def _job_paths(target: Path, checkpoint_dir: Path | None) -> tuple[Path, Path]:
    """The output file and checkpoint folder of a job named by its output or its job file."""
    from .spec import SpecError, default_parts_dir, job_file_paths, load_job_file

    if target.suffix.lower() == ".toml":
        try:
            output, parts = job_file_paths(load_job_file(target))
        except SpecError as err:
            raise _ConfigError(str(err)) from None
    else:
        output, parts = target, default_parts_dir(target)
    return output, checkpoint_dir or parts


def _no_job(what: str) -> _ConfigError:
    hint = "if the job sets checkpoint_dir, give its job file (JOB.toml) or --checkpoint-dir"
    return _ConfigError(f"{what}; {hint}")


@main.command()
@_JOB_ARGUMENT
@_CHECKPOINT_DIR
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(target: Path, checkpoint_dir: Path | None, as_json: bool) -> None:
    """Progress of a job (done or not), named by its OUTPUT file or its JOB.toml file."""
    from .checkpoint import CheckpointError
    from .merge import status as job_status

    output, parts = _job_paths(target, checkpoint_dir)
    if not parts.is_dir() and not output.exists():
        raise _no_job(f"no job found for {output} (no {parts}/ and no output file)")
    try:
        info = job_status(parts, output)
    except CheckpointError as err:
        raise _ConfigError(str(err)) from None
    if not info["exists"] and not info["complete"]:
        raise _no_job(
            f"no job found for {output}: no checkpoint in {parts}/, and "
            + (
                "the file is not an output that jobrunner wrote"
                if output.exists()
                else "no output file"
            )
        )
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(_format_status(output, info, _resume_hint(target, info)))


def _resume_hint(target: Path, info: dict) -> str:
    """How to resume an unfinished job: never with --overwrite, which would discard its rows;
    of a sharded job, with the shards still to run named (each is a command of its own)."""
    from .spec import SpecError, load_job_file

    if info.get("input_changed"):
        return "its input changed: --overwrite runs every row again"
    in_file = False
    if target.suffix.lower() == ".toml":
        try:
            in_file = bool(load_job_file(target).get("overwrite"))
        except SpecError:
            pass
    shards = info.get("shards", [])
    left = [shard for shard in shards if not shard["complete"]]
    named = ", ".join(
        f"--shard {shard['shard']}/{len(shards)} ({_shard_state(shard)})" for shard in left
    )
    if in_file:
        command = f"`jobrunner run {target} --no-overwrite`"
        if len(shards) > 1 and left:
            return f"run {command} once for each of {named}: the file sets overwrite"
        return f"resume with {command}: the file sets overwrite"
    flag = " with --no-overwrite" if info.get("started_with_overwrite") else ""
    if len(shards) > 1 and left:
        return f"run the job's command{flag} once for each of {named}"
    return f"run the same command{flag or ' again'} to resume"


def _format_status(output: Path, info: dict, resume: str = "") -> str:
    lines = [f"{output}: {_job_state(info, resume)}"]
    if change := info.get("input_changed"):
        lines.append(
            f"  the input changed since the job started ({change}): a run of it is refused; "
            "--overwrite runs every row again"
        )
    if info.get("output_replaced_by_merge") and not info.get("complete"):
        lines.append(
            "  the file at the output is the one this job found there as it began with "
            "--overwrite: it stays until the job's merge replaces it"
        )
    if info.get("exists"):
        lines.append("  " + _progress_line("all", info, info.get("total_rows")))
    for shard in info.get("shards", []):
        line = _progress_line(shard["name"], shard, shard["rows_total"])
        lines.append(f"  {line}, {_shard_state(shard)}")
    return "\n".join(lines)


def _shard_state(shard: dict) -> str:
    if shard["running"]:
        return "running"
    if shard["complete"]:
        return "complete"
    return "stopped" if shard["started"] else "not started"


def _job_state(info: dict, resume: str = "") -> str:
    if info.get("output_exists") and info.get("complete"):
        if info.get("output_is_this_jobs", True) and info.get("output_current", True):
            return "complete"
        if info.get("output_is_this_jobs", True):
            return (
                "every shard is done, but the output is older than the checkpoint (a retry "
                "stopped before its merge): the same command or `jobrunner merge` writes it again"
            )
        if info.get("output_replaced_by_merge"):
            return (
                "every shard is done, but the file at the output is still the one the job "
                "replaces (it began with --overwrite): `jobrunner merge` writes the job's (the "
                "job's command with --overwrite would run every row again)"
            )
        return (
            "every shard is done, but the file at the output is not this job's output; move "
            "it away or delete it, then `jobrunner merge` writes the job's"
        )
    if info.get("running"):
        return "running"
    if info.get("complete"):
        return "every shard is done; `jobrunner merge` writes the output"
    return f"unfinished, not running ({resume or 'run the same command again to resume'})"


def _progress_line(name: str, info: dict, total: int | None) -> str:
    text = f"{name}: {info['rows_done']}/{'?' if total is None else total} rows"
    text += f", {info['errors']} errors"
    if info.get("retrying"):
        text += f" (a retry of {info['retrying']} rows that were errors is under way)"
    if info.get("rows_per_second"):
        text += f", {info['rows_per_second']:.2f} rows/s"
    if info.get("eta_seconds") is not None:
        text += f", eta {info['eta_seconds']:.0f}s"
    return text


@main.command(name="merge")
@_JOB_ARGUMENT
@_CHECKPOINT_DIR
def merge_command(target: Path, checkpoint_dir: Path | None) -> None:
    """Join the parts of every (finished) shard of a job, named by its OUTPUT file or its
    JOB.toml file, into the output file."""
    from .checkpoint import CheckpointError
    from .merge import merge

    output, parts = _job_paths(target, checkpoint_dir)
    if not parts.is_dir():
        raise _no_job(f"nothing to merge for {output}: no checkpoint folder {parts}/")
    try:
        info = merge(parts, output)
    except CheckpointError as err:
        raise _ConfigError(str(err)) from None
    except OSError as err:  # a read-only folder, an unreadable part: the parts stay as they are
        where = f" ({err.filename})" if err.filename else ""
        raise _StorageFault(
            f"cannot merge into {output}: {err.strerror or err}{where}; "
            "fix it and run `jobrunner merge` again"
        ) from None
    from .runner import write_output_summary

    with contextlib.suppress(OSError):  # the output is written; a summary is a side note
        write_output_summary(output, parts, info.rows, info.errors)
    click.echo(f"wrote {info.path}: {info.rows} rows, {info.errors} errors")
    sys.exit(EXIT_ROW_ERRORS if info.errors else EXIT_OK)


@main.command()
@click.argument("output", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--limit", type=click.IntRange(0), default=20, show_default=True)
@click.option("--errors", "errors_only", is_flag=True, help="Only the error records.")
def show(output: Path, limit: int, errors_only: bool) -> None:
    """Print the first rows of a result file as a table: id, finish reason, generated tokens
    and the text (or the row's error)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .writers import error_rows

    columns = ["id", "finish_reason", "output_tokens", "output", "error"]
    wanted = f"a Parquet file with the columns {', '.join(columns)}"
    try:
        names = pq.read_schema(output).names
        missing = [name for name in columns if name not in names]
        if missing:
            raise _ConfigError(
                f"{output} is not a jobrunner result file ({wanted}): it has no "
                f"{', '.join(missing)} (its columns: {', '.join(names) or 'none'})"
            )
        total, kind = pq.read_metadata(output).num_rows, "rows"
        if errors_only:  # how many: from the finish reasons alone
            total, kind = error_rows(output), "error records"
        rows = []  # the first rows only, batch by batch: the outputs' text can be gigabytes
        with pq.ParquetFile(output) as parquet:
            for batch in parquet.iter_batches(batch_size=max(limit, 1024), columns=columns):
                if len(rows) >= min(limit, total):
                    break
                if errors_only:
                    batch = batch.filter(pc.equal(batch.column("finish_reason"), "error"))
                rows += batch.slice(0, limit - len(rows)).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise _ConfigError(f"{output} is not a jobrunner result file ({wanted}): {err}") from None
    if errors_only and not total:
        click.echo(f"{output}: no error records")
        return
    width = max([len(str(r["id"])) for r in rows] + [2])
    click.echo(f"{'id':<{width}}  {'finish':<6}  {'tokens':>6}  output")
    for r in rows:
        text = r["output"] if r["output"] is not None else f"ERROR: {r['error']}"
        tokens = "" if r["output_tokens"] is None else r["output_tokens"]
        click.echo(f"{str(r['id']):<{width}}  {r['finish_reason']:<6}  {tokens:>6}  {text}")
    if total > limit:
        click.echo(f"... {total - limit} more {kind}")


@main.command()
@click.option(
    "--preset",
    type=click.Choice(["tiny", "small", "phi3v"]),
    default="small",
    show_default=True,
    help="Model size: tiny (seconds), small (minutes on a CPU), phi3v (real Phi-3.5-V dims).",
)
@click.option("--rows", type=click.IntRange(1), help="Dataset rows (default: the preset's).")
@click.option(
    "--max-tokens",
    type=click.IntRange(1),
    help="New tokens per row (with --mixed-lengths, the most a row draws).",
)
@click.option("--batch-size", type=click.IntRange(1))
@click.option("--max-batch-tokens", type=click.IntRange(1))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option(
    "--modes",
    help="Comma-separated subset of naive,single,unsorted,sorted,fixed,pipeline, run in the "
    "order given (default: all in that order "
    "but fixed, which --mixed-lengths adds).",
)
@click.option("--naive-rows", type=click.IntRange(1), help="Rows for mode 1 (evenly spaced).")
@click.option("--single-rows", type=click.IntRange(1), help="Rows for mode 2 (evenly spaced).")
@click.option(
    "--feature-cache/--no-feature-cache",
    default=True,
    help="Modes 2-4b keep image features across batches, as `jobrunner run` does.",
)
@click.option(
    "--prefix-cache/--no-prefix-cache",
    default=True,
    help="Modes 2-4b keep prompt prefixes up to the image across batches, as `jobrunner run` does.",
)
@click.option("--row-prefill/--no-row-prefill", default=None, help="Modes 3-4b: prefill per row.")
@click.option(
    "--clear-cache/--keep-cache",
    default=False,
    help="Empty MLX's buffer cache after the warm-up and after each mode.",
)
@click.option(
    "--peer",
    is_flag=True,
    help="Then mode 6: mlx-vlm's batch_generate on the same model and rows (pip install mlx-vlm).",
)
@click.option(
    "--mixed-lengths",
    is_flag=True,
    help="Each row asks for its own number of tokens (1 to --max-tokens, drawn); adds mode 4b "
    "(fixed: sorted batches without rows joining them).",
)
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Rounds of the modes, every other one in reverse order; each mode reports its median "
    "round (for a machine whose speed drifts).",
)
@click.option("--workdir", type=click.Path(path_type=Path), help="Keep model and data here.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the numbers.")
def bench(json_path: Path | None, modes: str | None, **flags) -> None:
    """Throughput of five ways to run the same rows, side by side, on a random model and
    synthetic rows (with --mixed-lengths, rows that ask for outputs of different lengths, and
    mode 4b: fixed batches, which no row joins; with --peer, mlx-vlm's batch generation too)."""
    from .bench import BenchSettings, format_report, run_bench

    try:
        settings = BenchSettings(modes=_split(modes) or None, **flags).resolved()
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    report = run_bench(settings)
    click.echo(format_report(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
