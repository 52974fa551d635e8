"""The run loop: read rows → plan batches → preprocess (threads) → generate → write parts.

The planned rows run through one batch that they join as earlier rows finish (continuous
batching, ``model.generate.Decoder``); results are written as rows finish.

``run_job(spec)`` is the library entry point behind ``jobrunner run``. It validates the input and
the model up front (``ConfigError``: nothing was run), takes the job's lock, resumes from the
checkpoint, streams the rows this shard still owes, and writes results as durable parts. When the
shard is finished and every shard is complete, it merges the parts into the output file and writes
``OUTPUT.summary.json``.

Rows that cannot be served (unreadable image, bad prompt or text, a failure inside generation)
become error records; they never stop the job, and they count toward the checkpoint interval like
other rows. An unexpected exception while preparing a row (a bug, out of memory) stops the run
instead, so that it does not mark every row done as an error; so do generation failures of
``fault_limit`` rows in a row over at least ``FAULT_IMAGES`` images (``GenerationFault``; a
text-only row counts as an image of its own). The planner runs an image's prompts one after
another, and the rows of one to three images failing are theirs, however many prompts they have
(held until a row succeeds, at most ``FAILING_HELD`` at a time). So a fault of the machine that
shows only on a dataset of one to three images records their rows as errors. Images the storage
fails to read (``StorageError``: an I/O error, a share or mount gone) are held the same
way until an image is read, and as many of them stop the run (``StorageFault``). SIGINT/SIGTERM let
the rows in the batch finish (no row joins it after the signal), flush what is done and end with
``Interrupted``. An input file damaged partway
(a corrupt Parquet page) ends the run with ``BadInput`` (exit 2) after the rows read before the
damage are done and saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ._blas import single_threaded_numpy_blas
from .batching import JOIN_AT, PlanStats, joining, plan_batches
from .checkpoint import (
    MERGE_LOCK,
    CheckpointError,
    CheckpointStore,
    _manifest_lock,
    describe_changes,
    is_same_job,
    read_json,
    read_manifest,
    replaces_output,
    shard_rows,
)
from .merge import (
    IncompleteJob,
    all_shards_complete,
    merge,
    merged_output,
    output_error_rows,
    output_is_current,
    output_parts,
    rebuild_refusal,
    shard_errors,
    stopped_rebuild,
)
from .progress import Reporter
from .readers import (
    DuplicateIdTracker,
    ImageError,
    ImageRef,
    InputReadError,
    OverPixelLimit,
    ReaderConfigError,
    ReadOptions,
    Row,
    StorageError,
    allow_pixels,
    check_input,
    count_rows,
    image_size,
    iter_rows,
    kept_column_types,
    load_image,
    unforeseen,
)
from .spec import (
    JobSpec,
    comparable_fields,
    fingerprint,
    fingerprint_fields,
    input_change,
    input_identity,
)
from .writers import (
    ParquetOutputMetadata,
    PartWriter,
    collect_versions,
    error_rows,
    merged_metadata,
    remove_orphan_temps,
    write_summary,
)

PREFETCH_BATCHES = 2
DEFAULT_BATCH_TOKENS = 16384  # prompt slots per batch when memory allows and none is given
# Generation failing for fault_limit rows in a row over this many images is a fault of the
# machine, not of the rows (see the module docstring).
FAULT_IMAGES = 4
FAILING_HELD = 1024  # failing rows held undecided at most; then they are recorded
# What preparing a row raises for a bad row (image, prompt, text): its error record at once.
# Anything else but MemoryError (a bug met by one odd row, or a fault) is held as generation
# failures are: among successes the row's own error; many in a row stop the run, recording
# none, so the re-run after the fix does not skip them as done.
ROW_ERRORS = (ImageError, ValueError, OSError, UnicodeError)
_CHAT_TAGS = (
    "; the chat template puts the image tag before the prompt itself: take the <|image_N|> tags "
    "out of the prompt, or pass --no-chat to send prompts as they are"
)
_NO_CHAT_TAGS = (
    "; with --no-chat the prompt is sent as it is, so it must hold <|image_1|> where a row's "
    "image goes (and none in a text-only row)"
)
# Small model files that change outputs besides the weights: hashed whole for the fingerprint.
MODEL_FILES = (
    "config.json",
    "generation_config.json",  # stop ids
    "preprocessor_config.json",  # crops, normalisation
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
)


class ConfigError(Exception):
    """The job cannot start as configured (exit code 2); nothing was run."""


class BadInput(ConfigError):
    """The input turned out unreadable partway (exit code 2); the rows before it are saved."""


class InputChanged(BadInput):
    """The input changed while the job ran (exit code 2): the rows saved may not be the file's,
    so the job resumes no more (``CheckpointStore.mark_input_changed``)."""

    def __init__(self, path: Path, change: str):
        super().__init__(
            f"{path} changed while the job ran ({change}); the rows done so far are saved, but "
            "they may not be this file's: once it no longer changes, run the job again with "
            "--overwrite"
        )
        self.change = change


class GenerationFault(Exception):
    """Generation failed for many rows in a row: a fault of the model or the machine (out of
    memory, a broken backend), not of the rows. The run stops; the rows done are saved, the
    failed ones are not recorded, so the same command runs them again once it is fixed."""


class StorageFault(GenerationFault):
    """Reading images failed in the storage for many rows in a row (exit code 4)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: work done so far is durable; the job resumes with the same command."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StoppedNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the run stops where it is, as if killed (rows in durable parts
    are kept; those since the last part run again on resume). A ``KeyboardInterrupt``, so that
    no ``except Exception`` on the way takes it for a row's failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class RunResult:
    rows_total: int
    rows_done_before: int
    rows_run: int
    errors: int  # error records of this shard (earlier sessions' included), or of the output
    merged: bool
    summary: dict[str, Any] = field(default_factory=dict)
    nothing_to_do: bool = False
    retry_note: str | None = None  # why --retry-errors cannot run the errors from here
    # whether some error record may have its cause outside the input and settings (an image
    # file, the storage, a fault), so that --retry-errors could help: False only where every
    # error of the shard is this session's and came from the row itself
    retry_may_help: bool = True


def model_identity(model: str) -> tuple[Path, dict[str, Any]]:
    """Resolve the model and identify it cheaply for the fingerprint: its weights, the bytes of
    its small files (``MODEL_FILES``: config, stop ids, tokenizer, preprocessor), how the
    installed libraries encode a prompt with its tokenizer, and the defaults a spec may leave
    open (crops from preprocessor_config.json, the compute dtype)."""
    from model.loading import (
        ModelLoadError,
        default_dtype,
        encoding_probe,
        resolve_model_path,
        weights_identity,
    )

    try:
        model_dir = resolve_model_path(model)
        identity = {"model": model, "weights": weights_identity(model_dir)}
    except ModelLoadError as err:
        raise ConfigError(str(err)) from None
    files = _model_files(model_dir, model)
    identity["files"] = {
        name: hashlib.sha256(data).hexdigest()[:16] for name, data in files.items()
    }
    if "preprocessor_config.json" in files:
        preprocessor = _json_object(files, "preprocessor_config.json", model)
        identity["default_num_crops"] = preprocessor.get("num_crops")
    identity["default_dtype"] = default_dtype()
    if (encoding := encoding_probe(model_dir)) is not None:
        identity["prompt_encoding"] = encoding  # the libraries' reading of the tokenizer
    if "snapshots" in model_dir.parts:  # a hub cache snapshot: its folder is the revision
        identity["revision"] = model_dir.name
    return model_dir, identity


def _model_context(model_dir: Path) -> int | None:
    """The model's context (``max_position_embeddings``), None where its config does not say."""
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None  # the model's loading reports what is wrong with its config
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _model_files(model_dir: Path, model: str) -> dict[str, bytes]:
    """The bytes of each of ``MODEL_FILES`` the model has."""
    files = {}
    for name in MODEL_FILES:
        try:
            files[name] = (model_dir / name).read_bytes()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise ConfigError(f"cannot load model {model!r}: cannot read {name}: {err}") from None
    return files


def _json_object(files: dict[str, bytes], name: str, model: str) -> dict[str, Any]:
    try:
        value = json.loads(files[name])
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"cannot load model {model!r}: {name} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise ConfigError(f"cannot load model {model!r}: {name} holds a JSON {kind}, not an object")
    return value


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a flag checked between decode steps."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise StoppedNow(signum)
        self.signum = signum

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_job(spec: JobSpec, reporter: Reporter | None = None) -> RunResult:
    """Run (or resume) one job or shard.

    Raises:
        ConfigError: bad input or model; nothing was run.
        LockHeld: another run holds this shard's lock.
        FingerprintMismatch: the checkpoint belongs to another job.
        Interrupted: stopped by a signal after flushing finished rows.
    """
    reporter = reporter or Reporter(quiet=True)
    options = ReadOptions.from_spec(spec)
    allow_pixels(spec.max_image_pixels)
    try:
        check_input(spec.input, options)
        # identified before the rows are counted: a change after that is found at the end
        source = input_identity(spec.input)
        total = count_rows(spec.input)
    except ReaderConfigError as err:
        raise ConfigError(str(err)) from None
    model_dir, identity = model_identity(spec.model)
    _check_context(spec, model_dir)
    fields = fingerprint_fields(spec, identity, source)
    print_ = fingerprint(spec, identity, source)
    store = CheckpointStore(spec.parts_dir, spec.shard)
    retry = spec.retry_errors and not spec.overwrite  # --overwrite runs every row again anyway
    finished = not spec.overwrite and spec.output.exists()
    if finished:
        _check_output(spec, print_, fields)
    # its checkpoint folder removed, the output's own rows make the checkpoint again
    rebuild = retry and finished and _rebuilds_checkpoint(spec, print_, store.n, total)
    if retry and not rebuild and (refusal := _retry_refusal(spec, print_, fields, store.n, total)):
        raise ConfigError(refusal)
    if finished and not rebuild and _finished_before(spec, print_, fields, store.n):
        reporter.event(f"nothing to do: {spec.output} is this job's finished output")
        owed = shard_rows(total, store.k, store.n)
        errors = output_error_rows(spec.output)
        mend_finished_output(spec.output, spec.parts_dir)
        note = _retry_refusal(spec, print_, fields, store.n, total) if errors else None
        return RunResult(total, owed, 0, errors, True, nothing_to_do=True, retry_note=note)
    if (
        not (finished and output_is_current(spec.parts_dir, spec.output))
        and not spec.overwrite
        and _done_in_another_split(spec, print_, fields, store.n)
    ):
        info = merge(spec.parts_dir, spec.output, total)  # as `jobrunner merge` would
        mend_finished_output(spec.output, spec.parts_dir)
        reporter.event(f"nothing to run: every shard of this job is done; wrote {spec.output}")
        owed = shard_rows(total, store.k, store.n)
        return RunResult(total, owed, 0, info.errors, True, nothing_to_do=True)
    # Signals are caught from here on, so one that arrives while the model loads still ends the
    # run with Interrupted (exit 130/143 and the resume command) instead of killing it.
    with _StopFlag() as stop, store.lock():
        # with --overwrite, the old output stays until the new merge replaces it (its manifest
        # records which file that is: ``replaces_output``)
        made_with = collect_versions()
        info = store.open_or_create(
            spec.to_dict(),
            print_,
            fields,
            spec.overwrite,
            total,
            comparable_fields,
            spec.output,
            made_with,
        )
        for note in info.cleaned:
            reporter.event(f"checkpoint: {note}")
        if info.resumed and (changes := _version_changes(info.made_with, made_with)):
            reporter.warning(
                f"this job's saved rows were made with {changes[0]}; this run has {changes[1]}: "
                "the rows it makes may differ from theirs in the last digits (--overwrite makes "
                "every row again with this one)"
            )
        owed = shard_rows(total, store.k, store.n)
        if rebuild and not store.parts:
            _rebuild_checkpoint(spec, store, total, reporter)
        retried = store.drop_errors(_waiting_for_merge(reporter, stop)) if retry else 0
        # the output merged from this checkpoint (not the old one an --overwrite run replaces)
        merged = info.complete and _merged_by_checkpoint(spec)
        if retried:
            reporter.event(
                f"retrying {retried} error rows; {store.rows_done} of {owed} rows stay done"
            )
        elif merged and output_is_current(spec.parts_dir, spec.output):
            note = ""
            if retry and store.n > 1 and sum(counts := shard_errors(spec.parts_dir)):
                note = f"; this shard holds no error rows, {_shards_with_errors(counts)} do"
            reporter.event(f"nothing to do: {spec.output} is complete ({total} rows){note}")
            errors = output_error_rows(spec.output)  # the output's, as the message says
            mend_finished_output(spec.output, spec.parts_dir)
            return RunResult(total, info.rows_done, 0, errors, True, nothing_to_do=True)
        elif merged and not all_shards_complete(spec.parts_dir):  # another shard is retrying
            reporter.event(
                f"nothing to do: this shard is complete; {spec.output} is merged again when "
                "every shard is"
            )
            errors = output_error_rows(spec.output)
            return RunResult(total, info.rows_done, 0, errors, False, nothing_to_do=True)
        elif merged:  # a retry stopped before its merge
            reporter.event(f"{spec.output} is older than its checkpoint: merging it again")
        elif info.rows_done:
            reporter.event(f"resuming: {info.rows_done} of {owed} rows already done")
        session = _Session(spec, store, reporter, owed, store.rows_done, total)
        try:
            if store.rows_done < owed:
                session.run(model_dir, stop)
            _check_unchanged(spec.input, source)
        except (Exception, StoppedNow) as err:
            # the model did not load, a signal came first, the machine failed: a new job that
            # recorded nothing leaves nothing, so a corrected command (a lower precision, say)
            # is not refused as another job
            abandoned = False
            with contextlib.suppress(OSError):
                abandoned = store.abandon_new()
            # nothing of the job is left: the same command (--overwrite and all) starts it again
            err.nothing_saved = abandoned
            if not abandoned:  # rows saved: if the input changed, they may not be the file's
                is_change = isinstance(err, InputChanged)
                change = err.change if is_change else _changed_quietly(spec.input, source)
                if change:
                    with contextlib.suppress(OSError):  # the stop's own error is the one to tell
                        store.mark_input_changed(change)
                    err.input_changed = change  # the resume advice no longer holds (cli)
            raise
        store.mark_complete(total)
        try:
            return session.finish(total, identity, stop)
        except OSError as err:  # the merge (a full disk, the old output not replaceable)
            err.nothing_saved = False  # every row is saved: resuming only merges
            raise


class _Session:
    """One run of the loop over the rows this shard still owes."""

    def __init__(self, spec, store, reporter, owed, done_before, total):
        self.spec, self.store, self.reporter = spec, store, reporter
        self.owed, self.done_before, self.total = owed, done_before, total
        self.writer = PartWriter(
            store,
            spec.keep_columns,
            every_rows=spec.checkpoint_every_rows or None,
            every_seconds=spec.checkpoint_every_seconds or None,
            # Parquet input: from the input's schema, so no part's rows decide a column's type
            kept_types=kept_column_types(spec.input, spec.keep_columns),
        )
        self.stats = PlanStats()
        # the planner's budget once the model is in, and the KV positions memory held it to
        self.batch_tokens, self.kv_limit = spec.max_batch_tokens, None
        self.row_kv_limit: int | None = None  # KV positions one row may hold (memory)
        self.ids = DuplicateIdTracker()
        self.rows: dict[int, Row] = {}
        self.rows_run = self.errors = self.generated = self.prompt_tokens = 0
        self.errors_outside = 0  # of them, errors whose cause may be outside the input
        self.started = time.monotonic()
        self.model_seconds = 0.0
        self.feature_cache = self.prefix_cache = None  # made with the model
        self.read_error: InputReadError | InputChanged | None = None
        # generation failures since the last success: recorded as row errors once a row
        # succeeds (or the run ends); enough of them, over enough images, stop the run
        self.failing: list[tuple[Row, str, int]] = []
        self.fault_limit = max(16, 2 * spec.batch_size)
        # rows whose image the storage failed to read (StorageError), since an image was read:
        # recorded as errors once one is read, and enough of them stop the run the same way
        self.unread: list[tuple[Row, str]] = []
        self.images_read = 0
        # the shard's rows, for the column warnings
        self.rows_read = self.rows_with_image = self.rows_with_limit = 0
        # rows whose image is null (and no error) in a shard where other rows have one: the
        # first ids
        self.rows_with_null_image = 0
        self.ids_with_null_image: list[str] = []
        self.columns_seen: set[str] = set()  # of the id and kept columns (``Row.columns_given``)
        # memory's bound on a batch: fits(rows, longest, room)
        self.fits: Callable[[int, int, int | None], bool] | None = None
        self.running: dict[int, tuple[Row, Any]] = {}  # the rows in the batch, by index
        # rows whose prefill failed as they joined a running batch: alone once it is done
        self.alone: list[tuple[Row, Any]] = []
        self.joined = 0  # rows that joined a batch while other rows ran

    # -- the loop -------------------------------------------------------------------------------

    def run(self, model_dir: Path, stop: _StopFlag) -> None:
        from model.cache import ImageFeatureCache, PrefixCache
        from model.generate import (
            GenerationParams,
            activation_dtype,
            device_memory_bytes,
            weight_bytes,
        )
        from model.loading import load

        spec = self.spec
        try:
            self.model, self.processor = load(
                str(model_dir), spec.dtype, spec.quantize, spec.num_crops
            )
            self.params = GenerationParams(
                max_tokens=spec.max_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                top_k=spec.top_k,
            )
        except Exception as err:  # a model that does not load is a configuration error
            raise ConfigError(f"cannot load model {spec.model!r}: {err}") from None
        quantized = getattr(self.model, "quantized_on_cpu", None)
        dtype = str(activation_dtype(self.model)).rsplit(".", 1)[-1]
        if quantized == "expanded":
            self.reporter.event(
                f"the model's quantized layers run as {dtype} weights on the CPU, where MLX's "
                f"quantized matmul is many times slower: memory as for {dtype}, outputs those "
                "of the quantized weights"
            )
        elif quantized == "kept":
            self.reporter.warning(
                f"the model's quantized layers stay quantized, as {dtype} weights would not fit "
                "in memory; on the CPU MLX's quantized matmul is many times slower than float32 "
                "(14x on the bench's small model, more for long prompts)"
            )
        if dtype != "float32" and _on_cpu():
            self.reporter.warning(
                f"--dtype {dtype} on the CPU: MLX's CPU kernels run it many times slower than "
                "float32 (8 rows of the bench's small model: 46 s in bfloat16, 61 s in float16, "
                "3.1-3.6 s in float32); it halves the weights' memory, at that cost"
            )
        self.feature_cache = ImageFeatureCache()  # rows sharing an image encode it once
        # ... and prefill the prompt up to it once
        memory = device_memory_bytes()
        self.prefix_cache = PrefixCache.for_memory(memory, weight_bytes(self.model))
        if stop.signum is not None:  # stopped while the model loaded: nothing to flush
            raise Interrupted(stop.signum)
        self.reporter.start(self.owed, self.done_before)
        self.fits = self._memory_fits(memory)
        single_threaded_numpy_blas()
        with ThreadPoolExecutor(max(1, spec.workers)) as pool:
            batches = plan_batches(
                self._estimates(stop),
                spec.batch_size,
                self.batch_tokens,
                spec.sort_window,
                self.fits,
            )
            queue: deque[list[tuple[Row, Future]]] = deque()
            planned = _chain(batches, queue, lambda b: self._submit(pool, b))
            try:
                try:
                    self._decode(planned, stop)
                except GenerationFault as fault:
                    self._stop(queue, fault)
                if stop.signum is not None:
                    self._stop(queue, Interrupted(stop.signum))
                if isinstance(self.read_error, InputChanged):
                    self._stop(queue, self.read_error)
                if self.read_error is not None:  # every row read before the damage is done
                    self._stop(queue, BadInput(f"{self.read_error}; {_SAVED}"))
            except StoppedNow:  # at once (even inside _stop's flush): the pool's exit need
                for pending in queue:  # not prepare the rows queued
                    for _, future in pending:
                        future.cancel()
                raise
        self._record_failures()  # fewer than fault_limit at the end: the rows' own
        self._end_unread()
        self.writer.flush()
        self.reporter.close()
        if warning := self.ids.warning():
            self.reporter.warning(warning)
        for warning in self._column_warnings():
            self.reporter.warning(warning)

    def _memory_fits(self, memory: int | None) -> Callable[[int, int, int | None], bool] | None:
        """Without a budget of the user's: the default budget, and the planner's bound that
        keeps each batch's KV cache within memory (``None`` where memory is unknown)."""
        from model.generate import (
            kv_bytes_per_token,
            kv_positions,
            memory_kv_positions,
            static_shapes,
        )

        spec = self.spec
        caches = self.prefix_cache.max_bytes + self.feature_cache.max_bytes
        if memory:  # what one row alone may hold, whoever sets the budget (``_estimate``):
            # all the memory beside the model and its caches, not the batches' half
            self.row_kv_limit = memory_kv_positions(self.model, memory, caches, fraction=1.0)
        if self.batch_tokens is not None:
            return None
        self.batch_tokens = DEFAULT_BATCH_TOKENS
        if not memory:
            return None
        limit = self.kv_limit = memory_kv_positions(self.model, memory, caches)
        static = static_shapes(self.params)

        def fits(rows: int, longest: int, room: int | None = None) -> bool:
            """Whether ``rows`` rows padded to ``longest`` positions, with room for ``room``
            more tokens (default: ``max_tokens``), fit in the KV budget."""
            room = spec.max_tokens if room is None else room
            return rows * kv_positions(longest, room, static) <= limit

        if not fits(spec.batch_size, self.batch_tokens // spec.batch_size):
            gib = limit * kv_bytes_per_token(self.model) / 2**30
            self.reporter.event(  # a full batch of the default budget would not fit
                f"batches keep their KV cache within {limit} positions ({gib:.1f} GiB), so that "
                "it fits in memory beside the model and its caches: fewer rows per batch where "
                "prompts are long; --max-batch-tokens sets a budget of your own instead"
            )
        return fits

    def _column_warnings(self) -> list[str]:
        """Columns named but with a value in no row: misspelt names, most likely, which JSONL
        rows cannot reveal (a row may leave any column out). The image column (every row then
        ran text only), an --id-column other than the default, kept columns, and the limit
        column (every row then took --max-tokens)."""
        spec = self.spec
        if not self.rows_read:
            return []
        warnings = []
        if self.rows_with_null_image and not self.rows_with_image:
            # the column is there (a Parquet one of nulls only), so its name is not the cause
            warnings.append(
                f"warning: every row's image (column '{spec.image_column}') was null, so every "
                "row ran as text only; where rows should have images, give them some"
            )
        elif spec.image_column != ReadOptions.image_column and not self.rows_with_image:
            warnings.append(
                f"warning: no row had an image in column '{spec.image_column}' (from "
                "--image-column / image_column); every row ran as text only. Check the column "
                "name."
            )
        if self.rows_with_image and self.rows_with_null_image:
            warnings.append(self._text_only_warning())
        unseen = []
        if spec.id_column != ReadOptions.id_column and spec.id_column not in self.columns_seen:
            unseen.append((spec.id_column, "--id-column / id_column", "ids are row numbers"))
        for column in spec.keep_columns:
            if column not in self.columns_seen:
                what = "its output column is all null"
                unseen.append((column, "--keep-columns / keep_columns", what))
        warnings += [
            f"warning: no row had a value in column '{column}' (from {flag}), so {what}. Check "
            "the column name."
            for column, flag, what in unseen
        ]
        if spec.max_tokens_column is not None and not self.rows_with_limit:
            warnings.append(
                f"warning: no row had a value in column '{spec.max_tokens_column}' (from "
                f"--max-tokens-column / max_tokens_column), so every row took --max-tokens "
                f"{spec.max_tokens}; if rows were meant to have limits, check the column's name."
            )
        return warnings

    def _text_only_warning(self) -> str:
        """Some rows had an image and others a null one: a missing image (how a Hugging Face
        image column stores one) runs text only, and the model answers a prompt about a
        picture it never saw. A JSONL row that leaves the column out says it has none."""
        count, ids = self.rows_with_null_image, self.ids_with_null_image
        named = ", ".join(repr(row_id) for row_id in ids) + (", ..." if count > len(ids) else "")
        return (
            f"warning: {count} of {self.rows_read} rows had a null image (column "
            f"'{self.spec.image_column}') and ran as text only (ids {named}); where a row "
            "should have an image, give it one: its output answers without one"
        )

    def _stop(self, queue: deque, reason: Exception) -> None:
        """Save what is done, drop the batches not started, and end the run with ``reason``."""
        self.writer.flush()
        self.reporter.close()
        for pending in queue:
            for _, future in pending:
                future.cancel()
        raise reason

    def _estimates(self, stop: _StopFlag) -> Iterator[tuple[int, int, Hashable | None, int]]:
        """(index, prompt length, image key, most tokens it may generate) of each runnable row;
        failed rows become error records. The planner keeps rows with one image key together
        (``image_key``).

        Ends early on a signal, or when the input turns out damaged (``read_error``), so the
        rows read so far are finished first. Error records are checkpointed here on the usual
        schedule: a long run of bad rows yields nothing for the planner to batch.
        """
        from model.generate import token_limit

        rows = iter_rows(self.spec.input, ReadOptions.from_spec(self.spec), self.spec.owns_row)
        while stop.signum is None:
            try:
                row = next(rows, None)
            except InputReadError as err:
                self.read_error = err
                return
            if row is None:
                return
            if row.index >= self.total:  # rows appended since they were counted
                change = f"more rows than the {self.total} counted at the start"
                self.read_error = InputChanged(self.spec.input, change)
                return
            self.ids.add(row.id)
            self.rows_read += 1  # done in an earlier session or not: the whole shard counts
            self.rows_with_image += row.image is not None
            if row.image_null and row.error is None:
                self.rows_with_null_image += 1
                if len(self.ids_with_null_image) < 3:
                    self.ids_with_null_image.append(row.id)
            self.rows_with_limit += row.limit_given
            self.columns_seen |= row.columns_given
            if self.store.is_done(row.index):
                continue
            limit = token_limit(row.max_tokens, self.spec.max_tokens)
            try:
                length, problem, outside = self._estimate(row, limit)
            except StorageError as err:
                self._unreadable(row, str(err))
                self.writer.maybe_flush()  # a retried row is an error record at once
                continue
            if problem is not None:
                self._error(row, problem, outside=outside)
                self.writer.maybe_flush()
                continue
            self.rows[row.index] = row
            key = image_key(row.image) if self.spec.group_images else None
            yield row.index, length, key, limit

    def _estimate(self, row: Row, limit: int) -> tuple[int, str | None, bool]:
        """(prompt length, None, False), or (0, what is wrong with the row, whether the cause
        may be outside the input: ``_outside_input``): among that, a prompt that with ``limit``
        new tokens would not fit in the model's context, or whose KV cache alone would not fit
        in memory (allocating it could kill the process)."""
        from model.generate import kv_bytes_per_token, kv_positions, static_shapes
        from model.processing import ImageTagError

        if row.error:
            return 0, row.error, False
        try:
            size = image_size(row.image, self.spec.max_image_pixels) if row.image else None
        except StorageError:
            raise  # not the row's: _estimates holds it
        except ROW_ERRORS as err:
            return 0, str(err), _outside_input(row, err)
        if size is not None and row.image.data is None:  # a file read: the storage works
            self._image_read()
        try:
            length = self.processor.estimate_tokens(row.prompt, size, chat=self.spec.chat)
        except ImageTagError as err:
            if not self.spec.chat:
                return 0, f"{err}{_NO_CHAT_TAGS}", False
            hint = (
                _CHAT_TAGS
                if row.image
                else "; this row has no image: take the tag out of the prompt"
            )
            return 0, f"{err}{hint}", False
        except ROW_ERRORS as err:
            return 0, str(err), False
        context = self.model.config.max_position_embeddings
        if length + limit > context:
            return (
                0,
                (
                    f"the prompt ({length} tokens) and up to {limit} new tokens exceed the model's "
                    f"context of {context} positions; shorten the prompt or lower --max-tokens"
                ),
                False,
            )
        needed = kv_positions(length, limit, static_shapes(self.params))
        if self.row_kv_limit is not None and needed > self.row_kv_limit:
            gib = kv_bytes_per_token(self.model) / 2**30
            return (
                0,
                (
                    f"the prompt ({length} tokens) and up to {limit} new tokens need a KV cache of "
                    f"{needed} positions ({needed * gib:.1f} GiB), more than the "
                    f"{self.row_kv_limit} ({self.row_kv_limit * gib:.1f} GiB) that fit in this "
                    "machine's memory beside the model; lower --max-tokens or this row's limit, "
                    "or shorten the prompt"
                ),
                False,
            )
        return length, None, False

    def _submit(self, pool: ThreadPoolExecutor, batch: list[int]) -> list[tuple[Row, Future]]:
        rows = [self.rows.pop(index) for index in batch]
        return [(row, pool.submit(self._prepare, row)) for row in rows]

    def _prepare(self, row: Row):
        image = load_image(row.image, self.spec.max_image_pixels) if row.image else None
        prepared = self.processor.prepare(row.prompt, image, chat=self.spec.chat)
        prepared.max_tokens = row.max_tokens
        return prepared

    def _decode(self, planned: Iterator[list[tuple[Row, Future]]], stop: _StopFlag) -> None:
        """Run the planned rows through one batch that rows join as others finish.

        When a quarter of the batch's slots are free, the next planned rows take them (as many as
        the batch budget and memory allow): rows that stop early do not leave their slots idle
        until the longest row of their batch is done. If the prefill of joining rows fails, no
        row joins until the batch is done (it may be short of memory); then those rows run one
        by one. After a signal no row joins; the rows in the batch finish, then the run stops.
        """
        from model.generate import Decoder

        decoder = Decoder(
            self.model, self.processor, self.params, self.feature_cache, self.prefix_cache
        )
        slots = self.spec.batch_size
        waiting: deque[tuple[Row, Any]] = deque()  # prepared rows not yet in the batch
        more = True
        while True:
            while self.alone and not decoder.active and stop.signum is None:
                # rows whose prefill failed as they joined: alone, now that the batch is done
                self._isolate(decoder, [self.alone.pop(0)], batch=False)
            free = slots - decoder.active
            joins = stop.signum is None and not self.alone
            if joins and (free >= JOIN_AT * slots or not decoder.active):
                while more and len(waiting) < free:
                    batch = next(planned, None)
                    more = batch is not None
                    waiting.extend(self._ready(batch or []))
                    self.writer.maybe_flush()  # batches whose rows all failed: keep the interval
                take = self._joining(decoder, waiting, free)
                if take:
                    self._admit(decoder, [waiting.popleft() for _ in range(take)])
            if decoder.active:
                # with rows to come, finished rows leave the batch as rows join it (one
                # rebuild of the cache, not two), or before the step when none could join (a
                # join just made leaves none behind)
                joins = stop.signum is None and not self.alone  # as _admit left it
                coming = joins and (more or waiting)
                self._step(decoder, drop=not coming, drop_first=coming and decoder.crowded)
            elif stop.signum is not None or not (more or waiting or self.alone):
                return
            self.writer.maybe_flush()

    def _ready(self, batch: list[tuple[Row, Future]]) -> list[tuple[Row, Any]]:
        """The batch's prepared rows; rows that could not be prepared become error records."""
        ready = []
        for row, future in batch:
            try:
                prepared = future.result()
            except StorageError as err:
                self._unreadable(row, str(err))
            except ROW_ERRORS as err:
                self._error(row, str(err), outside=_outside_input(row, err))
            except MemoryError:  # the machine's: the run stops (exit 4)
                raise
            except Exception as err:  # noqa: BLE001 - unforeseen: the row's, or many a fault
                self._failed(row, f"preparing the row failed: {unforeseen(err)}", 0)
            else:
                ready.append((row, prepared))
                if row.image is not None and row.image.data is None:  # a file read
                    self._image_read()
        if ready:
            self.stats.add([len(prepared.input_ids) for _, prepared in ready])
        if len(ready) < len(batch):
            self.reporter.update(self.rows_run, self.generated, self.errors)
        return ready

    def _joining(self, decoder, waiting: deque, free: int) -> int:
        """How many of the first waiting rows join the batch: at most ``free``, with the rows
        still running within the batch budget and memory (``batching.joining``; their KV cache
        counts each row padded to the longest row, generated tokens included, with room for the
        most tokens any row may still generate)."""
        rows = [prepared for _, prepared in list(waiting)[:free]]
        return rows_joining(decoder, rows, self.batch_tokens, self.fits)

    def _admit(self, decoder, items: list[tuple[Row, Any]]) -> None:
        """Prefill ``items`` and add them to the batch. If their prefill fails while rows run,
        they run one by one once the batch is done (it may have been short of memory); if
        joining the batch fails, all its rows run one by one."""
        from model.generate import row_seed

        started = time.monotonic()
        tagged = [
            (row.index, prepared, row_seed(self.spec.seed, row.id)) for row, prepared in items
        ]
        running, failed = decoder.active, None
        try:
            prefilled = decoder.prefill(tagged)
        except Exception:  # noqa: BLE001 - the rows' fault or the machine's: isolated below
            failed = "prefill"
        else:
            try:
                decoder.join(prefilled)
            except Exception:  # noqa: BLE001 - isolated below
                failed = "join"
            del prefilled
        # isolated outside the handlers: their tracebacks would keep the failed batch alive
        if failed == "prefill" and running:
            self.alone.extend(items)
            self.reporter.event(
                f"prefill failed for {len(items)} rows joining the batch; they run one by one "
                "once the batch is done, and no row joins it until then"
            )
        elif failed:
            self._isolate(decoder, items, batch=failed == "join")
        else:
            self.running.update((row.index, (row, prepared)) for row, prepared in items)
            self.joined += len(items) if running else 0
        self.model_seconds += time.monotonic() - started

    def _step(self, decoder, drop: bool = True, drop_first: bool = False) -> None:
        started = time.monotonic()
        done, failed = [], False
        try:
            if drop_first:
                decoder.drop()
            done = decoder.step(drop)
        except Exception:  # noqa: BLE001 - isolated below
            failed = True
        if failed:  # outside the handler: its traceback would keep the failed batch alive
            self._isolate(decoder, [])
        self.model_seconds += time.monotonic() - started
        for tag, result in done:
            row, prepared = self.running.pop(tag)
            self._outcome(row, prepared, result)
        if done:
            self.reporter.update(self.rows_run, self.generated, self.errors)

    def _isolate(self, decoder, items: list[tuple[Row, Any]], batch: bool = True) -> None:
        """Generation failed: ``items`` (and with ``batch``, the rows in the batch, which is
        then emptied) run one by one."""
        pending = list(items)
        if batch:
            pending[:0] = self.running.values()
            self.running.clear()
            decoder.clear()
        for row, prepared in pending:
            self._outcome(row, prepared, self._generate([(row, prepared)])[0])
            self.writer.maybe_flush()  # a batch's rows alone can take long: keep the interval
        self.reporter.update(self.rows_run, self.generated, self.errors)

    def _outcome(self, row: Row, prepared, result) -> None:
        """Record a row's result; hold a generation failure (error text) until it is clear
        whether it is the row's or the machine's."""
        if isinstance(result, str):
            self._failed(row, result, len(prepared.input_ids))
        else:
            self._record_failures()
            self._result(row, result)

    def _failed(self, row: Row, message: str, prompt_tokens: int) -> None:
        """A row failed in generation, or in preparation in a way no check foresaw: held
        until a success shows it the row's own; many in a row over enough images stop the run
        as a fault of the model or machine (or of jobrunner), recording none of them."""
        if row.index in self.store.retried:  # an error record before: one again
            self._error(row, message, prompt_tokens=prompt_tokens, outside=True)
            return
        self.failing.append((row, message, prompt_tokens))
        images = self._failing_images()
        if len(self.failing) >= self.fault_limit and images >= FAULT_IMAGES:
            what = "generation" if message.startswith("generation") else "preparing rows"
            raise GenerationFault(
                f"{what} failed for {len(self.failing)} rows in a row, over "
                f"{images} images or text rows, the last with "
                f"{message}; stopped without recording them as errors, since this looks "
                "like a fault of the model or machine: fix it and run the same command "
                "again (finished rows are saved)"
            )
        if len(self.failing) >= FAILING_HELD:  # a few images' many prompts: theirs
            self._record_failures()

    def _generate(self, ready: list) -> list:
        """Results of a batch; if the batch fails, each row alone, failures as error text."""
        from model.generate import generate_batch, row_seed

        rows = [prepared for _, prepared in ready]
        try:
            seeds = [row_seed(self.spec.seed, row.id) for row, _ in ready]
            return generate_batch(
                self.model,
                self.processor,
                rows,
                self.params,
                seeds,
                self.feature_cache,
                self.prefix_cache,
            )
        except Exception:  # noqa: BLE001 - isolate the failing row below
            if len(ready) == 1:
                return [f"generation failed: {_describe(sys.exc_info()[1])}"]
        return [self._generate([item])[0] for item in ready]

    # -- records --------------------------------------------------------------------------------

    def _record_failures(self) -> None:
        """Generation failures of rows among successes are the rows' own: record them."""
        for row, message, prompt_tokens in self.failing:
            self._error(row, message, prompt_tokens=prompt_tokens, outside=True)
        self.failing = []

    def _image_read(self) -> None:
        self.images_read += 1
        self._record_unread()

    def _end_unread(self) -> None:
        """Rows still held at the end of the run are their own errors, unless the storage
        read no image in the whole run (a small job, or a share gone from the start): then
        as many images as ``FAULT_IMAGES`` are the storage's fault."""
        images = _images_among([row for row, _ in self.unread])
        if not self.images_read and images >= FAULT_IMAGES:
            self.writer.flush()
            self.reporter.close()
            raise StorageFault(
                f"reading images failed for every one of the {images} images of this run, "
                f"the last with: {self.unread[-1][1]}; stopped without recording them as "
                "errors, since this looks like a fault of the storage: fix it and run the same "
                "command again (finished rows are saved)"
            )
        self._record_unread()

    def _unreadable(self, row: Row, message: str) -> None:
        """The storage failed to read the row's image: held until an image is read (then the
        row's error), or, for ``fault_limit`` rows in a row over ``FAULT_IMAGES`` images, a
        fault of the storage that stops the run without recording them. A row retried
        (``--retry-errors``) is an error record again at once, as it was: a retry that runs
        to its end leaves a finished job finished, whatever the storage does."""
        if row.index in self.store.retried:
            self._error(row, message, outside=True)
            return
        self.unread.append((row, message))
        images = _images_among([row for row, _ in self.unread])
        if len(self.unread) >= self.fault_limit and images >= FAULT_IMAGES:
            raise StorageFault(
                f"reading images failed for {len(self.unread)} rows in a row, over {images} "
                f"images, the last with: {message}; stopped without recording them as errors, "
                "since this looks like a fault of the storage (a disk, or a share that went "
                "away): fix it and run the same command again (finished rows are saved)"
            )
        if len(self.unread) >= FAILING_HELD:
            self._record_unread()

    def _record_unread(self) -> None:
        """Images read again (or the run's end): the held rows' failures are their own."""
        for row, message in self.unread:
            self._error(row, message, outside=True)
        self.unread = []

    def _failing_images(self) -> int:
        return _images_among([row for row, _, _ in self.failing])

    def _result(self, row: Row, result) -> None:
        self.writer.add(
            {
                "index": row.index,
                "id": row.id,
                "output": result.text,
                "finish_reason": result.finish_reason,
                "error": None,
                "prompt_tokens": result.prompt_tokens,
                "output_tokens": result.output_tokens,
                "extra": row.extra,
            }
        )
        self.rows_run += 1
        self.generated += result.output_tokens
        self.prompt_tokens += result.prompt_tokens

    def _error(self, row: Row, message: str, prompt_tokens: int = 0, outside: bool = False) -> None:
        """Record the row as an error record; ``outside``: its cause may be outside the input
        and settings (``RunResult.retry_may_help``)."""
        self.errors_outside += outside
        self.writer.add(
            {
                "index": row.index,
                "id": row.id,
                "output": None,
                "finish_reason": "error",
                "error": message,
                "prompt_tokens": prompt_tokens,
                "output_tokens": 0,
                "extra": row.extra,
            }
        )
        self.rows_run += 1
        self.errors += 1
        self.reporter.event(f"row {row.index} ({row.id}): {message}", error=True)

    # -- the end --------------------------------------------------------------------------------

    def finish(
        self, total: int, identity: dict[str, Any], stop: _StopFlag | None = None
    ) -> RunResult:
        spec, store = self.spec, self.store
        summary = self.summary()
        merged = False
        try:
            metadata = ParquetOutputMetadata(
                spec=spec.to_dict(),
                fingerprint="",
                model_id=spec.model,
                model_revision=identity.get("revision") or identity.get("weights"),
            ).to_dict()
            for key in ("fingerprint", "fingerprint_fields"):  # merge takes them from the manifest
                metadata.pop(key)
            waiting = _waiting_for_merge(self.reporter, stop) if stop is not None else None
            info = merge(spec.parts_dir, spec.output, total, metadata=metadata, waiting=waiting)
            merged = True
            # the rows of the whole output; the rest is this session's (of shard ``shard``)
            summary |= write_output_summary(
                spec.output, spec.parts_dir, info.rows, info.errors, summary
            )
            self.reporter.event(f"wrote {spec.output} ({info.rows} rows, {info.errors} errors)")
        except IncompleteJob as err:  # other shards still running: the last one merges
            self.reporter.event(f"shard done; not merged yet: {err}")
        # The shard's own error records, earlier sessions' included (the whole output's when
        # the job is not sharded): a shard that finishes last and merges reports its rows, not
        # the other shards' (the merge line above gives the output's).
        errors = store.errors
        # earlier sessions' error records: of causes this one cannot tell
        may_help = self.errors_outside > 0 or errors > self.errors
        return RunResult(
            total, self.done_before, self.rows_run, errors, merged, summary, retry_may_help=may_help
        )

    def summary(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "rows_total": self.owed,
            "shard": None if self.spec.shard is None else "/".join(map(str, self.spec.shard)),
            "rows_done_before": self.done_before,
            "rows_run": self.rows_run,
            "rows_ok": self.rows_run - self.errors,
            "rows_error": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated,
            "seconds": round(seconds, 3),
            "model_seconds": round(self.model_seconds, 3),
            "rows_per_second": round(self.rows_run / seconds, 3) if seconds else None,
            "generated_tokens_per_second": round(self.generated / seconds, 3) if seconds else None,
            "padding_fraction": round(self.stats.padding_fraction, 4),
            "batches": self.stats.batches,
            "rows_joined_running": self.joined,
            "max_batch_tokens": self.batch_tokens,
            "kv_positions_limit": self.kv_limit,
            # rows over an image seen before: its features, and the prompt up to it, reused
            "image_feature_hits": self.feature_cache.hits if self.feature_cache else 0,
            "prefix_hits": self.prefix_cache.hits if self.prefix_cache else 0,
            "peak_memory_bytes": peak_memory_bytes(),
        }


def rows_joining(
    decoder, rows: list, max_batch_tokens: int, fits: Callable[..., bool] | None = None
) -> int:
    """How many of the prepared ``rows`` (the next in the plan) join ``decoder``'s running
    batch: ``batching.joining`` on the batch's rows still generating and each row's prompt
    length and limit."""
    waiting = [(len(row.input_ids), decoder.limit(row)) for row in rows]
    running = (decoder.active, decoder.longest, decoder.longest_prompt, decoder.room)
    return joining(*running, waiting, max_batch_tokens, fits)


def image_key(ref: ImageRef | None) -> Hashable | None:
    """Which rows the planner keeps together: one file path, or equal image bytes (Python's
    cached hash of them; a collision only puts two images side by side). The engine's caches
    key on the decoded pixels, so a key here never decides which features a row gets."""
    if ref is None:
        return None
    return ref.path if ref.data is None else hash(ref.data)


def _chain(batches, queue: deque, submit) -> Iterator:
    """Keep ``PREFETCH_BATCHES`` batches submitted ahead of the one being run."""
    for batch in batches:
        queue.append(submit(batch))
        if len(queue) > PREFETCH_BATCHES:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _check_context(spec: JobSpec, model_dir: Path) -> None:
    """Refuse a --max-tokens that leaves no room for a prompt in the model's context (with a
    column of per-row limits it is only their cap: ``_Session._estimate`` checks each row)."""
    context = _model_context(model_dir)
    if context is not None and spec.max_tokens >= context and spec.max_tokens_column is None:
        raise ConfigError(
            f"--max-tokens {spec.max_tokens} leaves no room for a prompt in the model's context "
            f"of {context} positions (max_position_embeddings in its config.json); lower it"
        )


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def _outside_input(row: Row, err: Exception) -> bool:
    """Whether an error preparing ``row`` may have its cause outside the input and settings,
    where fixing it and ``--retry-errors`` help: an image file missing, damaged or not an image
    (its bytes are not in the input), but not one over the pixel limit (a setting)."""
    image = row.image
    return (
        isinstance(err, ImageError)
        and not isinstance(err, OverPixelLimit)
        and image is not None
        and image.data is None
    )


def _merged_by_checkpoint(spec: JobSpec) -> bool:
    """Whether the file at the output was merged from this job's checkpoint (its fingerprint is
    the manifest's), as opposed to the old output an --overwrite run found there."""
    try:
        manifest = read_manifest(spec.parts_dir)
    except CheckpointError:
        return False
    return manifest is not None and merged_output(spec.output, manifest.get("fingerprint"))


def write_output_summary(
    output: Path, parts_dir: Path, rows: int, errors: int, session: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``OUTPUT.summary.json`` for the output just merged: its rows and its job's
    fingerprint, over the figures of ``session`` (the run that merged), or of the summary
    there where it is this job's and the session ran no row or there is none (``jobrunner
    merge``): a session that only merged keeps the figures of the run that made the rows, and
    a summary of another job (of the output an --overwrite run replaced) is not kept. Without
    a session or a summary there, nothing is written. Returns the output's counts."""
    path = _summary_path(output)
    counts = _summary_counts(output, rows, errors)
    earlier = read_json(path) if not session or session.get("rows_run") == 0 else None
    if earlier is not None and _summary_of_job(earlier, counts["fingerprint"], parts_dir):
        session = earlier
    if session is not None or earlier is not None:
        write_summary(path, (session or {}) | counts)
    return counts


def _summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


def _summary_counts(output: Path, rows: int, errors: int) -> dict[str, Any]:
    """What ``OUTPUT.summary.json`` says of the output itself: its rows and its job."""
    return {
        "rows_total": rows,
        "rows_ok": rows - errors,
        "rows_error": errors,
        "fingerprint": (merged_metadata(output) or {}).get("fingerprint"),
    }


def mend_finished_output(output: Path, parts_dir: Path) -> None:
    """Tidy what a merge killed midway left beside the job's finished output, which the next
    run finds with nothing to merge: the temp file of a merge killed before its rename (a
    `jobrunner merge` over the current output), and ``OUTPUT.summary.json`` where a kill after
    the rename left it missing, of the rows before a retry or of the output an --overwrite run
    replaced (or a temp of it). A summary of this job keeps its other figures; otherwise only
    the output's counts are written. Under ``merge.lock`` where there is a checkpoint, so that
    it does not overwrite the summary of a merge that replaced the output meanwhile with the
    counts of the file before."""
    path = _summary_path(output)
    lock = _manifest_lock(parts_dir, MERGE_LOCK) if parts_dir.is_dir() else contextlib.nullcontext()
    # the output is finished (and was read): a summary is a side note
    with contextlib.suppress(OSError, ValueError), lock:
        remove_orphan_temps(output)  # of this host's merges that were killed
        counts = _summary_counts(output, pq.read_metadata(output).num_rows, error_rows(output))
        earlier = read_json(path)
        if earlier is not None and not _summary_of_job(earlier, counts["fingerprint"], parts_dir):
            earlier = None
        if earlier is not None and all(earlier.get(k) == v for k, v in counts.items()):
            remove_orphan_temps(path)  # a write of it killed before its rename
            return
        write_summary(path, (earlier or {}) | counts)  # its killed temps go too


def _summary_of_job(summary: dict[str, Any], fingerprint: str | None, parts_dir: Path) -> bool:
    """Whether ``OUTPUT.summary.json`` was written for the job of ``fingerprint``. One written
    before summaries recorded the fingerprint is taken as the job's unless the job began with
    --overwrite over an earlier output (its manifest records the file it replaced)."""
    if "fingerprint" in summary:
        return summary["fingerprint"] == fingerprint
    try:
        manifest = read_manifest(parts_dir)
    except CheckpointError:
        return False
    manifest = manifest or {}  # the file it replaced, still there or replaced by its merge
    return manifest.get("replaces") is None and manifest.get("replaced") is None


def _check_output(spec: JobSpec, print_: str, fields: dict[str, Any]) -> None:
    """Refuse to go on towards replacing a file at the output that this job did not merge:
    without --overwrite, a run never replaces a file it did not write, checkpoint or not.

    With a checkpoint, the file must be what it merged (the rule ``merge`` and ``status``
    apply: its fingerprint is the manifest's; ``open_or_create`` then checks the manifest is
    this job's) or the old output that the checkpoint's --overwrite run found there and its
    merge replaces; without one, the file's own metadata must be this job's (``is_same_job``)."""
    metadata = merged_metadata(spec.output)
    try:
        manifest = read_manifest(spec.parts_dir)
    except CheckpointError:
        manifest = None  # damaged: open_or_create says so
    if replaces_output(manifest, spec.output):
        return
    if metadata is not None:
        if manifest is not None and metadata.get("fingerprint") == manifest.get("fingerprint"):
            return
        if manifest is None and is_same_job(metadata, print_, fields, comparable_fields):
            return
    why = "it is not a file that jobrunner wrote"
    if metadata is not None:
        stored = metadata.get("fingerprint_fields") or {}
        changes = describe_changes(stored, fields, comparable_fields) if stored else []
        why = "it was written by another job" + (f" ({'; '.join(changes)})" if changes else "")
    raise ConfigError(
        f"{spec.output} already exists and {why}; move it away or delete it (a finished "
        "checkpoint of this job then merges its output again), pass --overwrite to replace it "
        "(every row runs again), or choose another --output"
    )


def _waiting_for_merge(reporter: Reporter, stop: _StopFlag) -> Callable[[], None]:
    """``drop_errors``'s ``waiting``: say once that a merge of the job holds it up, and give
    up (``Interrupted``) on a signal, before anything changed."""
    told = []

    def waiting() -> None:
        if stop.signum is not None:
            raise Interrupted(stop.signum)
        if not told:
            reporter.event("waiting for a merge of this job to finish (merge.lock)")
            told.append(True)

    return waiting


def _retry_refusal(
    spec: JobSpec, print_: str, fields: dict[str, Any], shards: int, total: int
) -> str | None:
    """Why ``--retry-errors`` cannot reach the job's error rows from this run, or None: the
    checkpoint of its finished output (which holds the rows to keep) was removed and the output
    cannot take its place, or the job ran in another number of shards. A job without error
    rows is left to the usual checks."""
    try:
        manifest = _kept_manifest(spec, print_)
    except CheckpointError:
        return None  # damaged: open_or_create says so
    if manifest is None:
        if not spec.output.exists() or not (errors := output_error_rows(spec.output)):
            return None
        why = rebuild_refusal(spec.output, print_, spec.keep_columns, total)
        if why is None and shards == 1:
            return None  # the output makes the checkpoint again (``_rebuilds_checkpoint``)
        if why is None:
            return (
                f"the {errors} error rows of {spec.output} run again without --shard: its "
                f"checkpoint ({spec.parts_dir}) was removed, and one run makes it again from "
                "the output"
            )
        return (
            f"the {errors} error rows of {spec.output} cannot run again alone: its "
            f"checkpoint ({spec.parts_dir}), which holds the other rows, was removed, and the "
            f"output cannot take its place ({why}); --overwrite runs every row again"
        )
    if not _another_split(manifest, print_, fields, shards):
        return None
    counts = shard_errors(spec.parts_dir)
    if len(counts) == 1 and counts[0]:
        return (
            f"this job ran without --shard: run its {counts[0]} error rows again with "
            "--retry-errors and no --shard"
        )
    if sum(counts):
        return (
            f"this job ran in {len(counts)} shards; its error rows are in "
            f"{_shards_with_errors(counts)}: run each of those again with --retry-errors"
        )
    return None


def _rebuilds_checkpoint(spec: JobSpec, print_: str, shards: int, total: int) -> bool:
    """Whether ``--retry-errors`` makes the job's checkpoint again from its output: the output
    holds error rows, its checkpoint was removed (or is the empty one a stopped rebuild left:
    ``_kept_manifest``) and its rows read back as parts (``rebuild_refusal``). Not in shards: a
    sharded run holds its shard's rows only, and the whole output's belong to one checkpoint."""
    if shards != 1:
        return False
    try:
        if _kept_manifest(spec, print_) is not None:
            return False
    except CheckpointError:
        return False  # damaged: open_or_create says so
    return (
        rebuild_refusal(spec.output, print_, spec.keep_columns, total) is None
        and output_error_rows(spec.output) > 0
    )


def _kept_manifest(spec: JobSpec, print_: str) -> dict[str, Any] | None:
    """The checkpoint's manifest; None where the checkpoint was removed or is the empty one
    that a rebuild of this job left when killed (``stopped_rebuild``): that one stands for the
    removed checkpoint, so a run after the kill does what it did before the retry (nothing, not
    every row again).

    Raises:
        CheckpointError: the manifest is damaged.
    """
    manifest = read_manifest(spec.parts_dir)
    if manifest is not None and stopped_rebuild(spec.parts_dir, spec.output, print_):
        return None
    return manifest


def _rebuild_checkpoint(spec: JobSpec, store: CheckpointStore, total: int, reporter) -> None:
    """Import the output's rows as the parts of the (new, empty) checkpoint and mark it
    complete, as the run that merged the output left it; if that fails, the new checkpoint is
    taken back, so the output stays the job's finished one."""
    try:
        made = spec.output.stat().st_mtime
        rows = store.import_parts(output_parts(spec.output, total, spec.keep_columns), made)
        store.mark_complete(total)
    except BaseException:
        with contextlib.suppress(OSError):
            store.abandon_new()
        raise
    reporter.event(
        f"checkpoint: made again from {spec.output} ({rows} rows), its folder having been removed"
    )


# what makes a row's output: a change of any between a job's runs may change the rows made after
_ROW_MAKERS = (
    "jobrunner-code",
    "mlx-jobrunner",
    "mlx",
    "numpy",
    "pillow",
    "transformers",
    "tokenizers",
    "platform",
)


def _version_changes(before: dict[str, Any] | None, now: dict[str, Any]) -> tuple[str, str] | None:
    """What of ``_ROW_MAKERS`` differs between the versions a checkpoint was started with
    (``before``; None for a checkpoint that did not record them) and ``now``, in words: the
    old ones and the new ones, or None."""
    changed = [k for k in _ROW_MAKERS if before and k in before and before[k] != now.get(k)]
    if not changed:
        return None
    return tuple(", ".join(f"{k} {v.get(k)}" for k in changed) for v in (before, now))


def _shards_with_errors(counts: list[int]) -> str:
    """``--shard K/N (errors)`` for each shard that holds error records (``shard_errors``)."""
    n = len(counts)
    return ", ".join(f"--shard {k}/{n} ({count})" for k, count in enumerate(counts) if count)


def _finished_before(spec: JobSpec, print_: str, fields: dict[str, Any], shards: int) -> bool:
    """Whether the output, this job's (``_check_output``), was finished in a way this run's
    checkpoint would not say: its checkpoint folder was removed (``_kept_manifest``), or the
    job ran in another number of shards (all of which finished, since the output was merged)."""
    try:
        manifest = _kept_manifest(spec, print_)
    except CheckpointError:
        return False  # damaged: open_or_create says so
    if manifest is None:
        return True
    return _another_split(manifest, print_, fields, shards) and output_is_current(
        spec.parts_dir, spec.output
    )


def _done_in_another_split(spec: JobSpec, print_: str, fields: dict[str, Any], shards: int) -> bool:
    """Whether this job ran in another number of shards that are all done, its output not
    merged (or removed since): its checkpoint merges, as `jobrunner merge` would."""
    try:
        manifest = read_manifest(spec.parts_dir)
    except CheckpointError:
        return False  # damaged: open_or_create says so
    if manifest is None or not _another_split(manifest, print_, fields, shards):
        return False
    return all_shards_complete(spec.parts_dir)


def _another_split(manifest: dict, print_: str, fields: dict[str, Any], shards: int) -> bool:
    """Whether ``manifest`` is this job's, run in another number of shards than ``shards``."""
    other = manifest.get("num_shards") != shards
    return other and is_same_job(manifest, print_, fields, comparable_fields)


_SAVED = (
    "the rows before it are done and saved (see jobrunner status); repair or re-create the "
    "file and run again (with --overwrite, as a changed input is another job)"
)


def _check_unchanged(path: Path, source: dict[str, Any]) -> None:
    """Raise ``InputChanged`` if the input is not the file the job started on (rewritten, grown
    or cut while the job ran, by the fingerprint's rule): its rows would not be the rows that
    were counted and fingerprinted. A file that cannot be read now tells nothing: ``BadInput``,
    and the same command resumes once it can be read."""
    try:
        change = input_change(source)
    except OSError as err:
        raise BadInput(
            f"{path} cannot be read to check that it is still the file the job started on "
            f"({err.strerror or err}); the rows done are saved: run the same command again "
            "once it can be read"
        ) from None
    if change:
        raise InputChanged(path, change)


def _changed_quietly(path: Path, source: dict[str, Any]) -> str | None:
    """``input_change`` for a run that stopped otherwise: None where nothing can be told."""
    try:
        return input_change(source)
    except OSError:
        return None


def _images_among(rows: list[Row]) -> int:
    """Distinct images among held rows; a text-only row counts as one of its own."""
    keys = {image_key(row.image) for row in rows if row.image is not None}
    return len(keys) + sum(row.image is None for row in rows)


def _describe(err: BaseException | None) -> str:
    return f"{type(err).__name__}: {err}" if err else "unknown error"


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss), plus MLX's peak device memory on GPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024
    try:
        import mlx.core as mx

        if mx.default_device() != mx.cpu:
            return rss + mx.get_peak_memory()
    except Exception:  # noqa: BLE001 - memory figures are informational
        pass
    return rss
