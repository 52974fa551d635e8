"""The bench modes: uncached naive decoding, ``generate_batch`` one row at a time or on planned
batches, planned rows through one ``Decoder`` that they join as others finish (the engine's
default path), and ``run_job`` on the JSONL; each returns a ``ModeResult`` and the tokens it
produced."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from model.generate import Decoder, generate_batch, image_features
from model.language import attention_mask, position_ids

from ..batching import JOIN_AT, PlanStats, plan_batches
from ..progress import Reporter
from ..runner import rows_joining, run_job
from ..spec import build_spec

MODES = ("naive", "single", "unsorted", "sorted", "pipeline")
# Run when asked for (``--mixed-lengths`` asks): mode 4 without joins, each planned batch
# decoded until its longest row is done, so that (4) / (4b) is what continuous batching buys.
EXTRA_MODES = ("fixed",)
LABELS = {"naive": "1", "single": "2", "unsorted": "3", "sorted": "4", "fixed": "4b"}
LABELS |= {"pipeline": "5", "peer": "6"}
RUN_ORDER = ("naive", "single", "unsorted", "sorted", "fixed", "pipeline")  # by default


@dataclass
class ModeResult:
    mode: str
    rows: int
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    padding_fraction: float
    peak_memory_bytes: int
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        s = self.seconds or float("nan")
        out |= {
            "rows_per_second": self.rows_per_second,
            "prompt_tokens_per_second": self.prompt_tokens / s,
            "generated_tokens_per_second": self.generated_tokens / s,
        }
        return out


def naive_generate(model, row, max_tokens: int, bucket: int = 1) -> list[int]:
    """Greedy decoding without a cache: every token recomputes the whole sequence. The row
    stops at its own ``max_tokens`` when that is fewer.

    ``bucket`` > 1 left-pads the sequence (masked) to a multiple of it, so that its shapes
    repeat: a GPU backend may plan kernels per shape, a cost of the backend, not of the loop.
    """
    ids = mx.array([row.input_ids])
    embeddings = model.model.embed(ids, image_features(model, [row]))
    tokens: list[int] = []
    for _ in range(min(row.max_tokens or max_tokens, max_tokens)):
        length = -(-embeddings.shape[1] // bucket) * bucket
        pad = mx.array([length - embeddings.shape[1]], dtype=mx.int32)
        padded = mx.pad(embeddings, [(0, 0), (length - embeddings.shape[1], 0), (0, 0)])
        positions, mask = position_ids(pad, 0, length), attention_mask(pad, 0, length)
        hidden = model.model(ids, positions, mask, None, embeddings=padded)
        token = mx.argmax(model.lm_head(hidden[:, -1]), axis=-1)
        tokens.append(int(token.item()))
        embeddings = mx.concatenate([embeddings, model.model.embed_tokens(token[:, None])], axis=1)
    return tokens


def _subset(count: int, prepared, among: Sequence[int] | None = None) -> list[int]:
    """``count`` rows (of ``among``, default all) at evenly spaced quantiles of prompt length,
    in input order: a per-row mode run on them sees the same mix of lengths as the whole set."""
    pool = range(len(prepared)) if among is None else among
    by_length = sorted(pool, key=lambda i: len(prepared[i].input_ids))
    count = max(1, min(count, len(by_length)))
    return sorted({by_length[int((k + 0.5) * len(by_length) / count)] for k in range(count)})


def run_naive(model, prepared, indices: Sequence[int], max_tokens: int, bucket: int = 1):
    tokens = {}
    mx.reset_peak_memory()
    start = time.perf_counter()
    for i in indices:
        tokens[i] = naive_generate(model, prepared[i], max_tokens, bucket)
    seconds = time.perf_counter() - start
    result = _engine_result("naive", prepared, indices, seconds, tokens, padding=0.0, batches=0)
    return result, tokens


def run_batches(
    model, processor, prepared, batches, params, mode: str, feature_cache=None, prefix_cache=None
):
    """Run ``generate_batch`` on each batch of row indices, each until its longest row is
    done; time it all."""
    stats, tokens, steps = PlanStats(), {}, [0, 0]
    crops_before = model.vision.crops_encoded
    mx.reset_peak_memory()
    start = time.perf_counter()
    for batch in batches:
        rows = [prepared[i] for i in batch]
        stats.add([len(row.input_ids) for row in rows])
        results = generate_batch(
            model, processor, rows, params, feature_cache=feature_cache, prefix_cache=prefix_cache
        )
        for i, result in zip(batch, results, strict=True):
            tokens[i] = result.token_ids
        # a batch steps until its longest row is done; a row generates in as many steps as
        # it has tokens, and one more for a stop token
        counts = [len(result.token_ids) + (result.finish_reason == "stop") for result in results]
        steps[0] += max(counts)
        steps[1] += sum(counts)
    seconds = time.perf_counter() - start
    result = _batched_result(
        mode, model, prepared, batches, seconds, tokens, stats, crops_before, prefix_cache, steps
    )
    return result, tokens


def run_joined(
    model,
    processor,
    prepared,
    batches,
    params,
    mode: str,
    batch_size: int,
    max_batch_tokens: int,
    feature_cache=None,
    prefix_cache=None,
):
    """The planned ``batches`` through one ``Decoder`` as ``jobrunner run`` takes them: once a
    quarter of its ``batch_size`` slots are free, the next planned rows join the running batch,
    as many as the slots and ``max_batch_tokens`` allow (``batching.joining``); time it all.
    This is ``jobrunner.runner._Session._decode``'s loop without what the bench does not need:
    the memory bound (the bench's batches are small), failure isolation and signals."""
    stats, tokens, steps, joined = PlanStats(), {}, [0, 0], 0
    for batch in batches:
        stats.add([len(prepared[i].input_ids) for i in batch])
    crops_before = model.vision.crops_encoded
    mx.reset_peak_memory()
    start = time.perf_counter()
    decoder = Decoder(model, processor, params, feature_cache, prefix_cache)
    planned, waiting = deque(batches), deque()
    while True:
        free = batch_size - decoder.active
        if free >= JOIN_AT * batch_size or not decoder.active:
            while planned and len(waiting) < free:
                waiting.extend(planned.popleft())
            candidates = [prepared[i] for i in list(waiting)[:free]]
            running = decoder.active
            take = rows_joining(decoder, candidates, max_batch_tokens)
            if take:
                taken = [waiting.popleft() for _ in range(take)]
                decoder.add([(i, prepared[i], 0) for i in taken])
                joined += take if running else 0
        if not decoder.active:
            break
        coming = bool(planned or waiting)
        if coming and decoder.crowded:  # none could join: leave before the step
            decoder.drop()
        steps[0] += 1
        steps[1] += decoder.active
        for i, result in decoder.step(drop=not coming):
            tokens[i] = result.token_ids
    seconds = time.perf_counter() - start
    result = _batched_result(
        mode, model, prepared, batches, seconds, tokens, stats, crops_before, prefix_cache, steps
    )
    result.extra["rows_joined_running"] = joined
    return result, tokens


def _batched_result(
    mode, model, prepared, batches, seconds, tokens, stats, crops_before, prefix_cache, steps
):
    indices = [i for batch in batches for i in batch]
    result = _engine_result(
        mode, prepared, indices, seconds, tokens, stats.padding_fraction, stats.batches
    )
    result.extra["crops_encoded"] = model.vision.crops_encoded - crops_before
    # steps, and rows generating a token summed over steps (the same in every batched mode)
    result.extra["decode_steps"], result.extra["decode_row_steps"] = steps
    if prefix_cache is not None:
        result.extra["prefix_hits"] = prefix_cache.hits
    return result


def _engine_result(mode, prepared, indices, seconds, tokens, padding, batches) -> ModeResult:
    return ModeResult(
        mode=mode,
        rows=len(indices),
        seconds=seconds,
        prompt_tokens=sum(len(prepared[i].input_ids) for i in indices),
        generated_tokens=sum(len(tokens[i]) for i in indices),
        padding_fraction=padding,
        peak_memory_bytes=int(mx.get_peak_memory()),
        batches=batches,
    )


def plan(prepared, batch_size: int, max_batch_tokens: int, sort: bool) -> list[list[int]]:
    # rows over one image kept together, as `jobrunner run` keeps rows of one image file
    items = [
        (i, len(row.input_ids), tuple(image.key for image in row.images) or None)
        for i, row in enumerate(prepared)
    ]
    window = len(items) if sort else 1
    return list(plan_batches(items, batch_size, max_batch_tokens, window))


class _ClockReporter:
    """A quiet reporter that notes when the run loop starts (the model is loaded by then)."""

    def __init__(self):
        self._inner = Reporter(quiet=True)
        self.started: float | None = None

    def start(self, total: int, done_before: int) -> None:
        self.started = time.perf_counter()
        self._inner.start(total, done_before)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def run_pipeline(jsonl: Path, model_dir: Path, out_dir: Path, settings: dict[str, Any]):
    """Mode 5: ``run_job`` on the JSONL; returns the result and ``{index: (text, n_tokens)}``."""
    import pyarrow.parquet as pq

    output = out_dir / "pipeline.parquet"
    spec = build_spec(
        {"input": jsonl, "model": str(model_dir), "output": output, "overwrite": True, **settings}
    )
    reporter = _ClockReporter()
    mx.reset_peak_memory()
    begin = time.perf_counter()
    outcome = run_job(spec, reporter)
    end = time.perf_counter()
    table = pq.read_table(output, columns=["output", "output_tokens", "prompt_tokens"])
    texts = table.column("output").to_pylist()
    counts = table.column("output_tokens").to_pylist()
    summary = outcome.summary
    result = ModeResult(
        mode="pipeline",
        rows=outcome.rows_run,
        seconds=end - (reporter.started or begin),
        prompt_tokens=int(sum(table.column("prompt_tokens").to_pylist())),
        generated_tokens=int(sum(counts)),
        padding_fraction=float(summary.get("padding_fraction", 0.0)),
        peak_memory_bytes=int(mx.get_peak_memory()),
        batches=int(summary.get("batches", 0)),
        extra={
            "load_seconds": (reporter.started or begin) - begin,
            "errors": outcome.errors,
            "rows_joined_running": summary.get("rows_joined_running"),
        },
    )
    return result, dict(enumerate(zip(texts, counts, strict=True)))
