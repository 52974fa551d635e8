"""``jobrunner bench``: throughput of the engine and the whole run path, side by side, in one run.

A random-weight model of a chosen size and a synthetic dataset (PNG images of mixed sizes and
aspect ratios shared by one to three prompts of mixed lengths, some text-only rows, as JSONL) are
written to a temporary folder. The same rows then go, one mode after another, through:

1. ``naive``: one row at a time, no cache; every new token recomputes the whole sequence (the
   seed tutorials' loop). The image is encoded once per row and only the last position goes
   through ``lm_head``, so this baseline is if anything flattered.
2. ``single``: one row at a time with the KV cache (``generate_batch`` on one row).
   Modes 2-4b keep image features and prompt prefixes across batches, as ``run`` does
   (``--no-feature-cache``, ``--no-prefix-cache``); mode 2's few rows rarely share an image,
   so the caches help modes 3-5 more (the JSON's ``prefix_hits`` per mode).
3. ``unsorted``: batched with the cache, rows in input order (``plan_batches``, window 1).
4. ``sorted``: batched with the cache, length-sorted: the engine's default path. Modes 3 and 4
   run the planned rows through one ``Decoder`` as ``jobrunner run`` does: once a quarter of
   the batch's slots are free, the next planned rows join it (``batching.joining``).
   4b. ``fixed`` (by default only with ``--mixed-lengths``): mode 4 without joins,
   each planned batch decoded until its longest row is done (``generate_batch``), so that
   (4) / (4b) is what continuous batching buys.
5. ``pipeline``: ``run_job`` on the JSONL (reader, planner, preprocessing threads, engine,
   Parquet parts, merge), timed from the reporter's start (model loaded) to the merged file.

With ``repeat`` > 1 the modes run that many rounds, every other round in reverse order (so a
drift in the machine's speed falls on every mode alike); each mode reports its median round,
and the rounds must give the same tokens.

How to read the report. Modes 1-4 time the engine on rows prepared beforehand (image decode, HD
transform and tokenizing are not timed), so (5) against (4) shows whether the pipeline hides that
work behind the model. ``x(1)`` and ``x(2)`` are rows/s over modes 1 and 2. The per-row modes 1 and
2 may run on subsets of the rows taken at evenly spaced quantiles of prompt length (a per-row rate
depends on the mix of lengths, which the quantiles keep, and, through the caches, on how many rows
share an image, which a subset has fewer of); mode 1's rows are among mode 2's, so the two are
compared token by token. Padding is the share of prompt slots that are padding. Peak memory is
MLX's allocator peak during the mode. Untimed warm-up runs come first; on a GPU they run every
prompt shape of modes 2-4 once, since the backend plans attention once per shape and process, and
the first mode would pay for all of them.

Every mode does the same work: the bench model's ``lm_head`` rows of special tokens and of ids
the tokenizer does not know are zero, so greedy decoding never stops and always emits decodable
text, and every row generates exactly ``max_tokens`` tokens. So batches never shrink and rows
never join a running one. With ``--mixed-lengths`` each row asks for its own number of tokens,
drawn uniformly from 1 to ``max_tokens`` (the JSONL's ``max_tokens`` column, which mode 5 reads
with ``max_tokens_column``), as captions and answers of different lengths would; the batched
modes report their decode steps and the rows that joined running batches. Modes 2-5 must
produce the same tokens (mode 5 is compared by decoded text and token count): in float32 on a
CPU they do. In
bfloat16 on a GPU, kernels chosen by batch size round differently and a row may depart at a near
tie; the report gives the position where each differing row first departs.

Ceilings are measured in the same process: dense matmul GFLOP/s and memory read GB/s through MLX
(the better of a row reduction and a matrix-vector product over a buffer far larger than caches).
The batch-1 decode step is compared with weight bytes / read bandwidth (the time to stream the
decoder's weights once), and prefill GFLOP/s of the longest row with the matmul ceiling.

Layout: ``workload`` (presets, the model and the dataset), ``modes`` (the modes),
``ceilings`` (the ceilings, and prefill and decode step against them), ``report`` (ratios,
agreement, targets and the table); this module runs them in order.

This package imports ``mlx.core``: import it after ``jobrunner._blas.prepare_process()`` (the CLI
does).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from model.cache import ImageFeatureCache, PrefixCache
from model.generate import (
    GenerationParams,
    batch_limits,
    device_memory_bytes,
    generate_batch,
    kv_bytes_per_token,
    token_limit,
    weight_bytes,
)
from model.loading import default_dtype, load
from model.tiny import tiny_config

from .. import _blas
from ..runner import DEFAULT_BATCH_TOKENS
from .ceilings import decoder_weight_bytes, measure_ceilings, prefill_flops, roofline
from .modes import (
    EXTRA_MODES,
    LABELS,
    MODES,
    RUN_ORDER,
    ModeResult,
    _subset,
    naive_generate,
    plan,
    run_batches,
    run_joined,
    run_naive,
    run_pipeline,
)
from .peer import PeerUnavailable, check_peer, run_peer
from .peer import agreement as peer_agreement
from .report import _agreement, _ratios, _targets, format_report
from .workload import (
    IMAGE_SIZES,
    PRESETS,
    TEXT_ONLY_EVERY,
    Preset,
    build_model_dir,
    load_rows,
    make_dataset,
)

__all__ = [
    "EXTRA_MODES",
    "IMAGE_SIZES",
    "MODES",
    "PRESETS",
    "TEXT_ONLY_EVERY",
    "BenchSettings",
    "ModeResult",
    "Preset",
    "build_model_dir",
    "decoder_weight_bytes",
    "format_report",
    "load_rows",
    "make_dataset",
    "measure_ceilings",
    "naive_generate",
    "plan",
    "prefill_flops",
    "roofline",
    "run_batches",
    "run_bench",
    "run_joined",
    "run_naive",
    "run_pipeline",
]


@dataclass(frozen=True)
class BenchSettings:
    """What to run; ``None`` fields take the preset's value."""

    preset: str = "small"
    rows: int | None = None
    max_tokens: int | None = None
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    dtype: str | None = None
    modes: tuple[str, ...] | None = None  # None: MODES, and mode 4b (fixed) with mixed_lengths
    naive_rows: int | None = None
    single_rows: int | None = None
    workdir: Path | None = None
    seed: int = 0
    feature_cache: bool = True  # modes 2-4 keep image features across batches, as run does
    prefix_cache: bool = True  # modes 2-4 keep prompt prefixes across batches, as run does
    row_prefill: bool | None = None  # modes 3-4: None is the engine's default for the device
    clear_cache: bool = False  # empty MLX's buffer cache after the warm-up and after each mode
    peer: bool = False  # then mode 6: mlx-vlm's batch_generate on the same model and rows
    # each row asks for its own number of tokens, drawn from 1 to max_tokens (a max_tokens
    # column), so that outputs differ in length as captions and answers do
    mixed_lengths: bool = False
    # rounds of the modes, every other one in reverse order; each mode reports its median round
    repeat: int = 1

    def resolved(self) -> BenchSettings:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        modes = self.modes or tuple(m for m in RUN_ORDER if m in MODES or self.mixed_lengths)
        unknown = set(modes) - set(RUN_ORDER)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join(RUN_ORDER)}")
        p = PRESETS[self.preset]
        if self.repeat < 1:
            raise ValueError(f"repeat must be at least 1, got {self.repeat}")
        if self.peer and self.mixed_lengths:  # its batch_generate takes one max_tokens for all
            raise ValueError("--peer runs every row to --max-tokens: leave out --mixed-lengths")
        if self.peer:
            try:
                check_peer(tiny_config(**p.config))
            except PeerUnavailable as err:
                raise ValueError(str(err)) from None
        return replace(
            self,
            modes=tuple(dict.fromkeys(modes)),  # as given: --modes fixed,sorted runs 4b first
            rows=self.rows or p.rows,
            max_tokens=self.max_tokens or p.max_tokens,
            batch_size=self.batch_size or p.batch_size,
            max_batch_tokens=self.max_batch_tokens or DEFAULT_BATCH_TOKENS,
            naive_rows=self.naive_rows or p.naive_rows,
            single_rows=self.single_rows or p.single_rows,
        )


def run_bench(settings: BenchSettings, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the model and data, measure the ceilings and every mode; return the report.

    Args:
        settings: preset and overrides.
        log: progress lines (default: stderr).

    Returns:
        The report as JSON-ready data: settings, machine, ceilings, one entry per mode, ratios,
        token agreement, roofline and targets.
    """
    log = log or (lambda line: print(f"bench: {line}", file=sys.stderr, flush=True))
    s = settings.resolved()
    if s.workdir is not None:
        return _run_in(s, Path(s.workdir), log)
    with tempfile.TemporaryDirectory(prefix="jobrunner-bench-") as tmp:
        return _run_in(s, Path(tmp), log)


def _run_in(s: BenchSettings, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    dtype = s.dtype or default_dtype()
    preset = PRESETS[s.preset]
    log(f"building the {s.preset} model ({dtype}) and {s.rows} rows in {work}")
    model_dir = build_model_dir(work / "model", preset, dtype, s.seed)
    limits = s.max_tokens if s.mixed_lengths else None
    jsonl = make_dataset(work / "data", s.rows, s.seed, limits)
    model, processor = load(str(model_dir), dtype)
    prepared = _prepare(processor, jsonl)
    gpu = mx.default_device() != mx.cpu
    log("measuring the machine's ceilings")
    ceilings = measure_ceilings(dtype, gpu, quick=s.preset == "tiny")
    params = GenerationParams(max_tokens=s.max_tokens, row_prefill=s.row_prefill)
    warm_up = _warm_up(model, processor, prepared, replace(params, max_tokens=2), s, gpu)
    log(f"warm-up: {warm_up:.1f}s; {_buffers(s.clear_cache)}")
    runs: dict[str, list[tuple[ModeResult, dict]]] = {mode: [] for mode in s.modes}
    sorted_plan = plan(prepared, s.batch_size, s.max_batch_tokens, sort=True)
    for round_ in range(s.repeat):
        order = s.modes if round_ % 2 == 0 else s.modes[::-1]
        if s.repeat > 1:
            log(f"round {round_ + 1} of {s.repeat}: {', '.join(order)}")
        for mode in order:
            log(f"mode {LABELS[mode]} ({mode})")
            result, mode_tokens = _run_mode(mode, s, model, processor, prepared, params, work)
            result.extra |= {"mlx_active_after": mx.get_active_memory()}
            result.extra |= {"mlx_cached_after": mx.get_cache_memory()}
            runs[mode].append((result, mode_tokens))
            rate = result.rows_per_second
            log(f"  {result.rows} rows in {result.seconds:.1f}s: {rate:.3f} rows/s")
            log(f"  {_buffers(s.clear_cache)}")
    results, tokens, rounds_agree = {}, {}, True
    for mode in s.modes:
        results[mode], tokens[mode] = _median_run(runs[mode])
        rounds_agree &= all(other == tokens[mode] for _, other in runs[mode])
    peer = None
    if s.peer:
        log("mode 6 (peer)")
        lengths = [len(row.input_ids) for row in prepared]
        results["peer"], texts = run_peer(
            model_dir, jsonl, lengths, s.max_tokens, s.batch_size, log
        )
        log(f"  {results['peer'].rows} rows in {results['peer'].seconds:.1f}s")
        peer = _peer_report(results["peer"], texts, tokens, processor, load_rows(jsonl))
    log("roofline: prefill and batch-1 decode step")
    report = {
        "settings": _settings_dict(s, dtype),
        "machine": _machine(gpu),
        "model": _model_summary(model, prepared),
        "ceilings": ceilings,
        "warm_up_seconds": warm_up,
        "modes": {mode: r.to_dict() for mode, r in results.items()},
        "ratios": _ratios(results),
        "agreement": _agreement(tokens, processor) | {"rounds_agree": rounds_agree},
        "roofline": roofline(model, processor, prepared, ceilings),
        "memory": _memory(model, prepared, sorted_plan, s),
        "peer": peer,
    }
    report["targets"] = _targets(report)
    return report


def _median_run(runs: list[tuple[ModeResult, dict]]) -> tuple[ModeResult, dict]:
    """The run with the median time (the lower of the two middle ones for an even count), so
    that every figure reported for a mode comes from one run; every round's seconds go in its
    ``extra["round_seconds"]``, in the order they ran."""
    ranked = sorted(runs, key=lambda run: run[0].seconds)
    result, tokens = ranked[(len(ranked) - 1) // 2]
    result.extra["round_seconds"] = [run.seconds for run, _ in runs]
    return result, tokens


def _peer_report(result, texts, tokens, processor, records) -> dict[str, Any]:
    """The peer's exactness and its agreement with the first of modes 4, 3, 2 that ran."""
    out = {k: result.extra[k] for k in ("peer", "rows_checked_alone", "rows_same_as_alone")}
    base = next((m for m in ("sorted", "unsorted", "single") if m in tokens), None)
    if base is not None:
        reference = {i: processor.decode(ids) for i, ids in tokens[base].items()}
        out |= {"same_text_as": base, **peer_agreement(texts, reference, records)}
    return out


def _buffers(clear: bool) -> str:
    """MLX's active and cached buffer memory (a mode's speed can depend on what the previous
    one left cached); with ``clear``, the cache is then emptied."""
    line = (
        f"MLX buffers: active {mx.get_active_memory() / 2**20:,.0f} MiB, "
        f"cached {mx.get_cache_memory() / 2**20:,.0f} MiB"
    )
    if clear:
        mx.clear_cache()
        line += " (cache cleared)"
    return line


def _warm_up(model, processor, prepared, params, s: BenchSettings, gpu: bool) -> float:
    """Untimed runs before the modes. On a GPU every prompt shape of modes 2-4 is run once:
    the backend plans attention per shape, once per process, and whichever mode came first
    would pay for all of them (a job pays once per shape, over far more rows)."""
    start = time.perf_counter()
    generate_batch(model, processor, prepared[:2], params)
    if gpu:
        batches = [[i] for i in _subset(s.single_rows, prepared)]
        for sort in (False, True):
            batches += plan(prepared, s.batch_size, s.max_batch_tokens, sort)
        for batch in batches:
            generate_batch(model, processor, [prepared[i] for i in batch], params)
    return time.perf_counter() - start


def _prepare(processor, jsonl: Path) -> list:
    from PIL import Image

    prepared = []
    for record in load_rows(jsonl):
        if record.get("image") is None:
            row = processor.prepare(record["prompt"], None)
        else:
            with Image.open(jsonl.parent / record["image"]) as image:
                row = processor.prepare(record["prompt"], image)
        row.max_tokens = record.get("max_tokens")
        prepared.append(row)
    return prepared


def _run_mode(mode: str, s: BenchSettings, model, processor, prepared, params, work: Path):
    if mode == "naive":
        # a subset of mode 2's rows, so that the two can be compared token by token
        among = _subset(s.single_rows, prepared)
        rows = _subset(s.naive_rows, prepared, among)
        bucket = 1 if mx.default_device() == mx.cpu else 64
        return run_naive(model, prepared, rows, s.max_tokens, bucket)
    caches = (
        ImageFeatureCache() if s.feature_cache else None,
        PrefixCache.for_memory(device_memory_bytes(), weight_bytes(model))
        if s.prefix_cache
        else None,
    )
    if mode == "single":
        batches = [[i] for i in _subset(s.single_rows, prepared)]
        return run_batches(model, processor, prepared, batches, params, mode, *caches)
    if mode in ("unsorted", "sorted"):
        batches = plan(prepared, s.batch_size, s.max_batch_tokens, sort=mode == "sorted")
        return run_joined(
            model, processor, prepared, batches, params, mode, s.batch_size, s.max_batch_tokens,
            *caches,
        )  # fmt: skip
    if mode == "fixed":
        batches = plan(prepared, s.batch_size, s.max_batch_tokens, sort=True)
        return run_batches(model, processor, prepared, batches, params, mode, *caches)
    settings = {
        "max_tokens_column": "max_tokens" if s.mixed_lengths else None,
        "max_tokens": s.max_tokens,
        "batch_size": s.batch_size,
        "max_batch_tokens": s.max_batch_tokens,
        "dtype": s.dtype,
        "quiet": True,
    }
    return run_pipeline(work / "data" / "bench.jsonl", work / "model", work, settings)


def _settings_dict(s: BenchSettings, dtype: str) -> dict[str, Any]:
    out = {k: v for k, v in asdict(s).items() if k != "workdir"}
    return out | {"dtype": dtype, "modes": list(s.modes), "num_crops": PRESETS[s.preset].num_crops}


def _machine(gpu: bool) -> dict[str, Any]:
    import platform

    info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    return {
        "device": "gpu" if gpu else "cpu",
        "device_info": info,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "mlx": mx.__version__,
        "blas": _blas._loaded[0] if _blas._loaded else None,
        "memory_bytes": device_memory_bytes(),
        "load_average": os.getloadavg(),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _model_summary(model, prepared) -> dict[str, Any]:
    params = tree_flatten(model.parameters())
    lengths = [len(row.input_ids) for row in prepared]
    return {
        "parameters": sum(int(v.size) for _, v in params),
        "weight_bytes": sum(int(v.nbytes) for _, v in params),
        "decoder_weight_bytes": decoder_weight_bytes(model),
        "kv_bytes_per_token": kv_bytes_per_token(model),
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "prompt_tokens_max": max(lengths),
        "images": len({image.key for row in prepared for image in row.images}),
        "crops": sum(image.crops.shape[0] for row in prepared for image in row.images),
    }


def _memory(model, prepared, batches, s: BenchSettings) -> dict[str, Any]:
    """The run's KV budget (its largest batch's cache) beside the weights, and the limits
    ``batch_limits`` would choose from this machine's memory."""

    def positions(batch: list[int]) -> int:  # each row: the longest prompt, the most room
        rows = [prepared[i] for i in batch]
        room = max(token_limit(row.max_tokens, s.max_tokens) for row in rows)
        return len(rows) * (max(len(row.input_ids) for row in rows) + room)

    widest = max(map(positions, batches))
    memory = device_memory_bytes()
    mean_prompt = int(sum(len(r.input_ids) for r in prepared) / len(prepared))
    suggested = batch_limits(model, s.max_tokens, memory, mean_prompt) if memory else None
    return {
        "weight_bytes": weight_bytes(model),
        "kv_budget_bytes": widest * kv_bytes_per_token(model),
        "machine_memory_bytes": memory,
        "suggested_batch_size": suggested and suggested[0],
        "suggested_max_batch_tokens": suggested and suggested[1],
    }
