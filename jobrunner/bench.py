"""``jobrunner bench``: throughput of the engine and the whole run path, side by side, in one run.

A random-weight model of a chosen size and a synthetic dataset (PNG images of mixed sizes and
aspect ratios shared by one to three prompts of mixed lengths, some text-only rows, as JSONL) are
written to a temporary folder. The same rows then go, one mode after another, through:

1. ``naive``: one row at a time, no cache; every new token recomputes the whole sequence (the
   seed tutorials' loop). The image is encoded once per row and only the last position goes
   through ``lm_head``, so this baseline is if anything flattered.
2. ``single``: one row at a time with the KV cache (``generate_batch`` on one row).
3. ``unsorted``: batched with the cache, rows in input order (``plan_batches``, window 1).
4. ``sorted``: batched with the cache, length-sorted: the engine's default path.
5. ``pipeline``: ``run_job`` on the JSONL (reader, planner, preprocessing threads, engine,
   Parquet parts, merge), timed from the reporter's start (model loaded) to the merged file.

How to read the report. Modes 1-4 time the engine on rows prepared beforehand (image decode, HD
transform and tokenizing are not timed), so (5) against (4) shows whether the pipeline hides that
work behind the model. ``x(1)`` and ``x(2)`` are rows/s over modes 1 and 2. The per-row modes 1
and 2 may run on subsets of the rows taken at evenly spaced quantiles of prompt length (a per-row
rate depends on the mix of lengths, which the quantiles keep, not on the other rows); mode 1's
rows are among mode 2's, so the two are compared token by token. Padding is the share of prompt
slots that are padding. Peak memory is MLX's allocator peak during the mode. Untimed warm-up
runs come first; on a GPU they run every prompt shape of modes 2-4 once, since the backend plans
attention once per shape and process, and the first mode would pay for all of them.

Every mode does the same work: the bench model's ``lm_head`` rows of special tokens and of ids
the tokenizer does not know are zero, so greedy decoding never stops and always emits decodable
text, and every row generates exactly ``max_tokens`` tokens. Modes 2-5 must then produce the same
tokens (mode 5 is compared by decoded text and token count): in float32 on a CPU they do. In
bfloat16 on a GPU, kernels chosen by batch size round differently and a row may depart at a near
tie; the report gives the position where each differing row first departs.

Ceilings are measured in the same process: dense matmul GFLOP/s and memory read GB/s through MLX
(the better of a row reduction and a matrix-vector product over a buffer far larger than caches).
The batch-1 decode step is compared with weight bytes / read bandwidth (the time to stream the
decoder's weights once), and prefill GFLOP/s of the longest row with the matmul ceiling.

This module imports ``mlx.core``: import it after ``jobrunner._blas.load_openblas()`` (the CLI
does).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from model.cache import ImageFeatureCache, make_cache
from model.generate import (
    GenerationParams,
    _left_pad,
    batch_limits,
    decode_step,
    generate_batch,
    image_features,
    kv_bytes_per_token,
    prefill,
)
from model.language import attention_mask, position_ids
from model.loading import DTYPES, default_dtype, load
from model.tiny import _init_std, save_model, tiny_config, weight_shapes

from . import _blas
from .batching import PlanStats, plan_batches
from .progress import Reporter
from .runner import run_job
from .spec import JobSpec, build_spec

MODES = ("naive", "single", "unsorted", "sorted", "pipeline")


@dataclass(frozen=True)
class Preset:
    """Model dimensions (``tiny_config`` overrides) and workload of one bench size."""

    config: dict[str, Any]
    rows: int
    max_tokens: int
    batch_size: int
    naive_rows: int
    single_rows: int
    num_crops: int = 4


_REAL_CLIP = {"image_size": 336, "patch_size": 14}
PRESETS: dict[str, Preset] = {
    # Seconds: the test suite's size. 56-pixel crops, 3x3 cells per crop.
    "tiny": Preset({}, rows=8, max_tokens=8, batch_size=4, naive_rows=2, single_rows=8),
    # Minutes on a 2-core CPU: real crop size and 144 slots per crop, a real-size vocabulary.
    "small": Preset(
        {
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "vocab_size": 32064,
            "vision_config": {
                "hidden_size": 256,
                "intermediate_size": 1024,
                "num_attention_heads": 4,
                "num_hidden_layers": 4,
                **_REAL_CLIP,
            },
        },
        rows=40,
        max_tokens=64,
        batch_size=8,
        naive_rows=1,
        single_rows=8,
    ),
    # Phi-3.5-vision-instruct dimensions (4.2B parameters): for an accelerator with the memory.
    "phi3v": Preset(
        {
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "vocab_size": 32064,
            "original_max_position_embeddings": 4096,
            "vision_config": {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                **_REAL_CLIP,
            },
        },
        rows=64,
        max_tokens=64,
        batch_size=32,
        naive_rows=2,
        single_rows=8,
    ),
}


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


# ---------------------------------------------------------------------------------------------
# The model and the dataset


def build_model_dir(out_dir: Path, preset: Preset, dtype: str, seed: int = 0) -> Path:
    """A random-weight model in Hugging Face layout whose greedy outputs never stop early."""
    config = tiny_config(**preset.config)
    marker = {"config": config, "dtype": dtype, "seed": seed, "num_crops": preset.num_crops}
    if (out_dir / "bench.json").is_file():  # a kept --workdir: reuse the same model
        if json.loads((out_dir / "bench.json").read_text()) == marker:
            return out_dir
    # save_model writes config, tokenizer and processor files; the weights are drawn with MLX
    # below (fast enough for 4B parameters) and replace its empty safetensors file.
    save_model(out_dir, config, {}, num_crops=preset.num_crops)
    known = _tokenizer_size(out_dir)
    weights = {}
    for k, (name, shape) in enumerate(weight_shapes(config).items()):
        mean, std = _init_std(name, shape)
        value = mean + std * mx.random.normal(shape, key=mx.random.key(seed * 7919 + k))
        if name == "lm_head.weight":  # no special tokens, no ids the tokenizer cannot decode
            vocab = mx.arange(shape[0])[:, None]
            value = mx.where((vocab >= _SPECIAL) & (vocab < known), value, 0.0)
        weights[name] = value.astype(DTYPES[dtype])
        mx.eval(weights[name])
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    (out_dir / "bench.json").write_text(json.dumps(marker))
    return out_dir


_SPECIAL = 10  # model.tiny.SPECIAL_TOKENS take ids 0-9


def _tokenizer_size(model_dir: Path) -> int:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    ids = list(tokenizer["model"]["vocab"].values()) + [t["id"] for t in tokenizer["added_tokens"]]
    return max(ids) + 1


# (width, height): 4:3 and 3:4 photos, 16:9, square, 2:1, 3:1, 4:1 panoramas, small images.
IMAGE_SIZES = [
    (640, 480),
    (480, 640),
    (1280, 720),
    (512, 512),
    (800, 400),
    (1024, 768),
    (900, 300),
    (300, 200),
    (400, 800),
    (1200, 300),
    (720, 1280),
    (160, 120),
]
_WORDS = (
    "describe the image in detail what colour is the circle square triangle on left right top "
    "bottom small large red green blue yellow picture shows a photo of cat dog man bicycle street "
    "how many shapes are there write caption for this chart with numbers labels and title"
).split()


def make_dataset(out_dir: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` JSONL rows, most over PNG images shared by 1-3 prompts; returns the JSONL path.

    Images cycle through ``IMAGE_SIZES``; prompts have 3 to 120 words; one row in
    ``TEXT_ONLY_EVERY`` has no image. Rows are shuffled, so rows that share an image are
    usually not neighbours.
    """
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, image = [], 0
    while len(records) < rows:
        width, height = IMAGE_SIZES[image % len(IMAGE_SIZES)]
        name = f"img{image:04d}.png"
        _picture(width, height, rng).save(out_dir / name)
        for _ in range(int(rng.integers(1, 4))):
            records.append({"image": name, "prompt": _prompt(rng)})
            if len(records) % TEXT_ONLY_EVERY == 0:
                records.append({"image": None, "prompt": _prompt(rng)})
        image += 1
    records = [records[i] for i in rng.permutation(len(records))[:rows]]
    path = out_dir / "bench.jsonl"
    with open(path, "w") as f:
        for i, record in enumerate(records):
            f.write(json.dumps({"id": f"row-{i:05d}", **record}) + "\n")
    return path


TEXT_ONLY_EVERY = 6


def _prompt(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 121)))).capitalize() + "."


def _picture(width: int, height: int, rng: np.random.Generator):
    """A smooth colour gradient with noise (compresses well, differs per image)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    pixels = np.stack([base[c] + 80 * np.sin((x + (c + 1) * y) / (37 + 11 * c)) for c in range(3)])
    pixels = pixels.transpose(1, 2, 0) + rng.normal(0, 8, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def load_rows(jsonl: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Ceilings


def _best_seconds(func: Callable[[], Any], repeats: int = 5) -> float:
    mx.eval(func())  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(func())
        best = min(best, time.perf_counter() - start)
    return best


def measure_ceilings(dtype: str, gpu: bool, quick: bool = False) -> dict[str, float]:
    """Dense matmul GFLOP/s and memory read GB/s through MLX, in the model's dtype.

    ``quick`` uses small operands (for the tiny preset): the figures are then lower bounds.
    """
    dt = DTYPES[dtype]
    n = 512 if quick else 8192 if gpu else 2048
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b)
    matmul = 2 * n**3 / _best_seconds(lambda: a @ b) / 1e9
    # fp32 buffers of 4 GiB (GPU), 256 MiB (CPU) or 16 MiB (quick): far larger than caches
    rows = (1 << 22 if quick else 1 << 30 if gpu else 1 << 26) // 1024
    big = mx.random.normal((rows, 1024))
    vec = mx.random.normal((1, 1024))
    mx.eval(big, vec)
    reduce_gbs = big.nbytes / _best_seconds(lambda: big.sum(axis=-1)) / 1e9
    gemv_gbs = big.nbytes / _best_seconds(lambda: vec @ big.T) / 1e9
    return {
        "matmul_gflops": matmul,
        "matmul_size": n,
        "read_gbs_reduce": reduce_gbs,
        "read_gbs_gemv": gemv_gbs,
        "read_gbs": max(reduce_gbs, gemv_gbs),
    }


# ---------------------------------------------------------------------------------------------
# The modes


def naive_generate(model, row, max_tokens: int, bucket: int = 1) -> list[int]:
    """Greedy decoding without a cache: every token recomputes the whole sequence.

    ``bucket`` > 1 left-pads the sequence (masked) to a multiple of it, so that its shapes
    repeat: a GPU backend may plan kernels per shape, a cost of the backend, not of the loop.
    """
    ids = mx.array([row.input_ids])
    embeddings = model.model.embed(ids, image_features(model, [row]))
    tokens: list[int] = []
    for _ in range(max_tokens):
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


def run_batches(model, processor, prepared, batches, params, mode: str, feature_cache=None):
    """Run ``generate_batch`` on each batch of row indices; time it all."""
    stats, tokens = PlanStats(), {}
    crops_before = model.vision.crops_encoded
    mx.reset_peak_memory()
    start = time.perf_counter()
    for batch in batches:
        rows = [prepared[i] for i in batch]
        stats.add([len(row.input_ids) for row in rows])
        results = generate_batch(model, processor, rows, params, feature_cache=feature_cache)
        for i, result in zip(batch, results, strict=True):
            tokens[i] = result.token_ids
    seconds = time.perf_counter() - start
    indices = [i for batch in batches for i in batch]
    result = _engine_result(
        mode, prepared, indices, seconds, tokens, stats.padding_fraction, stats.batches
    )
    result.extra["crops_encoded"] = model.vision.crops_encoded - crops_before
    return result, tokens


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
    items = [(i, len(row.input_ids)) for i, row in enumerate(prepared)]
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
        extra={"load_seconds": (reporter.started or begin) - begin, "errors": outcome.errors},
    )
    return result, dict(enumerate(zip(texts, counts, strict=True)))


# ---------------------------------------------------------------------------------------------
# Roofline: batch-1 decode step and prefill against the ceilings


def decoder_weight_bytes(model) -> int:
    """Bytes read per decode step: decoder layers, final norm and ``lm_head`` (not vision)."""
    return sum(
        int(v.nbytes)
        for k, v in tree_flatten(model.parameters())
        if k.startswith(("model.layers.", "model.norm.", "lm_head."))
    )


def prefill_flops(model, batch: int, length: int) -> float:
    """Useful matmul FLOPs of prefill: linears on every slot, causal attention (query ``i``
    against its ``i + 1`` keys: QK^T and AV) and ``lm_head`` on the last position.

    The CPU path skips most masked keys but not all of them; they are not counted.
    """
    c = model.config
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    linear = 2 * length * c.hidden_size * (qkv + c.hidden_size + 3 * c.intermediate_size)
    attention = 4 * c.num_attention_heads * c.head_dim * length * (length + 1) // 2
    return batch * (c.num_hidden_layers * (linear + attention) + 2 * c.hidden_size * c.vocab_size)


def roofline(model, processor, prepared, ceilings: dict[str, float]) -> dict[str, Any]:
    """Prefill GFLOP/s of the longest row (rows are prefilled one at a time) and the batch-1
    decode step against streaming the decoder's weights once."""
    row = max(prepared, key=lambda r: len(r.input_ids))
    features = image_features(model, [row])
    ids, pad = _left_pad([row], processor.pad_token_id)
    mx.eval(features, ids, pad)

    def run_prefill():
        cache = make_cache(len(model.layers))
        for c in cache:
            c.reserve(ids.shape[1])
        return prefill(model, ids, pad, cache, features, chunk=1 << 30)

    seconds = _best_seconds(run_prefill, repeats=2)
    flops = prefill_flops(model, *ids.shape)
    step = _decode_step_seconds(model, processor, row)
    weight_bytes = decoder_weight_bytes(model)
    ideal = weight_bytes / (ceilings["read_gbs"] * 1e9)
    return {
        "prefill_tokens": ids.shape[1],
        "prefill_seconds": seconds,
        "prefill_gflops": flops / seconds / 1e9,
        "prefill_fraction_of_matmul": flops / seconds / 1e9 / ceilings["matmul_gflops"],
        "decode_step_seconds": step,
        "decoder_weight_bytes": weight_bytes,
        "weight_stream_seconds": ideal,
        "decode_step_over_weight_stream": step / ideal,
    }


def _decode_step_seconds(model, processor, row, steps: int = 16) -> float:
    """Seconds per batch-1 decode step, pipelined as ``generate_batch`` runs it."""
    ids, pad = _left_pad([row], processor.pad_token_id)
    cache = make_cache(len(model.layers))
    for c in cache:
        c.reserve(ids.shape[1] + 2 * steps + 1)
    logits = prefill(model, ids, pad, cache, image_features(model, [row]), chunk=1 << 30)
    token = mx.argmax(logits, axis=-1)
    for k in range(2 * steps):  # the first half warms up
        if k == steps:
            mx.eval(token)
            start = time.perf_counter()
        following = mx.argmax(decode_step(model, token, pad, cache), axis=-1)
        mx.async_eval(following)
        token.tolist()
        token = following
    token.tolist()
    return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------------------------------
# The whole bench


@dataclass(frozen=True)
class BenchSettings:
    """What to run; ``None`` fields take the preset's value."""

    preset: str = "small"
    rows: int | None = None
    max_tokens: int | None = None
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    dtype: str | None = None
    modes: tuple[str, ...] = MODES
    naive_rows: int | None = None
    single_rows: int | None = None
    workdir: Path | None = None
    seed: int = 0
    feature_cache: bool = True  # modes 2-4 keep image features across batches, as run does
    row_prefill: bool | None = None  # modes 3-4: None is the engine's default for the device

    def resolved(self) -> BenchSettings:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
        p = PRESETS[self.preset]
        return replace(
            self,
            rows=self.rows or p.rows,
            max_tokens=self.max_tokens or p.max_tokens,
            batch_size=self.batch_size or p.batch_size,
            max_batch_tokens=self.max_batch_tokens or _spec_default("max_batch_tokens"),
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
    jsonl = make_dataset(work / "data", s.rows, s.seed)
    model, processor = load(str(model_dir), dtype)
    prepared = _prepare(processor, jsonl)
    gpu = mx.default_device() != mx.cpu
    log("measuring the machine's ceilings")
    ceilings = measure_ceilings(dtype, gpu, quick=s.preset == "tiny")
    params = GenerationParams(max_tokens=s.max_tokens, row_prefill=s.row_prefill)
    warm_up = _warm_up(model, processor, prepared, replace(params, max_tokens=2), s, gpu)
    log(f"warm-up: {warm_up:.1f}s")
    results, tokens = {}, {}
    sorted_plan = plan(prepared, s.batch_size, s.max_batch_tokens, sort=True)
    for mode in s.modes:
        log(f"mode {MODES.index(mode) + 1} ({mode})")
        result, tokens[mode] = _run_mode(mode, s, model, processor, prepared, params, work)
        results[mode] = result
        log(f"  {result.rows} rows in {result.seconds:.1f}s: {result.rows_per_second:.3f} rows/s")
    log("roofline: prefill and batch-1 decode step")
    report = {
        "settings": _settings_dict(s, dtype),
        "machine": _machine(gpu),
        "model": _model_summary(model, prepared),
        "ceilings": ceilings,
        "warm_up_seconds": warm_up,
        "modes": {mode: r.to_dict() for mode, r in results.items()},
        "ratios": _ratios(results),
        "agreement": _agreement(tokens, processor),
        "roofline": roofline(model, processor, prepared, ceilings),
        "memory": _memory(model, prepared, sorted_plan, s, gpu),
    }
    report["targets"] = _targets(report)
    return report


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
        if record["image"] is None:
            prepared.append(processor.prepare(record["prompt"], None))
            continue
        with Image.open(jsonl.parent / record["image"]) as image:
            prepared.append(processor.prepare(record["prompt"], image))
    return prepared


def _run_mode(mode: str, s: BenchSettings, model, processor, prepared, params, work: Path):
    if mode == "naive":
        # a subset of mode 2's rows, so that the two can be compared token by token
        among = _subset(s.single_rows, prepared)
        rows = _subset(s.naive_rows, prepared, among)
        bucket = 1 if mx.default_device() == mx.cpu else 64
        return run_naive(model, prepared, rows, s.max_tokens, bucket)
    cache = ImageFeatureCache() if s.feature_cache else None
    if mode == "single":
        batches = [[i] for i in _subset(s.single_rows, prepared)]
        return run_batches(model, processor, prepared, batches, params, mode, cache)
    if mode in ("unsorted", "sorted"):
        batches = plan(prepared, s.batch_size, s.max_batch_tokens, sort=mode == "sorted")
        return run_batches(model, processor, prepared, batches, params, mode, cache)
    settings = {
        "max_tokens": s.max_tokens,
        "batch_size": s.batch_size,
        "max_batch_tokens": s.max_batch_tokens,
        "dtype": s.dtype,
        "quiet": True,
    }
    return run_pipeline(work / "data" / "bench.jsonl", work / "model", work, settings)


def _spec_default(name: str) -> Any:
    return JobSpec.__dataclass_fields__[name].default


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
        "memory_bytes": _memory_bytes(gpu),
        "load_average": os.getloadavg(),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _memory_bytes(gpu: bool) -> int | None:
    """GPU memory when the device reports it, else the machine's physical memory."""
    if gpu:
        size = mx.device_info().get("memory_size")
        if size:
            return int(size)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _model_summary(model, prepared) -> dict[str, Any]:
    params = tree_flatten(model.parameters())
    lengths = [len(row.input_ids) for row in prepared]
    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    return {
        "parameters": sum(int(v.size) for _, v in params),
        "weight_bytes": sum(int(v.nbytes) for _, v in params),
        "decoder_weight_bytes": decoder_weight_bytes(model),
        "kv_bytes_per_token": kv_per_token * params[0][1].dtype.size,
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "prompt_tokens_max": max(lengths),
        "images": len({image.key for row in prepared for image in row.images}),
        "crops": sum(image.crops.shape[0] for row in prepared for image in row.images),
    }


def _memory(model, prepared, batches, s: BenchSettings, gpu: bool) -> dict[str, Any]:
    """The run's KV budget (its largest batch's cache) beside the weights, and the limits
    ``batch_limits`` would choose from this machine's memory."""
    longest = [max(len(prepared[i].input_ids) for i in b) for b in batches]
    widest = max(len(b) * (n + s.max_tokens) for b, n in zip(batches, longest, strict=True))
    memory = _memory_bytes(gpu)
    mean_prompt = int(sum(len(r.input_ids) for r in prepared) / len(prepared))
    suggested = batch_limits(model, s.max_tokens, memory, mean_prompt) if memory else None
    return {
        "weight_bytes": sum(int(v.nbytes) for _, v in tree_flatten(model.parameters())),
        "kv_budget_bytes": widest * kv_bytes_per_token(model),
        "machine_memory_bytes": memory,
        "suggested_batch_size": suggested and suggested[0],
        "suggested_max_batch_tokens": suggested and suggested[1],
    }


def _ratios(results: dict[str, ModeResult]) -> dict[str, dict[str, float]]:
    """rows/s of every mode over rows/s of mode 1 (naive) and mode 2 (single)."""
    out = {}
    for base in ("naive", "single"):
        if base in results and results[base].rows_per_second:
            rate = results[base].rows_per_second
            out[f"over_{base}"] = {m: r.rows_per_second / rate for m, r in results.items()}
    if "sorted" in results and "unsorted" in results:
        out["sorted_over_unsorted"] = (
            results["sorted"].rows_per_second / results["unsorted"].rows_per_second
        )
    if "sorted" in results and "pipeline" in results:
        out["pipeline_over_sorted"] = (
            results["pipeline"].rows_per_second / results["sorted"].rows_per_second
        )
    return out


def _agreement(tokens: dict[str, dict], processor) -> dict[str, Any]:
    """Do the modes produce the same tokens on the rows they share?

    Each batched mode is compared with the first engine mode that ran (token ids); mode 5,
    which writes text, by decoded text and token count; mode 1 (no cache) with mode 2 when
    both ran; it may differ by float rounding and is not part of the verdict.
    """
    engine = [m for m in ("single", "unsorted", "sorted") if m in tokens]
    if not engine:
        return {"modes_2_to_5_agree": None}
    out: dict[str, Any] = {}
    for mode in tokens:
        base = "single" if mode == "naive" and "single" in tokens else engine[0]
        if mode == base or (mode == "naive" and base != "single"):
            continue
        ref = tokens[base]
        shared = sorted(set(tokens[mode]) & set(ref))
        if mode == "pipeline":
            expected = {i: (processor.decode(ref[i]), len(ref[i])) for i in shared}
        else:
            expected = ref
        different = [i for i in shared if tokens[mode][i] != expected[i]]
        out[mode] = {
            "reference": base,
            "rows_compared": len(shared),
            "rows_different": len(different),
        }
        if mode != "pipeline":  # where each differing row first departs (0-based token)
            out[mode]["first_difference"] = [
                _first_difference(tokens[mode][i], expected[i]) for i in different
            ]
    verdict = [v["rows_different"] == 0 for k, v in out.items() if k != "naive"]
    out["modes_2_to_5_agree"] = all(verdict) if verdict else None
    return out


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def _targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    modes, ratios, roof = report["modes"], report["ratios"], report["roofline"]
    checks = {}

    def check(name: str, value: float | None, goal: float, at_least: bool = True) -> None:
        if value is None:
            return
        met = value >= goal if at_least else value <= goal
        checks[name] = {"value": round(value, 4), "goal": goal, "met": bool(met)}

    check("sorted_over_naive", ratios.get("over_naive", {}).get("sorted"), 20.0)
    check("sorted_over_single", ratios.get("over_single", {}).get("sorted"), 4.0)
    check("sorted_over_unsorted", ratios.get("sorted_over_unsorted"), 1.3)
    check("sorted_padding", modes.get("sorted", {}).get("padding_fraction"), 0.10, False)
    check("pipeline_over_sorted", ratios.get("pipeline_over_sorted"), 0.9)
    check("decode_step_over_weight_stream", roof["decode_step_over_weight_stream"], 1.5, False)
    check("prefill_fraction_of_matmul", roof["prefill_fraction_of_matmul"], 0.5)
    return checks


# ---------------------------------------------------------------------------------------------
# The table


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table plus ceilings, roofline, agreement and targets."""
    s, c, m = report["settings"], report["ceilings"], report["model"]
    lines = [
        f"jobrunner bench: preset {s['preset']}, {s['dtype']}, {report['machine']['device']} "
        f"({report['machine']['cpus']} cpus, BLAS {report['machine']['blas'] or 'reference'}), "
        f"mlx {report['machine']['mlx']}",
        f"model: {m['parameters'] / 1e6:.1f}M parameters ({_mib(m['weight_bytes'])} MiB), "
        f"prompts {m['prompt_tokens_min']}-{m['prompt_tokens_max']} tokens "
        f"(mean {m['prompt_tokens_mean']:.0f}), {m['images']} images / {m['crops']} crops, "
        f"{s['max_tokens']} new tokens per row, batch {s['batch_size']}",
        "",
        f"{'mode':<12}{'rows':>5}{'s':>8}{'rows/s':>9}{'prompt tok/s':>13}{'gen tok/s':>10}"
        f"{'padding':>8}{'peak MiB':>9}{'x(1)':>7}{'x(2)':>7}",
    ]
    over_naive = report["ratios"].get("over_naive", {})
    over_single = report["ratios"].get("over_single", {})
    for mode, r in report["modes"].items():
        number = MODES.index(mode) + 1
        ratio1 = f"{over_naive[mode]:.1f}" if mode in over_naive else "-"
        ratio2 = f"{over_single[mode]:.2f}" if mode in over_single else "-"
        lines.append(
            f"{number} {mode:<10}{r['rows']:>5}{r['seconds']:>8.1f}{r['rows_per_second']:>9.3f}"
            f"{r['prompt_tokens_per_second']:>13.0f}{r['generated_tokens_per_second']:>10.1f}"
            f"{r['padding_fraction']:>8.1%}{_mib(r['peak_memory_bytes']):>9}{ratio1:>7}{ratio2:>7}"
        )
    roof = report["roofline"]
    lines += [
        "",
        f"ceilings: matmul {c['matmul_gflops']:.0f} GFLOP/s ({c['matmul_size']}^3), "
        f"read {c['read_gbs']:.1f} GB/s (reduce {c['read_gbs_reduce']:.1f}, "
        f"gemv {c['read_gbs_gemv']:.1f})",
        f"decode step (batch 1): {roof['decode_step_seconds'] * 1e3:.1f} ms vs weight stream "
        f"{roof['weight_stream_seconds'] * 1e3:.1f} ms ({_mib(roof['decoder_weight_bytes'])} MiB"
        f" / {c['read_gbs']:.1f} GB/s): {roof['decode_step_over_weight_stream']:.2f}x",
        f"prefill of {roof['prefill_tokens']} tokens: "
        f"{roof['prefill_gflops']:.0f} GFLOP/s = {roof['prefill_fraction_of_matmul']:.0%} "
        "of the matmul ceiling",
        _memory_line(report),
        _agreement_line(report["agreement"]),
        "targets: "
        + ", ".join(
            f"{name} {t['value']:g} ({'met' if t['met'] else 'NOT met'}, goal "
            f"{'>=' if name not in _AT_MOST else '<='} {t['goal']:g})"
            for name, t in report["targets"].items()
        ),
    ]
    return "\n".join(lines)


def _memory_line(report: dict[str, Any]) -> str:
    mem, modes = report["memory"], report["modes"]
    peak = max(r["peak_memory_bytes"] for r in modes.values())
    overhead = peak - mem["weight_bytes"] - mem["kv_budget_bytes"]
    line = (
        f"memory: peak {_mib(peak)} MiB = weights {_mib(mem['weight_bytes'])} + KV budget "
        f"{_mib(mem['kv_budget_bytes'])} + other {_mib(overhead)} MiB"
    )
    if mem["suggested_batch_size"]:
        line += (
            f"; from {_mib(mem['machine_memory_bytes'])} MiB batch_limits() would choose "
            f"batch {mem['suggested_batch_size']}, {mem['suggested_max_batch_tokens']} tokens"
        )
    return line


_AT_MOST = {"sorted_padding", "decode_step_over_weight_stream"}


def _agreement_line(agreement: dict[str, Any]) -> str:
    parts = [
        f"{mode} {v['rows_compared'] - v['rows_different']}/{v['rows_compared']} same as "
        f"{v['reference']}"
        for mode, v in agreement.items()
        if isinstance(v, dict)
    ]
    verdict = {True: "yes", False: "NO", None: "n/a"}[agreement["modes_2_to_5_agree"]]
    return f"tokens: modes 2-5 agree: {verdict} ({'; '.join(parts)})"
