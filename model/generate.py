"""Batched, KV-cached generation: token ids and pixels in, token ids out; knows nothing of files.

A batch of prepared rows is left-padded to one length. Each row gets its own position ids (0 at
its first real token) and a mask hiding the padding, so its logits are those it would get alone.
Prefill runs over the whole prompt (in chunks for long prompts), then decoding feeds one token per
row per step into a cache written in place. Sampling draws its randomness from a counter-based
hash of (row seed, step, token id), so a sampled row's output does not depend on its batch either.
Rows that stop leave the batch once enough of them have finished.

Prefilled row by row, a row with images runs in two parts: its prompt up to its last image slot
(the prefix), then the rest. Rows with the same images and the same text before them (several
prompts over one image) share the prefix, whose keys and values a ``PrefixCache`` keeps, so it is
computed and its images encoded once. Every row is split the same way whether or not its prefix
is cached, so its output does not depend on which rows came before it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import ImageFeatureCache, KVCache, PrefixCache, make_cache
from .language import attention_mask, position_ids
from .phi3_v import Model
from .processing import ImageInput, PreparedRow, Processor, image_feature_index


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    # Prompt positions per prefill call and crops per vision-tower call: they bound activation
    # memory. None: sized to the device (see ``chunk_sizes``).
    prefill_chunk: int | None = None
    vision_chunk: int | None = None
    # Prefill row by row (no compute on padding) or the padded batch at once; None: row by
    # row on the CPU, where attention's cost on padding dominates, batched on a GPU, where
    # each new prompt length costs a new attention plan and batches have fewer lengths.
    row_prefill: bool | None = None
    # Prompt lengths rounded up to a multiple of ``LENGTH_BUCKET`` (more left padding) and
    # attention over the whole KV buffer, so that shapes repeat; None: under CUDA, whose attention
    # is planned per shape (see ``static_shapes``).
    static_shapes: bool | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        for name in ("prefill_chunk", "vision_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


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


_CPU_PREFILL_CHUNK = 256
_CPU_VISION_BYTES = 8 << 20


def chunk_sizes(model: Model, params: GenerationParams) -> tuple[int, int]:
    """``(prefill_chunk, vision_chunk)``: the params' values, or the device's defaults.

    On a GPU, 2048 positions and 32 crops. On the CPU, smaller calls are faster: 256 positions
    (prefill of a 975-token prompt 0.39-0.40 s -> 0.33-0.34 s on the small bench preset, chunk
    attention skipping later keys) and as many crops as keep one MLP activation within 8 MiB
    (one crop of the real CLIP tower; per-crop time at 8 crops per call was 1.5x that of 1).
    """
    gpu = mx.default_device() != mx.cpu
    prefill_chunk = params.prefill_chunk or (2048 if gpu else _CPU_PREFILL_CHUNK)
    if params.vision_chunk or gpu:
        return prefill_chunk, params.vision_chunk or 32
    vision = model.vision.vision_config
    itemsize = activation_dtype(model).size
    crop_bytes = (vision.grid_size**2 + 1) * vision.intermediate_size * itemsize
    return prefill_chunk, max(1, _CPU_VISION_BYTES // crop_bytes)


LENGTH_BUCKET = 128


def static_shapes(params: GenerationParams) -> bool:
    """Whether to keep shapes static: the params' choice, else when running on CUDA.

    MLX's CUDA backend builds a cuDNN attention graph for every new combination of shapes, and
    its fallback kernels are set up per shape too. A prompt length or a cache length seen for
    the first time cost 0.04-1.6 s (prefill) and 7-19 ms (one decode step) on an H100, against
    0.2-1.1 ms once planned. With lengths in buckets of ``LENGTH_BUCKET`` and attention over the
    whole KV buffer (256-position blocks), a job sees a few dozen shapes instead of one per
    prompt length and decode step. On the CPU nothing is planned, and the extra keys would cost;
    MLX's Metal attention kernels are specialised by dtype, head size and a few flags
    (alignment, mask, causal), not by length, so Apple GPUs keep exact shapes (not measured on
    one here).

    The planner's padding figures and its ``max_batch_tokens`` budget count the rows' own
    lengths: the bucket adds up to ``LENGTH_BUCKET - 1`` padded positions to each row of a batch.
    """
    if params.static_shapes is not None:
        return params.static_shapes
    return mx.default_device() != mx.cpu and mx.cuda.is_available()


def image_features(
    model: Model,
    rows: Sequence[PreparedRow],
    chunk: int | None = None,
    cache: ImageFeatureCache | None = None,
) -> mx.array | None:
    """Projected features of every image of the batch, in slot order (row by row), encoded
    ``chunk`` crops per call (default: the device's, see ``chunk_sizes``).

    Each distinct image (by content hash) is encoded once, however many rows share it; with a
    ``cache``, images seen in earlier batches are not encoded again.
    """
    images = [image for row in rows for image in row.images]
    if not images:
        return None
    known = {}
    if cache is not None:
        known = {im.key: f for im in images if (f := cache.get(im.key)) is not None}
    todo = list({im.key: im for im in images if im.key not in known}.values())
    if todo:
        chunk = chunk or chunk_sizes(model, GenerationParams())[1]
        fresh = _encode_images(model, todo, chunk)
        ends = np.cumsum([image.num_tokens for image in todo])[:-1].tolist()
        for image, features in zip(todo, mx.split(fresh, ends), strict=True):
            if cache is not None:
                # a copy: a slice would keep the whole batch's features alive in the cache
                features = features + 0
                cache.put(image.key, features)
            known[image.key] = features
    if len(images) == 1:
        return known[images[0].key]
    return mx.concatenate([known[image.key] for image in images])


def features_by_row(
    rows: Sequence[PreparedRow], features: mx.array | None, need: Sequence[int] | None = None
) -> list[mx.array | None]:
    """``features`` of the rows numbered ``need`` (default: every row with images), in slot
    order, split into one entry per row of ``rows``; None for the others."""
    if need is None:
        need = [b for b, row in enumerate(rows) if row.images]
    out: list[mx.array | None] = [None] * len(rows)
    start = 0
    for b in need:
        count = sum(image.num_tokens for image in rows[b].images)
        out[b] = features[start : start + count]
        start += count
    return out


def _encode_images(model: Model, images: Sequence[ImageInput], chunk: int) -> mx.array:
    """All crops of ``images`` through the tower (``chunk`` crops per call), then projected.

    On the CPU each image goes through on its own: BLAS results can change with a matmul's
    shape, so features encoded beside other images would depend on the batch (and on what the
    caches held) in the last bits, and float32 outputs are promised exact. A GPU takes the
    crops of all images together, ``chunk`` per call.
    """
    if len(images) > 1 and mx.default_device() == mx.cpu:
        return mx.concatenate([_encode_images(model, [image], chunk) for image in images])
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


def activation_dtype(model: Model) -> mx.Dtype:
    """The dtype activations and the KV cache take: the final norm's, never quantized (a
    quantized embedding holds packed ``uint32``)."""
    return model.model.norm.weight.dtype


def kv_bytes_per_token(model: Model) -> int:
    """Bytes of keys and values one prompt or generated position holds in the cache."""
    c = model.config
    itemsize = activation_dtype(model).size
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * itemsize


def device_memory_bytes() -> int | None:
    """The GPU's memory when the device reports it, else the machine's physical memory."""
    if mx.default_device() != mx.cpu:
        size = mx.device_info().get("memory_size")
        if size:
            return int(size)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def weight_bytes(model: Model) -> int:
    """Bytes the model's parameters take (as loaded: dtype and quantization applied)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def batch_limits(
    model: Model,
    max_tokens: int,
    memory_bytes: int,
    prompt_tokens: int = 1024,
    fraction: float = 0.5,
) -> tuple[int, int]:
    """``(batch_size, max_batch_tokens)`` whose KV cache fits in memory.

    ``fraction`` of the memory left beside the weights goes to the cache (the rest is left to
    activations, image features and the framework's own pools); a batch of rows of about
    ``prompt_tokens`` then holds ``batch_size`` rows of prompt plus ``max_tokens``.

    Args:
        memory_bytes: the device's memory (or the machine's, on a CPU).
    Returns:
        The batch size (at least 1, at most 256) and the prompt-slot budget for the planner.
    """
    slots = memory_kv_positions(model, memory_bytes, fraction=fraction)
    batch_size = max(1, min(256, slots // (prompt_tokens + max_tokens)))
    return batch_size, max(prompt_tokens, batch_size * prompt_tokens)


def memory_kv_positions(
    model: Model, memory_bytes: int, reserved_bytes: int = 0, fraction: float = 0.5
) -> int:
    """KV positions (all rows of a batch together) that fit in ``fraction`` of the memory left
    beside the weights and ``reserved_bytes`` (the feature and prefix caches), as in
    ``batch_limits``; the rest is left to activations, the row-by-row prefill's copy of one
    row and ``KVCache.filter``'s copies."""
    room = max(memory_bytes - weight_bytes(model) - reserved_bytes, 0) * fraction
    return int(room // kv_bytes_per_token(model))


def kv_positions(longest: int, max_tokens: int, static: bool = False) -> int:
    """KV positions each row of a batch allocates when its longest prompt has ``longest``
    tokens: every row is left-padded to it (rounded up to ``LENGTH_BUCKET`` under static
    shapes) and holds ``max_tokens`` more, in whole ``KVCache.step`` blocks."""
    if static:
        longest = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET
    return -(-(longest + max_tokens) // KVCache.step) * KVCache.step


def _left_pad(
    rows: Sequence[PreparedRow], pad_id: int, multiple: int = 1
) -> tuple[mx.array, mx.array]:
    """Ids ``[B, L]`` left-padded to the longest row (rounded up to ``multiple``) and each
    row's padding ``[B]``."""
    length = -(-max(len(row.input_ids) for row in rows) // multiple) * multiple
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
    logits: bool = True,
    span: mx.array | None = None,
) -> mx.array | None:
    """Run ``ids`` through the model after what ``cache`` holds, filling it; return the last
    position's logits (None without ``logits``).

    Only the last position goes through ``lm_head``: the others' logits are never read, and
    for a long prompt they would cost as much as the rest of the model. Rotary factors are
    chosen for each row's whole prompt, ``span`` ``[B]`` positions (default: what the cache
    holds plus ``ids``), as the reference's single pass over the prompt chooses them.
    """
    embeddings = model.model.embed(ids, features)
    base, length = cache[0].offset, ids.shape[1]
    if span is None:
        span = base + length - pad
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        hidden = model.model(
            ids[:, start:end],
            position_ids(pad, base + start, end - start),
            attention_mask(pad, base + start, end - start, cache[0].visible(base + end)),
            cache,
            embeddings=embeddings[:, start:end],
            rope_span=span,
        )
        if end < length:
            mx.eval([c.keys for c in cache])
    if not logits:
        return None
    return model.lm_head(hidden[:, -1]).astype(mx.float32)


def prompt_prefix(row: PreparedRow, long_rope: bool = False) -> tuple[int, str] | None:
    """``(length, key)`` of the row's prompt up to and including its last image slot, the part
    that rows with the same images and the same text before them share; None for a row without
    images or with nothing after its last image (then there is no second part to prefill).

    ``long_rope``: the whole prompt takes the long rotary factors
    (``model.model.rope.is_long(len(row.input_ids))``); the prefix's keys depend on it, so the
    key does too.
    """
    if not row.images:
        return None
    ids = np.asarray(row.input_ids, dtype=np.int32)
    length = int(np.flatnonzero(ids < 0)[-1]) + 1
    if length >= len(ids):
        return None
    digest = hashlib.sha256(ids[:length].tobytes())
    for image in row.images:
        digest.update(f"|{image.key}".encode())
    if long_rope:
        digest.update(b"|long-rope")
    return length, digest.hexdigest()


def _row_prefix(model: Model, row: PreparedRow) -> tuple[int, str] | None:
    return prompt_prefix(row, model.model.rope.is_long(len(row.input_ids)))


def prefill_rows(
    model: Model,
    rows: Sequence[PreparedRow],
    length: int,
    cache: list[KVCache],
    features: Sequence[mx.array | None],
    chunk: int,
    multiple: int = 1,
    prefixes: PrefixCache | None = None,
    known: dict[int, list[tuple[mx.array, mx.array]]] | None = None,
) -> mx.array:
    """``prefill`` one row at a time into the left-padded batch cache of ``length`` positions.

    No position is computed for the batch's padding, so a row costs what its own prompt costs
    (attention grows with the square of the length), and each row's prompt pass is exactly its
    pass alone. With ``multiple`` > 1 (static shapes), a row is left-padded to a multiple of it
    and prefilled through a static cache, as it would be alone. Otherwise a row with images is
    prefilled in two parts (``prompt_prefix``); the first comes from ``known`` (row number to
    the prefix's keys and values, looked up before the batch's images were encoded) or
    ``prefixes`` when there, and goes into ``prefixes`` when computed.

    Args:
        features: each row's image features (None for a row without images, or whose prefix
            is in ``known``).
    """
    for c in cache:
        c.offset = length
    static = multiple > 1
    pad_id = int(model.config.pad_token_id or 0)  # any id: padding is masked
    known = known or {}
    logits = []
    for b, row in enumerate(rows):
        ids, pad = _left_pad([row], pad_id, multiple)
        row_cache = make_cache(len(cache), static)
        for c in row_cache:
            c.reserve(ids.shape[1])
        prefix = None if static else _row_prefix(model, row)
        if prefix is None:
            logits.append(prefill(model, ids, pad, row_cache, features[b], chunk))
        else:
            split, key = prefix
            states = known.get(b)
            if states is not None and prefixes is not None:
                prefixes.hits += 1  # looked up uncounted before the batch's images were encoded
            elif prefixes is not None:
                states = prefixes.get(key)
            if states is None:
                whole = mx.array([len(row.input_ids)])  # the prefix's factors: the prompt's
                prefill(model, ids[:, :split], pad, row_cache, features[b], chunk, False, whole)
                kept = []
                if prefixes is not None and prefixes.fits(split * kv_bytes_per_token(model)):
                    # copies: slices would keep the row's buffers alive
                    kept = [(k + 0, v + 0) for k, v in (c.state for c in row_cache)]
                mx.eval([c.keys for c in row_cache], [c.values for c in row_cache], kept)
                if kept:
                    prefixes.put(key, kept)
            else:
                for c, (k, v) in zip(row_cache, states, strict=True):
                    c.update_and_fetch(k, v)
            logits.append(prefill(model, ids[:, split:], pad, row_cache, None, chunk))
        for c, own in zip(cache, row_cache, strict=True):
            c.write_row(b, len(rows), *own.state)
        mx.eval(logits[-1], [c.keys for c in cache], [c.values for c in cache])
    return mx.concatenate(logits)


def decode_step(model: Model, tokens: mx.array, pad: mx.array, cache: list[KVCache]) -> mx.array:
    """Logits ``[B, V]`` for one new token per row."""
    offset = cache[0].offset
    mask = attention_mask(pad, offset, 1, cache[0].visible(offset + 1))
    logits = model(tokens[:, None], position_ids(pad, offset, 1), mask, cache)
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
    feature_cache: ImageFeatureCache | None = None,
    prefix_cache: PrefixCache | None = None,
) -> list[RowResult]:
    """Generate for a batch of prepared rows; each row's result is what it would get alone.

    Args:
        rows: prompts with image slots (negative ids) and their images.
        params: decoding settings; greedy when ``temperature == 0``.
        seeds: one 32-bit seed per row (see ``row_seed``); needed only for sampling.
        feature_cache: image features kept across batches (rows sharing an image in
            different batches); images shared inside the batch are encoded once regardless.
        prefix_cache: keys and values of prompt prefixes up to the last image (see
            ``prompt_prefix``), kept across batches; used when prefilling row by row.
    Returns:
        One ``RowResult`` per row, in the order given.
    """
    if not rows:
        return []
    static = static_shapes(params)
    multiple = LENGTH_BUCKET if static else 1
    ids, pad = _left_pad(rows, processor.pad_token_id, multiple)
    row_seeds = mx.array(np.asarray(seeds or [0] * len(rows), dtype=np.uint32))
    cache = make_cache(len(model.layers), static)
    for c in cache:
        c.reserve(ids.shape[1] + params.max_tokens)
    prefill_chunk, vision_chunk = chunk_sizes(model, params)
    row_prefill = params.row_prefill
    if row_prefill is None:
        row_prefill = mx.default_device() == mx.cpu
    if row_prefill:
        # rows whose prefix is cached need neither their images encoded nor the prefix run
        known = {}
        if prefix_cache is not None and not static:
            prefixes = {b: _row_prefix(model, row) for b, row in enumerate(rows)}
            known = {
                b: states
                for b, prefix in prefixes.items()
                if prefix is not None
                and (states := prefix_cache.get(prefix[1], count=False)) is not None
            }
        need = [b for b, row in enumerate(rows) if row.images and b not in known]
        encoded = image_features(model, [rows[b] for b in need], vision_chunk, feature_cache)
        features = features_by_row(rows, encoded, need)
        logits = prefill_rows(
            model, rows, ids.shape[1], cache, features, prefill_chunk, multiple, prefix_cache, known
        )
    else:
        features = image_features(model, rows, vision_chunk, feature_cache)
        logits = prefill(model, ids, pad, cache, features, prefill_chunk)
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
