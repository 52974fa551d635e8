"""Batched, KV-cached generation: token ids and pixels in, token ids out; knows nothing of files.

A batch of prepared rows is left-padded to one length. Each row gets its own position ids (0 at
its first real token) and a mask hiding the padding, so its logits are those it would get alone.
Prefill runs over the whole prompt (in chunks for long prompts), then decoding feeds one token per
row per step into a cache written in place. Sampling draws its randomness from a counter-based
hash of (row seed, step, token id), so a sampled row's output does not depend on its batch either.
Rows that stop leave the batch once enough of them have finished.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import KVCache, make_cache
from .language import attention_mask, position_ids
from .phi3_v import Model
from .processing import PreparedRow, Processor, image_feature_index


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    prefill_chunk: int = 2048  # prompt positions per prefill call; bounds activation memory
    vision_chunk: int = 32  # crops per vision-tower call; bounds activation memory

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


@dataclass
class RowResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    output_tokens: int


def row_seed(job_seed: int, row_id: str) -> int:
    """A 32-bit seed for one row, from the job seed and the row's id (not its batch)."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _hash_uniform(seeds: mx.array, step: int, vocab: int) -> mx.array:
    """Uniform (0, 1) noise ``[B, vocab]`` from a murmur3-style mix of (seed, step, token)."""
    x = seeds[:, None] ^ mx.array((step * 0x9E3779B1) & 0xFFFFFFFF, dtype=mx.uint32)
    x = x + mx.arange(vocab, dtype=mx.uint32)[None] * mx.array(0x85EBCA77, dtype=mx.uint32)
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x = (x ^ (x >> shift)) * mx.array(mult, dtype=mx.uint32)
    x = x ^ (x >> 16)
    return ((x >> 8).astype(mx.float32) + 0.5) / float(1 << 24)


def sample(logits: mx.array, params: GenerationParams, seeds: mx.array, step: int) -> mx.array:
    """Next tokens ``[B]`` from float32 ``logits`` ``[B, V]``: greedy, or Gumbel-max sampling
    after temperature, top-k and top-p, with per-row noise."""
    if params.temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logits, axis=-1)[:, vocab - params.top_k][:, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.top_p < 1.0:
        probs = mx.softmax(logits, axis=-1)
        ordered = mx.sort(probs, axis=-1)[:, ::-1]
        before = mx.cumsum(ordered, axis=-1) - ordered
        # smallest probability still inside the nucleus (the top token always is)
        floor = mx.min(mx.where(before < params.top_p, ordered, mx.inf), axis=-1, keepdims=True)
        logits = mx.where(probs < floor, -mx.inf, logits)
    gumbel = -mx.log(-mx.log(_hash_uniform(seeds, step, vocab)))
    return mx.argmax(logits + gumbel, axis=-1)


def image_features(model: Model, rows: Sequence[PreparedRow], chunk: int = 32) -> mx.array | None:
    """Projected features of every image of the batch, in slot order (row by row)."""
    images = [image for row in rows for image in row.images]
    if not images:
        return None
    vision = model.vision
    side = vision.vision_config.tokens_per_side
    index, offset = [], 0
    for image in images:
        index.append(image_feature_index(image.h_crop, image.w_crop, offset, side))
        offset += image.crops.shape[0]
    crops = np.concatenate([image.crops for image in images])
    merged = [
        vision.encode_crops(mx.array(crops[start : start + chunk]))
        for start in range(0, len(crops), chunk)
    ]
    return vision.project(mx.concatenate(merged), mx.array(np.concatenate(index)))


def _left_pad(rows: Sequence[PreparedRow], pad_id: int) -> tuple[mx.array, mx.array]:
    length = max(len(row.input_ids) for row in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    pad = np.zeros(len(rows), dtype=np.int32)
    for b, row in enumerate(rows):
        pad[b] = length - len(row.input_ids)
        ids[b, pad[b] :] = row.input_ids
    return mx.array(ids), mx.array(pad)


def prefill(
    model: Model,
    ids: mx.array,
    pad: mx.array,
    cache: list[KVCache],
    features: mx.array | None,
    chunk: int,
) -> mx.array:
    """Run the prompt through the model, filling ``cache``; return last-position logits."""
    embeddings = model.model.embed(ids, features)
    length = ids.shape[1]
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        logits = model(
            ids[:, start:end],
            position_ids(pad, start, end - start),
            attention_mask(pad, start, end - start),
            cache,
            embeddings=embeddings[:, start:end],
        )
        if end < length:
            mx.eval([c.keys for c in cache])
    return logits[:, -1]


def decode_step(model: Model, tokens: mx.array, pad: mx.array, cache: list[KVCache]) -> mx.array:
    """Logits ``[B, V]`` for one new token per row."""
    offset = cache[0].offset
    logits = model(
        tokens[:, None], position_ids(pad, offset, 1), attention_mask(pad, offset, 1), cache
    )
    return logits[:, -1]


class _Batch:
    """Host-side bookkeeping of the rows still decoding."""

    def __init__(self, size: int, stop_ids: set[int]):
        self.active = list(range(size))  # original row numbers, in batch order
        self.tokens: list[list[int]] = [[] for _ in range(size)]
        self.finish: list[str | None] = [None] * size
        self.stop_ids = stop_ids

    def record(self, step_tokens: list[int], last_step: bool) -> None:
        for slot, row in enumerate(self.active):
            if self.finish[row] is not None:
                continue
            token = step_tokens[slot]
            if token in self.stop_ids:
                self.finish[row] = "stop"
                continue
            self.tokens[row].append(token)
            if last_step:
                self.finish[row] = "length"

    def finished_slots(self) -> list[int]:
        return [s for s, row in enumerate(self.active) if self.finish[row] is not None]


def generate_batch(
    model: Model,
    processor: Processor,
    rows: Sequence[PreparedRow],
    params: GenerationParams,
    seeds: Sequence[int] | None = None,
) -> list[RowResult]:
    """Generate for a batch of prepared rows; each row's result is what it would get alone.

    Args:
        rows: prompts with image slots (negative ids) and their images.
        params: decoding settings; greedy when ``temperature == 0``.
        seeds: one 32-bit seed per row (see ``row_seed``); needed only for sampling.
    Returns:
        One ``RowResult`` per row, in the order given.
    """
    if not rows:
        return []
    ids, pad = _left_pad(rows, processor.pad_token_id)
    row_seeds = mx.array(np.asarray(seeds or [0] * len(rows), dtype=np.uint32))
    cache = make_cache(len(model.layers))
    for c in cache:
        c.reserve(ids.shape[1] + params.max_tokens)
    features = image_features(model, rows, params.vision_chunk)
    logits = prefill(model, ids, pad, cache, features, params.prefill_chunk)
    batch = _Batch(len(rows), processor.stop_token_ids)
    tokens = sample(logits, params, row_seeds, 0)
    mx.async_eval(tokens)
    for step in range(params.max_tokens):
        last = step == params.max_tokens - 1
        if not last:  # queue the next step before waiting on this one
            next_tokens = sample(
                decode_step(model, tokens, pad, cache), params, row_seeds, step + 1
            )
            mx.async_eval(next_tokens)
        batch.record(tokens.tolist(), last)
        done = batch.finished_slots()
        if len(done) == len(batch.active) or last:
            break
        tokens = next_tokens
        if len(done) * 4 >= len(batch.active):  # drop finished rows: less work per step
            keep = [s for s in range(len(batch.active)) if s not in set(done)]
            keep_idx = mx.array(keep)
            for c in cache:
                c.filter(keep_idx)
            tokens, pad, row_seeds = tokens[keep_idx], pad[keep_idx], row_seeds[keep_idx]
            batch.active = [batch.active[s] for s in keep]
    return [
        RowResult(
            token_ids=batch.tokens[i],
            text=processor.decode(batch.tokens[i]),
            finish_reason=batch.finish[i] or "length",
            prompt_tokens=len(row.input_ids),
            output_tokens=len(batch.tokens[i]),
        )
        for i, row in enumerate(rows)
    ]
